//! The device's shaping queues: which peers have packets waiting in one direction,
//! and when the first of them may go. The packets themselves wait in the peers'
//! lanes (`crate::shape`); the polls release them when `now` reaches their time.

use parking_lot::Mutex;

use super::clock::{nanos, Deadline};
use super::peer::PeerRef;
use crate::shape::{Admit, Lane, Next, Shaper};

/// One direction's lanes with packets, for every peer.
#[derive(Default)]
pub(crate) struct ShapeQueue {
    listed: Mutex<Vec<PeerRef>>,
    /// When the earliest listed packet may go (device clock, ns).
    pub(crate) due: Deadline,
}

/// Picks one direction of a peer's shaper.
pub(crate) type Side = fn(&Shaper) -> &Lane;

pub(crate) fn egress(s: &Shaper) -> &Lane {
    &s.egress
}

pub(crate) fn ingress(s: &Shaper) -> &Lane {
    &s.ingress
}

impl ShapeQueue {
    /// Offers `packet` to `peer`'s lane; a queued packet lists the lane so the
    /// polls look at it.
    pub(crate) fn offer(&self, peer: &PeerRef, lane: &Lane, packet: &[u8], now_ns: u64) -> Admit {
        let admit = lane.offer(packet);
        if admit == Admit::Queued && lane.list() {
            let mut listed = self.listed.lock();
            listed.push(peer.clone());
            // The lane computes the exact wait at the next poll.
            self.due.lower(now_ns);
        }
        admit
    }

    /// The first packet whose time has come, with its peer and lane; hand the
    /// buffer back to the lane with [`Lane::recycle`]. When none is due, notes when
    /// the next one will be.
    pub(crate) fn next_due(
        &self,
        now_ns: u64,
        side: Side,
    ) -> Option<(PeerRef, std::sync::Arc<Shaper>, Vec<u8>)> {
        if !self.due.is_due(now_ns) {
            return None;
        }
        let mut listed = self.listed.lock();
        let mut wait: Option<u64> = None;
        let mut i = 0;
        while i < listed.len() {
            let Some(shaper) = listed[i].shaper() else {
                listed.swap_remove(i);
                continue;
            };
            let lane = side(&shaper);
            match lane.next() {
                Next::Due(packet) => return Some((listed[i].clone(), shaper, packet)),
                Next::Wait(w) => {
                    let at = now_ns.saturating_add(nanos(w));
                    wait = Some(wait.map_or(at, |x| x.min(at)));
                    i += 1;
                }
                Next::Empty => {
                    lane.unlist();
                    // A packet queued between `next` and `unlist` saw the lane listed
                    // and did not list it again: keep this entry for it.
                    if lane.queued_bytes() > 0 && lane.list() {
                        wait = Some(now_ns);
                        i += 1;
                    } else {
                        listed.swap_remove(i);
                    }
                }
            }
        }
        self.due.set(wait);
        None
    }
}
