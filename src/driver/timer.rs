//! The one timer task: sleeps until the device's next deadline (protocol timers,
//! shaping releases), runs it, drains what it produced. Feeds that make the
//! deadline earlier wake it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{Link, Shared};

pub(super) async fn run<L: Link>(shared: Arc<Shared<L>>) {
    let mut writer = shared.link.writer();
    let mut buf = vec![0u8; shared.datagram_room()];
    loop {
        let now = Instant::now();
        shared.device.handle_timeout(now);
        {
            // Held only while sending: a rebind (`wg set listen-port`) closes the old
            // socket once no task holds it, and this task may sleep for minutes.
            let socket = shared.socket.borrow().clone();
            shared.drain_transmit(&socket, now, &mut buf).await;
        }
        shared.drain_deliver(now, &mut writer).await;
        let next = shared.device.poll_timeout();
        shared
            .armed
            .store(next.map_or(u64::MAX, |t| shared.ns(t)), Ordering::Release);
        match next {
            Some(t) if t > now => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t.into()) => {}
                    _ = shared.wake.notified() => {}
                }
            }
            // Due already (work came in while draining): go round at once.
            Some(_) => tokio::task::yield_now().await,
            None => shared.wake.notified().await,
        }
    }
}
