//! The protocol's timers: handshake retries, rekeys, keepalives (passive and
//! persistent), session expiry, and dropping noise states whose session expired, so
//! idle peers go back to costing nothing. Only the peers on the device's live list
//! (a noise state, a persistent keepalive or a kick) are visited, and the deadline is
//! the earliest any of them needs.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::device::Device;
use super::peer::PeerRef;

/// Datagrams one peer's timers may produce in one run (a retry, a keepalive and a
/// persistent keepalive at most in practice); a bound, so a timer that would always
/// be due cannot hold the run.
const MAX_PER_PEER: usize = 8;

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
        keys.reset_gate();
        let mut next: Option<u64> = None;
        let mut earliest = |at: u64| next = Some(next.map_or(at, |n: u64| n.min(at)));
        let mut buf = [0u8; 256];
        let live: Vec<PeerRef> = self.live.lock().values().cloned().collect();
        for peer in live {
            if state.by_index.get(&peer.index) != Some(&peer) {
                // Removed from the table since it went on the list.
                let mut list = self.live.lock();
                if list.get(&peer.index) == Some(&peer) {
                    list.remove(&peer.index);
                }
                continue;
            }
            let keepalive_at = peer.keepalive_at();
            let Some(to) = peer.endpoint() else {
                // Nowhere to send anything: wait for an endpoint.
                match keepalive_at {
                    Some(t) => earliest(t),
                    None => {
                        // Under the peer's lock, so a state made meanwhile keeps it on.
                        let guard = peer.noise.lock();
                        if guard.is_none() {
                            self.live.lock().remove(&peer.index);
                        }
                    }
                }
                continue;
            };
            let mut guard = peer.noise.lock();
            let keepalive_due = keepalive_at.is_some_and(|t| t <= now_ns);
            let kicked = peer.kick.load(Ordering::Relaxed);
            if guard.is_none() && !keepalive_due && !kicked {
                match keepalive_at {
                    Some(t) => earliest(t),
                    None => {
                        // Nothing left to do for it: off the list until it needs one.
                        self.live.lock().remove(&peer.index);
                    }
                }
                continue;
            }
            if guard.is_none() {
                let Some(fresh) = self.fresh_noise(&state, &peer, now) else {
                    continue;
                };
                if !self.install_noise(&peer, &mut guard, fresh) {
                    continue;
                }
            }
            let Some(noise) = guard.as_mut() else {
                continue;
            };
            peer.kick.store(false, Ordering::Relaxed);
            let mut sent = 0usize;
            if kicked || keepalive_due {
                // With a session this is a keepalive; without one it starts a handshake.
                if let Some(n) = noise.keepalive(now, &mut buf) {
                    self.outbox.push_control(to, &buf[..n]);
                    sent += n;
                }
            }
            for _ in 0..MAX_PER_PEER {
                let Some(n) = noise.handle_timeout(now, &mut buf) else {
                    break;
                };
                self.outbox.push_control(to, &buf[..n]);
                sent += n;
            }
            if noise.is_expired(now) {
                // Nothing left in it: the next need makes a new one.
                *guard = None;
                if peer.keepalive_at().is_none() {
                    self.live.lock().remove(&peer.index);
                }
            } else if let Some(at) = noise.poll_timeout() {
                earliest(self.clock.ns(at));
            }
            drop(guard);
            if sent > 0 {
                peer.note_sent(sent, now_ns);
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
    /// the protocol's timers and the next release of the shaping queues and the
    /// emulated delay lines. `None` when
    /// nothing is scheduled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let at = [
            self.timers_due.get(),
            self.egress.due.get(),
            self.ingress.due.get(),
            self.netem_egress.due.get(),
            self.netem_ingress.due.get(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        self.clock.instant(at)
    }
}
