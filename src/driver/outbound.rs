//! Link -> encrypt -> UDP: read a batch, feed it, send it, then drain the device.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::gso::SealBuffer;
use super::{Link, Shared};

pub(super) async fn run<L: Link>(shared: Arc<Shared<L>>) {
    let mut reader = shared.link.reader();
    // Answers the device queues for the link (ICMP errors) are written from here.
    let mut writer = shared.link.writer();
    let mut seal = SealBuffer::new();
    let mut rx = shared.socket.subscribe();
    loop {
        let n = match shared.link.read(&mut reader).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                tracing::info!(link = shared.link.name(), error = %e, "link gone");
                shared.closed.send_replace(true);
                return;
            }
            Err(e) => {
                let c = shared
                    .counters
                    .tun_read_errors
                    .fetch_add(1, Ordering::Relaxed);
                if c.is_power_of_two() {
                    tracing::warn!(error = %e, "link read failed");
                }
                continue;
            }
        };
        let now = Instant::now();
        let socket = rx.borrow_and_update().clone();
        seal.seal_and_send(&shared, &socket, now, (0..n).map(|i| L::packet(&reader, i)))
            .await;
        shared.drain_transmit(&socket, now, &mut seal.out).await;
        shared.drain_deliver(now, &mut writer).await;
        shared.rearm();
    }
}
