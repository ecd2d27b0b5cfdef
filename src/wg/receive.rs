//! Inbound: a datagram from the network is routed to its peer (by receiver index,
//! or by the initiator's static key for a handshake initiation), decrypted, and the
//! packet inside checked against the peer's allowed IPs, the policy and the shaper.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::clock::nanos;
use super::device::{Device, Output, MIN_OUT_BUF};
use super::emulation::{self, Offered};
use super::metrics::DropReason;
use super::peer::PeerRef;
use super::policy::{PacketInfo, Verdict};
use super::session::{Gate, Opened};
use crate::shape::Admit;

/// The cookie gate counts handshakes per second; its count must be reset within a
/// second of a handshake even when nothing else needs the timers.
const GATE_PERIOD: Duration = Duration::from_secs(1);

/// The WireGuard message types (whitepaper section 5.4), by their fixed layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Message {
    Initiation,
    Response { receiver: u32 },
    CookieReply { receiver: u32 },
    Data { receiver: u32 },
}

impl Message {
    fn parse(datagram: &[u8]) -> Option<Message> {
        let header = datagram.get(..4)?;
        if header[1..4] != [0, 0, 0] {
            return None;
        }
        let word = |at: usize| {
            datagram
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        match (header[0], datagram.len()) {
            (1, 148) => Some(Message::Initiation),
            (2, 92) => Some(Message::Response { receiver: word(8)? }),
            (3, 64) => Some(Message::CookieReply { receiver: word(4)? }),
            (4, 32..) => Some(Message::Data { receiver: word(4)? }),
            _ => None,
        }
    }
}

impl Device {
    /// Handles one datagram from the network. `out` must be at least as long as
    /// `datagram` and at least [`MIN_OUT_BUF`] bytes. After a completed handshake,
    /// packets that waited for it come from [`Device::poll_transmit`].
    pub fn handle_datagram<'a>(
        &self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Output<'a> {
        if out.len() < MIN_OUT_BUF.max(datagram.len()) {
            return self.dropped_now(DropReason::BufferTooSmall);
        }
        let now_ns = self.clock.feed(now);
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        let Some(message) = Message::parse(datagram) else {
            return self.dropped_now(DropReason::Malformed);
        };
        let state = self.state.read();
        let Some(keys) = &state.keys else {
            return self.dropped_now(DropReason::NoKey);
        };
        let by_index = |receiver: u32| state.by_index.get(&(receiver >> 8));
        let mut initiation = None;
        let peer = match message {
            Message::Data { receiver } | Message::CookieReply { receiver } => by_index(receiver),
            Message::Initiation | Message::Response { .. } => {
                if keys.needs_gate_reset() {
                    self.timers_due
                        .lower(now_ns.saturating_add(nanos(GATE_PERIOD)));
                }
                // Handshakes pass the gate first: under load it answers with a cookie
                // reply instead of spending a Diffie-Hellman on an unproven source.
                match keys.check_handshake(now, from, datagram, out) {
                    Gate::Pass => {}
                    Gate::CookieReply(n) => {
                        self.counters.cookie_replies.fetch_add(1, Ordering::Relaxed);
                        return Output::Transmit {
                            to: from,
                            datagram: &out[..n],
                        };
                    }
                    Gate::Reject(reason) => return self.dropped_now(reason),
                }
                match message {
                    Message::Response { receiver } => by_index(receiver),
                    _ => match keys.open_initiation(datagram) {
                        Ok(opened) => {
                            let peer = state.peers.get(&opened.peer());
                            initiation = Some(opened);
                            peer
                        }
                        Err(reason) => return self.dropped_now(reason),
                    },
                }
            }
        };
        let Some(peer) = peer.cloned() else {
            return self.dropped_now(DropReason::UnknownPeer);
        };
        let stamp = initiation.as_ref().and_then(|i| i.timestamp());
        if stamp.is_some_and(|t| !peer.initiation_is_newer(&t)) {
            // A replay, even after the peer's state was dropped: refused before any
            // state is made or any response computed.
            return self.dropped_now(DropReason::Unauthenticated);
        }
        // Only an initiation may start a noise state; anything else needs a session.
        let fresh = match &initiation {
            Some(_) if !peer.has_noise_state() => self.fresh_noise(&state, &peer, now),
            _ => None,
        };
        drop(state);

