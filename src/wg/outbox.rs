//! What the device has to send or deliver beyond an input's immediate result, and
//! the polls that drain it: timer datagrams, packets a new session releases, delayed
//! and shaped packets whose time came, and ICMP answers. Each poll is a few atomic loads when
//! there is nothing, because the driver drains after every batch.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use super::device::{Device, Output, Transmit};
use super::emulation;
use super::peer::PeerRef;
use super::shaping;

const CONTROL: u8 = 1;
const RELEASING: u8 = 2;
const ANSWERS: u8 = 4;

/// Small owned buffers, reused so the steady state does not allocate.
struct Copies<T> {
    items: VecDeque<(T, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
}

impl<T> Default for Copies<T> {
    fn default() -> Self {
        Copies {
            items: VecDeque::new(),
            spare: Vec::new(),
        }
    }
}

impl<T> Copies<T> {
    const MAX: usize = 4096;

    fn push(&mut self, tag: T, bytes: &[u8]) -> bool {
        if self.items.len() >= Self::MAX {
            return false;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        self.items.push_back((tag, buf));
        true
    }

    /// Copies the first item into `out` if it fits (one that does not is dropped).
    fn pop_into(&mut self, out: &mut [u8]) -> Option<(T, usize)> {
        while let Some((tag, buf)) = self.items.pop_front() {
            let n = buf.len();
            let fits = out.get_mut(..n).map(|dst| dst.copy_from_slice(&buf));
            if self.spare.len() < 64 {
                self.spare.push(buf);
            }
            if fits.is_some() {
                return Some((tag, n));
            }
        }
        None
    }
}

#[derive(Default)]
pub(crate) struct Outbox {
    /// Which of the queues below may hold something.
    pending: AtomicU8,
    /// Datagrams the timers produced (keepalives, handshake initiations).
    control: Mutex<Copies<SocketAddr>>,
    /// Peers whose new session may release packets that waited for it.
    releasing: Mutex<VecDeque<PeerRef>>,
    /// ICMP answers for the link.
    answers: Mutex<Copies<()>>,
}

impl Outbox {
    pub(crate) fn push_control(&self, to: SocketAddr, datagram: &[u8]) {
        let mut q = self.control.lock();
        if q.push(to, datagram) {
            self.pending.fetch_or(CONTROL, Ordering::Release);
        }
    }

    pub(crate) fn push_answer(&self, packet: &[u8]) {
        let mut q = self.answers.lock();
        if q.push((), packet) {
            self.pending.fetch_or(ANSWERS, Ordering::Release);
        }
    }

    pub(crate) fn push_releasing(&self, peer: &PeerRef) {
        if !peer.releasing.swap(true, Ordering::AcqRel) {
            self.releasing.lock().push_back(peer.clone());
            self.pending.fetch_or(RELEASING, Ordering::Release);
        }
    }

    fn has(&self, what: u8) -> bool {
        self.pending.load(Ordering::Acquire) & what != 0
    }

    /// Clears `what` (call with its queue's lock held and the queue empty).
    fn settle(&self, what: u8) {
        self.pending.fetch_and(!what, Ordering::Release);
    }
}

impl Device {
    /// The next datagram to send, written into `out` (at least the link's MTU plus
    /// [`super::DATA_OVERHEAD`]): timer datagrams first, then packets released by a
    /// new session, then packets an emulated delay held, then shaped packets whose
    /// time has come. Call until `None` after
    /// every batch of inputs and whenever [`Device::poll_timeout`] is reached.
    pub fn poll_transmit(&self, now: Instant, out: &mut [u8]) -> Option<Transmit> {
        let now_ns = self.clock.feed(now);
        let outbox = &self.outbox;
        if outbox.has(CONTROL) {
            let mut q = outbox.control.lock();
            match q.pop_into(out) {
                Some((to, len)) => return Some(Transmit { to, len }),
                None => outbox.settle(CONTROL),
            }
        }
        if outbox.has(RELEASING) {
            if let Some(t) = self.poll_released(now, now_ns, out) {
                return Some(t);
            }
        }
        while let Some((peer, packet)) = self.netem_egress.next_due(now_ns, emulation::egress) {
            let result = match self.shape_and_seal(&peer, now, now_ns, &packet, out) {
                Output::Transmit { to, datagram } => Some(Transmit {
                    to,
                    len: datagram.len(),
                }),
                _ => None,
            };
            emulation::recycle(&peer, emulation::egress, packet);
            if result.is_some() {
                return result;
            }
        }
        while let Some((peer, shaper, packet)) = self.egress.next_due(now_ns, shaping::egress) {
            let result = match self.seal_for(&peer, now, now_ns, &packet, out) {
                Output::Transmit { to, datagram } => Some(Transmit {
                    to,
                    len: datagram.len(),
                }),
                _ => None,
            };
            shaper.egress.recycle(packet);
            if result.is_some() {
                return result;
            }
        }
        None
    }

    fn poll_released(&self, now: Instant, now_ns: u64, out: &mut [u8]) -> Option<Transmit> {
        let mut q = self.outbox.releasing.lock();
        while let Some(peer) = q.front() {
            if let Some(to) = peer.endpoint() {
                let sent = peer.noise.lock().as_mut().and_then(|n| {
                    let sent = n.poll_queued(now, out);
                    self.schedule(n);
                    sent
                });
                if let Some(len) = sent {
                    peer.note_sent(len, now_ns);
                    return Some(Transmit { to, len });
                }
            }
            peer.releasing.store(false, Ordering::Release);
            q.pop_front();
        }
        self.outbox.settle(RELEASING);
        None
    }

    /// The next packet for the link (TUN device or userspace stack), written into
    /// `out`; its length. ICMP answers first, then packets an emulated delay held,
    /// then shaped packets from peers whose time has come. Call until `None` after every batch of inputs and whenever
    /// [`Device::poll_timeout`] is reached.
    pub fn poll_deliver(&self, now: Instant, out: &mut [u8]) -> Option<usize> {
        let now_ns = self.clock.feed(now);
        if self.outbox.has(ANSWERS) {
            let mut q = self.outbox.answers.lock();
            match q.pop_into(out) {
                Some(((), len)) => return Some(len),
                None => self.outbox.settle(ANSWERS),
            }
        }
        while let Some((peer, packet)) = self.netem_ingress.next_due(now_ns, emulation::ingress) {
            let delivered = match self.shape_in(&peer, &packet, now_ns) {
                Output::Deliver(p) => {
                    let n = p.len();
                    let fits = out.get_mut(..n).map(|dst| dst.copy_from_slice(p));
                    if fits.is_none() {
                        self.counters.count(super::DropReason::BufferTooSmall);
                    }
                    fits.map(|()| n)
                }
                _ => None,
            };
            emulation::recycle(&peer, emulation::ingress, packet);
            if delivered.is_some() {
                return delivered;
            }
        }
        while let Some((_, shaper, packet)) = self.ingress.next_due(now_ns, shaping::ingress) {
            let n = packet.len();
            let fits = out.get_mut(..n).map(|dst| dst.copy_from_slice(&packet));
            shaper.ingress.recycle(packet);
            if fits.is_some() {
                return Some(n);
            }
            self.counters.count(super::DropReason::BufferTooSmall);
        }
        None
    }
}
