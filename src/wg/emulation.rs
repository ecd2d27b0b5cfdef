//! The device's network emulation queues: packets a peer's delay line holds
//! (`crate::netem`), which peers have some waiting in one direction, and when the
//! first of them is due. The polls release them when `now` reaches their time, into
//! the shaper and then the network or the link, as if the delay sat on the wire
//! before the rate limit.

use std::sync::OnceLock;

use parking_lot::Mutex;

use super::clock::Deadline;
use super::metrics::DropReason;
use super::peer::{Peer, PeerRef};
use crate::key::Key;
use crate::netem::{Conditions, DelayLine, Emulation, Verdict};

/// One direction's delay line, and whether the device's list holds its peer.
pub(crate) struct Line {
    line: DelayLine,
    listed: bool,
}

/// Both directions of a peer, each under its own lock, so encrypting and
/// decrypting never wait for each other.
pub(crate) struct Lines {
    egress: Mutex<Line>,
    ingress: Mutex<Line>,
}

/// One peer's emulation: nothing until conditions are first given (one pointer in
/// the peer, and no lock on the data path), then kept for the peer's life.
#[derive(Default)]
pub(crate) struct PeerNetem(OnceLock<Box<Lines>>);

/// Picks one direction of a peer's emulation.
pub(crate) type Side = fn(&Lines) -> &Mutex<Line>;

pub(crate) fn egress(l: &Lines) -> &Mutex<Line> {
    &l.egress
}

pub(crate) fn ingress(l: &Lines) -> &Mutex<Line> {
    &l.ingress
}

impl PeerNetem {
    /// Gives both directions `conditions` (`None` clears them). Packets already
    /// waiting keep their release times; once a cleared line is empty every packet
    /// passes at once. The random draws start from a seed taken from both ends'
    /// keys (see [`seed`]), so a tunnel sees the same losses and delays on every
    /// run.
    pub(crate) fn set(&self, own: Option<&Key>, peer: &Key, conditions: Option<Conditions>) {
        let wanted = conditions.unwrap_or(Conditions::NONE);
        let lines = match self.0.get() {
            Some(lines) => lines,
            None if wanted.is_none() => return,
            None => self.0.get_or_init(|| {
                let Emulation { egress, ingress } = Emulation::new(wanted, seed(own, peer));
                let line = |line| {
                    Mutex::new(Line {
                        line,
                        listed: false,
                    })
                };
                Box::new(Lines {
                    egress: line(egress),
                    ingress: line(ingress),
                })
            }),
        };
        lines.egress.lock().line.set_conditions(wanted);
        lines.ingress.lock().line.set_conditions(wanted);
    }

    /// The conditions in force (the same both ways), if any.
    pub(crate) fn conditions(&self) -> Option<Conditions> {
        self.0
            .get()
            .map(|l| l.egress.lock().line.conditions())
            .filter(|c| !c.is_none())
    }

    fn side(&self, side: Side) -> Option<&Mutex<Line>> {
        self.0.get().map(|l| side(l))
    }
}

/// The emulation's seed for the tunnel between `own` and `peer`: every byte of
/// both keys goes in. Many devices share one peer (every container an agent serves
/// talks to the same relay), so a seed from the peer's key alone would give all of
/// them the same losses at the same packets.
pub(crate) fn seed(own: Option<&Key>, peer: &Key) -> u64 {
    let own = own.map_or([0; 32], |k| k.0);
    own.chunks_exact(8)
        .chain(peer.0.chunks_exact(8))
        .fold(0, |acc: u64, chunk| {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            splitmix64(acc ^ word)
        })
}

/// SplitMix64's finaliser: spreads every input bit over the whole output.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How early a held packet may leave. Drivers wake on tokio's timer, which rounds
/// every deadline up to its next 1 ms tick; asking for half a tick early centres the
/// actual release on the wanted one (within ±0.5 ms plus the wake-up's own latency)
/// instead of adding up to 1 ms to each direction's delay.
pub(crate) const RELEASE_SLACK_NS: u64 = 500_000;

/// What became of an offered packet.
pub(crate) enum Offered {
    /// Not delayed and not lost: it goes on now.
    Pass,
    /// A copy waits in the delay line.
    Held,
    /// Lost or the line was full (already counted).
    Dropped(DropReason),
}

/// One direction's delay lines with packets, for every peer.
#[derive(Default)]
pub(crate) struct NetemQueue {
    listed: Mutex<Vec<PeerRef>>,
    /// When the earliest listed packet is due (device clock, ns).
    pub(crate) due: Deadline,
}

impl NetemQueue {
    /// Offers `packet` to `peer`'s line on `side`; a packet that waits lists the
    /// peer and brings the deadline forward to the line's next release.
    pub(crate) fn offer(
        &self,
        peer: &PeerRef,
        side: Side,
        packet: &[u8],
        now_ns: u64,
        counters: &super::metrics::Counters,
    ) -> Offered {
        let Some(line) = peer.netem.side(side) else {
            return Offered::Pass;
        };
        let mut l = line.lock();
        match l.line.offer(now_ns, packet) {
            Verdict::Pass => Offered::Pass,
            Verdict::Lost => Offered::Dropped(counters.count(DropReason::EmulatedLoss)),
            Verdict::Full => Offered::Dropped(counters.count(DropReason::EmulationFull)),
            Verdict::Delayed => {
                let list = !std::mem::replace(&mut l.listed, true);
                let next = l.line.next_release();
                // The list's lock is never taken under a line's: the polls take
                // them the other way round.
                drop(l);
                if list {
                    self.listed.lock().push(peer.clone());
                }
                if let Some(at) = next {
                    self.due.lower(at.saturating_sub(RELEASE_SLACK_NS));
                }
                Offered::Held
            }
        }
    }

    /// The first packet whose time has come, with its peer; hand the buffer back
    /// with [`recycle`]. When none is due, notes when the next one will be.
    pub(crate) fn next_due(&self, now_ns: u64, side: Side) -> Option<(PeerRef, Vec<u8>)> {
        if !self.due.is_due(now_ns) {
            return None;
        }
        let release_ns = now_ns + RELEASE_SLACK_NS;
        // Cleared first and only ever lowered below, so a release an offer brings
        // forward while this runs is kept.
        self.due.set(None);
        let mut listed = self.listed.lock();
        let mut wait: Option<u64> = None;
        let mut i = 0;
        while i < listed.len() {
            let peer = listed[i].clone();
            let Some(line) = peer.netem.side(side) else {
                listed.swap_remove(i);
                continue;
            };
            let mut l = line.lock();
            if let Some(packet) = l.line.pop_due(release_ns) {
                drop(l);
                // More may be due: the next call looks again.
                self.due.lower(now_ns);
                return Some((peer, packet));
            }
            match l.line.next_release() {
                Some(at) => {
                    wait = Some(wait.map_or(at, |w| w.min(at)));
                    i += 1;
                }
                None => {
                    // Under the line's lock: an offer from now on lists it again.
                    l.listed = false;
                    drop(l);
                    listed.swap_remove(i);
                }
            }
        }
        if let Some(at) = wait {
            self.due.lower(at.saturating_sub(RELEASE_SLACK_NS));
        }
        None
    }
}

/// Hands a released buffer back to `peer`'s line on `side` for reuse.
pub(crate) fn recycle(peer: &Peer, side: Side, buf: Vec<u8>) {
    if let Some(line) = peer.netem.side(side) {
        line.lock().line.recycle(buf);
    }
}
