//! Outbound: a packet from the link is routed to the peer whose allowed IPs hold its
//! destination, checked by the policy, delayed (network emulation), shaped, and encrypted.

use std::time::Instant;

use parking_lot::MutexGuard;

use super::device::{Device, Output, DATA_OVERHEAD, MIN_OUT_BUF};
use super::emulation::{self, Offered};
use super::metrics::DropReason;
use super::peer::PeerRef;
use super::policy::{PacketInfo, Verdict};
use super::session::{NoiseState, Sealed};
use crate::shape::Admit;

impl Device {
    /// Encrypts one IP packet read from the link for the peer that owns its
    /// destination. `out` must hold `packet.len() + DATA_OVERHEAD` and at least
    /// [`MIN_OUT_BUF`] bytes. A packet for an address no peer holds may be answered
    /// (see [`super::Policy::answers_unrouted`]); the answer waits for
    /// [`Device::poll_deliver`].
    pub fn handle_packet<'a>(&self, now: Instant, packet: &[u8], out: &'a mut [u8]) -> Output<'a> {
        if out.len() < MIN_OUT_BUF.max(packet.len() + DATA_OVERHEAD) {
            return self.dropped_now(DropReason::BufferTooSmall);
        }
        let now_ns = self.clock.feed(now);
        let Some(dst) = PacketInfo::destination(packet) else {
            return self.dropped_now(DropReason::Malformed);
        };
        let state = self.state.read();
        let Some(peer) = state.routes.lookup(dst).cloned() else {
            let answer = state
                .policy
                .as_ref()
                .is_some_and(|p| p.answers_unrouted(dst));
            drop(state);
            if answer {
                self.answer_unreachable(packet);
                return Output::Dropped(DropReason::Unallocated);
            }
            return self.dropped_now(DropReason::NoRoute);
        };
        if let Some(policy) = &state.policy {
            let Some(info) = PacketInfo::parse(packet) else {
                return self.dropped_now(DropReason::Malformed);
            };
            if let Verdict::Drop(reason) = policy.check_to_peer(&info) {
                return Output::Dropped(self.counters.policy_drop(reason, &info, now_ns));
            }
        }
        drop(state);
        match self
            .netem_egress
            .offer(&peer, emulation::egress, packet, now_ns, &self.counters)
        {
            Offered::Pass => {}
            Offered::Held => return Output::Consumed,
            Offered::Dropped(reason) => return Output::Dropped(reason),
        }
        self.shape_and_seal(&peer, now, now_ns, packet, out)
    }

    /// Past the emulated delay: the shaper says whether now, then `packet` is
    /// encrypted for `peer`.
    pub(crate) fn shape_and_seal<'a>(
        &self,
        peer: &PeerRef,
        now: Instant,
        now_ns: u64,
        packet: &[u8],
        out: &'a mut [u8],
    ) -> Output<'a> {
        if let Some(shaper) = peer.shaper() {
            match self.egress.offer(peer, &shaper.egress, packet, now_ns) {
                Admit::Now => {}
                Admit::Queued => return Output::Consumed,
                Admit::Dropped => return self.dropped_now(DropReason::RateLimited),
            }
        }
        self.seal_for(peer, now, now_ns, packet, out)
    }

    /// Counts a drop and says so.
    pub(crate) fn dropped_now(&self, reason: DropReason) -> Output<'static> {
        Output::Dropped(self.counters.count(reason))
    }

    /// Counts a packet for an address no peer holds and, within the rate limit,
    /// queues the destination unreachable error that goes back to the link.
    fn answer_unreachable(&self, packet: &[u8]) {
        self.counters.count(DropReason::Unallocated);
        if self.unreachable_limit.check().is_err() {
            return;
        }
        let mut answer = [0u8; 1280];
        if let Some(n) = crate::icmp::destination_unreachable(packet, &mut answer) {
            self.counters
                .unreachable_sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.outbox.push_answer(&answer[..n]);
        }
    }

    /// Encrypts `packet` for `peer` (already routed, checked and shaped).
    pub(crate) fn seal_for<'a>(
        &self,
        peer: &PeerRef,
        now: Instant,
        now_ns: u64,
        packet: &[u8],
        out: &'a mut [u8],
    ) -> Output<'a> {
        if out.len() < MIN_OUT_BUF.max(packet.len() + DATA_OVERHEAD) {
            return self.dropped_now(DropReason::BufferTooSmall);
        }
        let Some(to) = peer.endpoint() else {
            return self.dropped_now(DropReason::NoEndpoint);
        };
        let Some(mut noise) = self.noise_for(peer, now) else {
            return self.dropped_now(DropReason::NoKey);
        };
        let Some(state) = noise.as_mut() else {
            return self.dropped_now(DropReason::NoKey);
        };
        let result = state.encapsulate(now, packet, out);
        self.schedule(state);
        drop(noise);
        match result {
            Ok(Sealed::Datagram(n)) => {
                peer.note_sent(n, now_ns);
                Output::Transmit {
                    to,
                    datagram: &out[..n],
                }
            }
            Ok(Sealed::Queued) => Output::Consumed,
            Err(reason) => self.dropped_now(reason),
        }
    }

    /// `peer`'s noise state, made now if it has none (`None` without a private key).
    pub(crate) fn noise_for<'p>(
        &self,
        peer: &'p PeerRef,
        now: Instant,
    ) -> Option<MutexGuard<'p, Option<NoiseState>>> {
        // Twice at most: a private key change between making and installing means
        // making it again from the new keys.
        for _ in 0..2 {
            {
                let guard = peer.noise.lock();
                if guard.is_some() {
                    return Some(guard);
                }
            }
            // Made without the peer's lock: configuration changes take the table's
            // lock and then the peer's, so the table's lock must never be taken under it.
            let fresh = self.fresh_noise(&self.state.read(), peer, now)?;
            let mut guard = peer.noise.lock();
            if guard.is_some() || self.install_noise(peer, &mut guard, fresh) {
                return Some(guard);
            }
        }
        None
    }
}
