//! Serving a running userspace interface until it should stop: SIGTERM, SIGINT, or
//! the interface itself going away (`ip link del`). `sidecar-agent up` and
//! `sidecar-wg` both end this way, so a deleted interface never leaves a daemon
//! holding its UDP port and a stale API socket.

use std::io;

use anyhow::{Context as _, Result};
use sidecar::driver::Driver;
use sidecar::uapi::UapiServer;
use sidecar::wg::NoiseBackend;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Why [`serve`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    Terminate,
    Interrupt,
    LinkGone,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stopped::Terminate => "SIGTERM",
            Stopped::Interrupt => "SIGINT",
            Stopped::LinkGone => "the interface was deleted",
        })
    }
}

/// SIGTERM and SIGINT handlers, installed before the interface reports ready so a
/// signal sent right after that is never lost to the default action.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    pub fn install() -> io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Serves the userspace API until a signal arrives or the link is gone, then removes
/// the API socket (the server does so when it stops) and says why it stopped. The
/// caller stops the driver, which deletes the TUN device if it still exists.
pub async fn serve(driver: &Driver, uapi: UapiServer, signals: StopSignals) -> Stopped {
    let StopSignals { mut term, mut int } = signals;
    let mut reason = Stopped::LinkGone;
    let stop = async {
        reason = tokio::select! {
            _ = term.recv() => Stopped::Terminate,
            _ = int.recv() => Stopped::Interrupt,
            _ = driver.link_closed() => Stopped::LinkGone,
        };
    };
    uapi.run(stop).await;
    tracing::info!(%reason, "shutting down");
    reason
}

/// The noise backend `SIDECAR_NOISE` asks for (`sidecar`, the default, or
/// `boringtun`), logged so a run says which one it used.
pub fn noise_backend_from_env() -> Result<NoiseBackend> {
    let backend = match std::env::var("SIDECAR_NOISE") {
        Ok(name) => name.parse().context("SIDECAR_NOISE")?,
        Err(_) => NoiseBackend::default(),
    };
    tracing::info!(noise = ?backend, "noise backend");
    Ok(backend)
}