        let mut guard = peer.noise.lock();
        if guard.is_none() {
            let installed = fresh.is_some_and(|f| self.install_noise(&peer, &mut guard, f));
            if !installed {
                return self.dropped_now(DropReason::Protocol);
            }
        }
        let Some(noise) = guard.as_mut() else {
            return self.dropped_now(DropReason::Protocol);
        };
        let before = noise.last_handshake(now);
        let result = match &initiation {
            Some(i) => noise.accept_initiation(now, from.ip(), i, datagram, out),
            None => noise.decapsulate(now, from.ip(), datagram, out),
        };
        // A handshake is complete for the initiator on the response, for the responder
        // only on the first data under the new keys: answering an initiation is not one.
        let after = noise.last_handshake(now);
        let completed = after.is_some() && (before.is_none() || after < before);
        self.schedule(noise);
        if let (Ok(_), Some(t)) = (&result, stamp) {
            peer.note_initiation(t);
        }
        drop(guard);
        if completed {
            peer.note_handshake(now_ns);
        }
        let opened = match result {
            Ok(o) => o,
            Err(reason) => return self.dropped_now(reason),
        };
        // Authenticated from here on: count it, and follow the peer if it moved.
        peer.rx_bytes
            .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        if !matches!(message, Message::CookieReply { .. }) {
            peer.set_endpoint(from);
        }
        let out: &'a [u8] = out;
        match opened {
            Opened::Handshake(n) => {
                peer.note_sent(n, now_ns);
                self.outbox.push_releasing(&peer);
                Output::Transmit {
                    to: from,
                    datagram: &out[..n],
                }
            }
            Opened::Packet { start, len, src } => {
                self.check_source(now_ns, &peer, src, &out[start..start + len])
            }
            Opened::Consumed => Output::Consumed,
        }
    }

    /// Cryptokey routing, inbound half: a peer may only send from its allowed IPs.
    /// Then the policy, if any, says whether the packet may go on, and the shaper
    /// whether now.
    fn check_source<'a>(
        &self,
        now_ns: u64,
        peer: &PeerRef,
        src: IpAddr,
        packet: &'a [u8],
    ) -> Output<'a> {
        // The noise layer cuts the plaintext at the header's length field without
        // checking that this length covers the header itself: a peer could otherwise
        // have a runt, even empty, packet written to the link.
        if !holds_whole_ip_header(packet) {
            return self.dropped_now(DropReason::Malformed);
        }
        let state = self.state.read();
        if state.routes.lookup(src) != Some(peer) {
            drop(state);
            peer.rx_dropped_source.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer.public_key, %src, "dropped packet from a source outside the peer's allowed IPs");
            return self.dropped_now(DropReason::SourceNotAllowed);
        }
        if let Some(policy) = &state.policy {
            let Some(info) = PacketInfo::parse(packet) else {
                return self.dropped_now(DropReason::Malformed);
            };
            if let Verdict::Drop(reason) = policy.check_from_peer(&info) {
                return Output::Dropped(self.counters.policy_drop(reason, &info, now_ns));
            }
        }
        drop(state);
        match self
            .netem_ingress
            .offer(peer, emulation::ingress, packet, now_ns, &self.counters)
        {
            Offered::Pass => {}
            Offered::Held => return Output::Consumed,
            Offered::Dropped(reason) => return Output::Dropped(reason),
        }
        self.shape_in(peer, packet, now_ns)
    }

    /// Past the emulated delay: the shaper says whether `packet` goes to the link now.
    pub(crate) fn shape_in<'a>(&self, peer: &PeerRef, packet: &'a [u8], now_ns: u64) -> Output<'a> {
        if let Some(shaper) = peer.shaper() {
            match self.ingress.offer(peer, &shaper.ingress, packet, now_ns) {
                Admit::Now => {}
                Admit::Queued => return Output::Consumed,
                Admit::Dropped => return self.dropped_now(DropReason::RateLimited),
            }
        }
        Output::Deliver(packet)
    }
}

/// Whether a decrypted packet (already cut to its length field) is an IP packet
/// whose header fits in it and agrees with its length.
fn holds_whole_ip_header(packet: &[u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => smoltcp::wire::Ipv4Packet::new_checked(packet).is_ok(),
        Some(6) => smoltcp::wire::Ipv6Packet::new_checked(packet).is_ok(),
        _ => false,
    }
}
