//! The control surface of a running driver: configuration changes that touch the
//! socket (listen port, fwmark) as well as the device, and the counters.

use std::fmt::Write as _;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::{Link, ListenPort, Shared};
use crate::udp::UdpTransport;
use crate::wg::{DeviceControl, DeviceInfo, DeviceUpdate, UpdateError};

impl<L: Link> ListenPort for Shared<L> {
    fn listen_port(&self) -> u16 {
        self.socket.borrow().local_port()
    }
}

impl<L: Link> DeviceControl for Shared<L> {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            private_key: self.device.private_key(),
            listen_port: self.socket.borrow().local_port(),
            fwmark: self.device.fwmark(),
            peers: self.device.peers(Instant::now(), SystemTime::now()),
        }
    }

    fn update(&self, update: DeviceUpdate) -> Result<(), UpdateError> {
        let _guard = self.rebind.lock();
        let mark = update.fwmark.unwrap_or_else(|| self.device.fwmark());
        let mark_error = |e: io::Error| UpdateError::Invalid(format!("fwmark {mark}: {e}"));
        if let Some(port) = update.listen_port {
            if port != self.socket.borrow().local_port() || port == 0 {
                let socket = UdpTransport::bind(port).map_err(|e| UpdateError::Port {
                    port,
                    reason: e.to_string(),
                })?;
                // A new socket keeps the device's mark (or takes the new one).
                if mark != 0 {
                    socket.set_fwmark(mark).map_err(mark_error)?;
                }
                tracing::info!(listen_port = socket.local_port(), "listen port changed");
                self.sources.clear();
                self.socket.send_replace(Arc::new(socket));
            }
        }
        if update.fwmark.is_some() {
            self.socket.borrow().set_fwmark(mark).map_err(mark_error)?;
        }
        self.device.apply(&update)?;
        // A change may have made timers due (a keepalive turned on, a new key).
        self.rearm();
        Ok(())
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        self.device
            .write_metrics(Instant::now(), SystemTime::now(), &mut out);
        let c = &self.counters;
        let _ = writeln!(
            out,
            "# HELP sidecar_io_errors_total Failed reads and writes on the TUN device and the UDP socket."
        );
        let _ = writeln!(out, "# TYPE sidecar_io_errors_total counter");
        for (op, v) in [
            ("tun_read", &c.tun_read_errors),
            ("tun_write", &c.tun_write_errors),
            ("udp_send", &c.udp_send_errors),
            ("udp_recv", &c.udp_recv_errors),
        ] {
            let _ = writeln!(
                out,
                "sidecar_io_errors_total{{op=\"{op}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP sidecar_offload Whether the data path uses an offload (1) or moves one packet per system call (0)."
        );
        let _ = writeln!(out, "# TYPE sidecar_offload gauge");
        let socket = self.socket.borrow().clone();
        for (kind, on) in [
            ("tun", self.link.offload()),
            ("udp_gso", socket.max_gso_segments() > 1),
            ("udp_gro", socket.gro_segments() > 1),
        ] {
            let _ = writeln!(out, "sidecar_offload{{kind=\"{kind}\"}} {}", u8::from(on));
        }
        out
    }
}
