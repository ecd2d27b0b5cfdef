//! UDP -> decrypt -> link: receive a batch, feed each datagram, write the packets,
//! then drain the device.

use std::io::IoSliceMut;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use quinn_udp::RecvMeta;

use super::{send, Link, Shared};
use crate::udp::RECV_BATCH;
use crate::wg::{Output, MIN_OUT_BUF};

/// Room for one GRO batch from the socket.
const RECV_BUF: usize = 65_536;

pub(super) async fn run<L: Link>(shared: Arc<Shared<L>>) {
    let mut rx = shared.socket.subscribe();
    let mut socket = rx.borrow_and_update().clone();
    let mut storage: Vec<Vec<u8>> = (0..RECV_BATCH).map(|_| vec![0u8; RECV_BUF]).collect();
    let mut meta = vec![RecvMeta::default(); RECV_BATCH];
    let mut writer = shared.link.writer();
    let mut scratch = vec![0u8; shared.datagram_room()];
    loop {
        let n = {
            let mut bufs = storage.iter_mut();
            let mut slices: [IoSliceMut<'_>; RECV_BATCH] = std::array::from_fn(|_| {
                IoSliceMut::new(bufs.next().map_or(&mut [][..], |b| &mut b[..]))
            });
            tokio::select! {
                r = socket.recv(&mut slices, &mut meta) => r,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    socket = rx.borrow_and_update().clone();
                    continue;
                }
            }
        };
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                let c = shared
                    .counters
                    .udp_recv_errors
                    .fetch_add(1, Ordering::Relaxed);
                if c.is_power_of_two() {
                    tracing::warn!(error = %e, "UDP receive failed");
                }
                continue;
            }
        };
        let now = Instant::now();
        for (m, buf) in meta.iter().zip(&storage).take(n) {
            let stride = m.stride.max(1);
            // One GRO batch has one source and destination: learning our address
            // from its first authenticated datagram covers the rest.
            let mut learn = m.dst_ip;
            for datagram in buf[..m.len].chunks(stride) {
                let slot = L::slot(&mut writer, datagram.len().max(MIN_OUT_BUF));
                let base = slot.as_ptr() as usize;
                let out = shared.device.handle_datagram(now, m.addr, datagram, slot);
                if !matches!(out, Output::Dropped(_)) {
                    if let Some(local) = learn.take() {
                        shared.sources.learn(m.addr, local);
                    }
                }
                match out {
                    Output::Deliver(packet) => {
                        let (start, len) = (packet.as_ptr() as usize - base, packet.len());
                        let r = shared.link.commit(&mut writer, start, len).await;
                        shared.count_write(r);
                    }
                    Output::Transmit { to, datagram } => {
                        send(&shared, &socket, to, datagram, None).await;
                    }
                    Output::Consumed | Output::Dropped(_) => {}
                }
            }
        }
        // The batch goes to the link at once: nothing waits for a later batch.
        let r = shared.link.flush(&mut writer).await;
        shared.count_write(r);
        shared.drain_transmit(&socket, now, &mut scratch).await;
        shared.drain_deliver(now, &mut writer).await;
        shared.rearm();
    }
}
