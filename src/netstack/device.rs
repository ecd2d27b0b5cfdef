//! The smoltcp side of the packet queues.
//!
//! The driver hands the interface one inbound packet at a time (so it can look at a
//! SYN before smoltcp does) and collects outbound packets locally, moving them to the
//! shared output queue once per round.

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Outbound packets of one driver round, bounded by the room left in the output queue.
#[derive(Default)]
pub(super) struct TxQueue {
    pub(super) packets: Vec<Vec<u8>>,
    /// How many more packets the output queue can take this round.
    pub(super) budget: usize,
    /// Something was refused for lack of room.
    pub(super) exhausted: bool,
}

impl TxQueue {
    /// Queues a packet built outside smoltcp; false when there is no room.
    pub(super) fn push(&mut self, packet: Vec<u8>) -> bool {
        if self.budget == 0 {
            self.exhausted = true;
            return false;
        }
        self.budget -= 1;
        self.packets.push(packet);
        true
    }
}

pub(super) struct StackDevice {
    /// The packet for the next `poll_ingress_single`.
    pub(super) rx: Option<Vec<u8>>,
    pub(super) tx: TxQueue,
    /// Replies smoltcp produced while the output queue was full.
    pub(super) tx_dropped: u64,
    mtu: usize,
}

impl StackDevice {
    pub(super) fn new(mtu: usize) -> StackDevice {
        StackDevice {
            rx: None,
            tx: TxQueue::default(),
            tx_dropped: 0,
            mtu,
        }
    }
}

pub(super) struct RxToken(Vec<u8>);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

pub(super) struct TxToken<'a> {
    tx: &'a mut TxQueue,
    dropped: &'a mut u64,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut packet = vec![0; len];
        let result = f(&mut packet);
        // Only replies made while receiving get here without room (`transmit` checks
        // first); dropping one is what a full NIC ring would do too.
        if !self.tx.push(packet) {
            *self.dropped += 1;
        }
        result
    }
}

impl phy::Device for StackDevice {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.take()?;
        Some((
            RxToken(packet),
            TxToken {
                tx: &mut self.tx,
                dropped: &mut self.tx_dropped,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        if self.tx.budget == 0 {
            // smoltcp keeps the segment and retries on a later poll.
            self.tx.exhausted = true;
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            dropped: &mut self.tx_dropped,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}
