//! The protocol's timers: handshake retries, rekeys, keepalives (passive and
//! persistent), session expiry, the cookie gate's counting second, and dropping
//! noise states whose session expired, so idle peers go back to costing nothing.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::device::Device;
use super::session::Sealed;

impl Device {
    /// Runs the timers that are due at `now`. Datagrams they produce wait for
    /// [`Device::poll_transmit`].
    pub fn handle_timeout(&self, now: Instant) {
        let now_ns = self.clock.feed(now);
        if !self.timers_due.is_due(now_ns) {
            return;
        }
        // Cleared first, so a deadline an input lowers while this runs survives.
        self.timers_due.set(None);
        let state = self.state.read();
        let Some(keys) = state.keys.clone() else {
            return;
        };
        keys.reset_gate(now);
        let mut next: Option<u64> = None;
        let mut earliest = |at: u64| next = Some(next.map_or(at, |n: u64| n.min(at)));
        let mut buf = [0u8; 256];
        for peer in state.peers.values() {
            let keepalive_at = peer.keepalive_at();
            let Some(to) = peer.endpoint() else {
                continue;
            };
            let mut guard = peer.noise.lock();
            let keepalive_due = keepalive_at.is_some_and(|t| t <= now_ns);
            if guard.is_none() && !keepalive_due && !peer.kick.load(Ordering::Relaxed) {
                if let Some(t) = keepalive_at {
                    earliest(t);
                }
                continue;
            }
            let noise = guard.get_or_insert_with(|| {
                let psk = *peer.preshared_key.read();
                super::session::NoiseState::new(&keys, &peer.public_key, psk, peer.index, now)
            });
            let kicked = peer.kick.swap(false, Ordering::Relaxed);
            let sent = if kicked || keepalive_due {
                // With a session this is a keepalive; without one it starts a handshake.
                match noise.encapsulate(now, &[], &mut buf) {
                    Ok(Sealed::Datagram(n)) => Some(n),
                    _ => None,
                }
            } else {
                noise.update_timers(now, &mut buf)
            };
            if noise.is_expired(now) {
                // Nothing left in it: the next need makes a new one.
                *guard = None;
            } else if let Some(at) = noise.poll_timeout() {
                earliest(self.clock.ns(at));
            }
            drop(guard);
            if let Some(n) = sent {
                peer.note_sent(n, now_ns);
                self.outbox.push_control(to, &buf[..n]);
            }
            if let Some(t) = peer.keepalive_at() {
                earliest(t);
            }
        }
        if let Some(n) = next {
            self.timers_due.lower(n);
        }
    }

    /// When [`Device::handle_timeout`] or the polls next have work: the earliest of
    /// the protocol's timers and the shaping queues' next release. `None` when
    /// nothing is scheduled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let at = [
            self.timers_due.get(),
            self.egress.due.get(),
            self.ingress.due.get(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        self.clock.instant(at)
    }
}
