//! Post-quantum preshared keys on the agent: rotating them on the relay's schedule
//! (or at once on SIGUSR1), and the one-shot registration that gives a plain
//! WireGuard client its key (`sidecar-agent psk`).
//!
//! A rotation is a new registration with a new X-Wing encapsulation. The relay
//! switches to the new key when it answers; this side switches as soon as it has
//! derived the key from the answer. Sessions made with the old key keep carrying
//! traffic until the engine's handshake under the new key completes.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;

use sidecar::wg::{Device, DeviceUpdate, PeerUpdate};
use sidecar::Key;
use sidecar_proto::pq::Psk;
use sidecar_proto::RegisterPeer;
use tokio::sync::Notify;

use crate::relay_client::{ClientError, PqRegistration, RelayClient};

/// After a failed rotation, try again this soon (or at the schedule, if sooner).
const RETRY: Duration = Duration::from_secs(30);

/// Wakes every rotation at once (SIGUSR1).
static ROTATE_NOW: Notify = Notify::const_new();
static SIGNAL: Once = Once::new();

/// Rotates every running tunnel's preshared key now.
pub fn rotate_all_now() {
    ROTATE_NOW.notify_waiters();
}

/// Makes SIGUSR1 rotate every preshared key at once (instead of ending the process,
/// its default). Idempotent; must run inside the tokio runtime.
pub fn watch_rotation_signal() {
    SIGNAL.call_once(listen_for_sigusr1);
}

/// Sets the preshared key a device uses with its relay peer.
pub fn set_psk(device: &Device, relay: Key, psk: Option<Psk>) {
    let mut update = PeerUpdate::new(relay);
    update.update_only = true;
    update.preshared_key = Some(psk.map_or(Key([0; 32]), Psk::to_key));
    if let Err(e) = device.apply(&DeviceUpdate {
        peers: vec![update],
        ..Default::default()
    }) {
        tracing::error!(error = %e, "cannot set the preshared key");
    }
}

/// A running rotation; dropping it stops it.
pub struct Rotation(tokio::task::JoinHandle<()>);

impl Drop for Rotation {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Re-registers `request` every `every` (as the relay announces it, which may
/// change) with a new encapsulation and puts the new key on `device`.
pub fn spawn(
    relay: RelayClient,
    device: Arc<Device>,
    request: RegisterPeer,
    relay_key: Key,
    every: Duration,
) -> Rotation {
    watch_rotation_signal();
    let label = request.container.clone().unwrap_or_default();
    Rotation(tokio::spawn(async move {
        let mut every = every;
        let mut wait = every;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = ROTATE_NOW.notified() => {}
            }
            match relay.register_pq(&request).await {
                Ok(PqRegistration {
                    psk,
                    rotate,
                    counter,
                    ..
                }) => {
                    set_psk(&device, relay_key, psk);
                    every = rotate.unwrap_or(every);
                    wait = every;
                    match counter {
                        Some(counter) => {
                            tracing::info!(container = %short(&label), counter, "post-quantum preshared key rotated")
                        }
                        None => {
                            tracing::warn!(container = %short(&label), "the relay no longer grants a post-quantum preshared key")
                        }
                    }
                }
                Err(e) => {
                    wait = every.min(RETRY);
                    tracing::warn!(container = %short(&label), error = %e, retry_secs = wait.as_secs(), "cannot rotate the preshared key; the current one stays");
                }
            }
        }
    }))
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn listen_for_sigusr1() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::user_defined1()) {
        Ok(mut usr1) => {
            tokio::spawn(async move {
                while usr1.recv().await.is_some() {
                    tracing::info!("SIGUSR1: rotating every preshared key now");
                    rotate_all_now();
                }
            });
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGUSR1; preshared keys rotate on schedule only")
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PskCommandError {
    #[error(transparent)]
    Relay(#[from] ClientError),
    #[error("the relay granted no post-quantum preshared key (it has no X-Wing key)")]
    NoPsk,
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// `sidecar-agent psk`: registers a plain WireGuard client's public key with a new
/// X-Wing encapsulation, writes the preshared key to `psk_file` (mode 0600) and
/// returns the lines that configure the client with it. Run it again to rotate.
pub async fn register_plain(
    relay: &RelayClient,
    request: &RegisterPeer,
    psk_file: &Path,
) -> Result<String, PskCommandError> {
    let reg = relay.register_pq(request).await?;
    let psk = reg.psk.ok_or(PskCommandError::NoPsk)?;
    write_private(psk_file, format!("{}\n", psk.to_base64()).as_bytes()).map_err(|source| {
        PskCommandError::Write {
            path: psk_file.display().to_string(),
            source,
        }
    })?;
    let a = &reg.allocation;
    let mut allowed = "::/0".to_owned();
    let mut addrs = format!("{}/128", a.ipv6);
    if let Some(v4) = a.ipv4 {
        allowed.push_str(",0.0.0.0/0");
        addrs.push_str(&format!(", {v4}/32"));
    }
    let rotate = reg.rotate.map_or(0, |r| r.as_secs());
    Ok(format!(
        "registered {key} (preshared key counter {counter})\n\
         addresses: {addrs}\n\
         preshared key written to {file}\n\
         configure the client (IFACE is its WireGuard interface):\n  \
         wg set IFACE peer {relay} preshared-key {file} endpoint {endpoint} allowed-ips {allowed} persistent-keepalive {keepalive}\n\
         the relay asks for a new key every {rotate} s: run this command again to rotate\n",
        key = a.pubkey,
        counter = reg.counter.unwrap_or_default(),
        file = psk_file.display(),
        relay = a.relay_public_key,
        endpoint = a.relay_endpoint,
        keepalive = a.keepalive,
    ))
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()
}
