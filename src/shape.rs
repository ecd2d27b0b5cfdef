//! Per-peer token-bucket shaping (GCRA, via governor) with a short queue.
//!
//! Dropping every packet over the rate (policing) makes TCP collapse into loss and
//! timeouts; a queue of a few tens of milliseconds at the rate lets it see delay
//! first and settle at the rate. Packets wait in order, and only a full queue drops.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;

use crate::wg::FedClock;

/// The bucket counts in cells of this many bytes: governor's interval is whole
/// nanoseconds, and per-byte cells would lose precision (or stop limiting at all)
/// above about 1 GB/s.
const CELL: usize = 64;

/// How much the queue may hold, in time at the configured rate.
const QUEUE_TIME: Duration = Duration::from_millis(50);

/// Burst allowance, in time at the rate; never below one superpacket-sized unit.
const BURST_TIME: Duration = Duration::from_millis(10);
const MIN_BURST_BYTES: usize = 64 * 1024;
/// Queue floor, so slow rates still hold a few full-sized packets.
const MIN_QUEUE_BYTES: usize = 32 * 1024;

/// What happened to an offered packet.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Admit {
    /// Within the rate: pass it on now.
    Now,
    /// Over the rate: a copy waits in the queue.
    Queued,
    /// Over the rate with a full queue: dropped.
    Dropped,
}

/// What the head of a queue is up to.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Its time has come: this packet goes now (hand the buffer back with
    /// [`Lane::recycle`]).
    Due(Vec<u8>),
    /// The head may go after this long.
    Wait(Duration),
    Empty,
}

/// One direction of one peer. Time comes from `C`: the device's clock (fed the `now`
/// of each input) in use, a clock the test advances in tests.
pub struct Lane<C: Clock = FedClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    queue: Mutex<Queue>,
    max_bytes: usize,
    dropped: AtomicU64,
    /// Whether the device's list of lanes to release holds this one.
    listed: AtomicBool,
}

#[derive(Default)]
struct Queue {
    packets: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Bytes charged to no cell yet: carried so that the long-run rate is exact
    /// rather than rounded up to whole cells per packet.
    carry: usize,
    /// Buffers of released packets, reused so the steady state does not allocate.
    spare: Vec<Vec<u8>>,
}

fn cells(len: usize) -> NonZeroU32 {
    let n = len.div_ceil(CELL).max(1);
    NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
}

impl Queue {
    /// Whole cells to charge for `len` more bytes, keeping the remainder for later.
    /// `None` when the bytes fit in what is carried (nothing to charge yet).
    fn charge(&self, len: usize) -> (Option<NonZeroU32>, usize) {
        let total = self.carry + len;
        let whole = total / CELL;
        let n = NonZeroU32::new(u32::try_from(whole).unwrap_or(u32::MAX));
        (n, total % CELL)
    }
}

impl<C: Clock> Lane<C> {
    /// A lane limited to `bytes_per_sec` (at least one cell per second) on `clock`.
    pub fn with_clock(bytes_per_sec: u64, clock: C) -> Lane<C> {
        let bytes_per_sec = bytes_per_sec.max(CELL as u64);
        let period_ns = (CELL as u64 * 1_000_000_000 / bytes_per_sec).max(1);
        let burst_bytes = ((bytes_per_sec as u128 * BURST_TIME.as_nanos() / 1_000_000_000)
            as usize)
            .max(MIN_BURST_BYTES);
        let quota = Quota::with_period(Duration::from_nanos(period_ns))
            .expect("period is at least 1 ns")
            .allow_burst(cells(burst_bytes));
        let max_bytes = ((bytes_per_sec as u128 * QUEUE_TIME.as_nanos() / 1_000_000_000) as usize)
            .max(MIN_QUEUE_BYTES);
        Lane {
            limiter: RateLimiter::direct_with_clock(quota, clock),
            queue: Mutex::new(Queue::default()),
            max_bytes,
            dropped: AtomicU64::new(0),
            listed: AtomicBool::new(false),
        }
    }

    /// Offers a packet. Packets already waiting go first, so order is kept.
    pub fn offer(&self, packet: &[u8]) -> Admit {
        let mut q = self.queue.lock();
        if q.packets.is_empty() {
            let (n, carry) = q.charge(packet.len());
            if n.is_none_or(|n| matches!(self.limiter.check_n(n), Ok(Ok(())))) {
                q.carry = carry;
                return Admit::Now;
            }
        }
        if q.bytes + packet.len() > self.max_bytes {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Admit::Dropped;
        }
        let mut buf = q.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        q.bytes += packet.len();
        q.packets.push_back(buf);
        Admit::Queued
    }

    /// Takes the head of the queue if the bucket allows it now.
    pub fn next(&self) -> Next {
        let mut q = self.queue.lock();
        loop {
            let Some(len) = q.packets.front().map(Vec::len) else {
                return Next::Empty;
            };
            let (n, carry) = q.charge(len);
            let verdict = match n {
                None => Ok(Ok(())),
                Some(n) => self.limiter.check_n(n),
            };
            match verdict {
                Ok(Ok(())) => {
                    q.carry = carry;
                    q.bytes -= len;
                    if let Some(p) = q.packets.pop_front() {
                        return Next::Due(p);
                    }
                }
                Ok(Err(not_until)) => {
                    return Next::Wait(not_until.wait_time_from(self.limiter.clock().now()));
                }
                // Larger than the burst: it could never pass. The burst is sized above
                // any packet, so this is only reachable with absurd inputs.
                Err(_) => {
                    q.bytes -= len;
                    q.packets.pop_front();
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Marks the lane as listed for release; true if it was not before.
    pub fn list(&self) -> bool {
        !self.listed.swap(true, Ordering::SeqCst)
    }

    pub fn unlist(&self) {
        self.listed.store(false, Ordering::SeqCst);
    }

    /// Returns a released buffer for reuse.
    pub fn recycle(&self, buf: Vec<u8>) {
        let mut q = self.queue.lock();
        if q.spare.len() < 1024 {
            q.spare.push(buf);
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Both directions of one peer. Both lanes count the plaintext IP packets (before
/// sealing, after opening), never the WireGuard datagrams: a rate is what the peer's
/// own traffic gets, and every shaper of one flow counts the same bytes, so shapers in
/// series at one rate do not lower it.
pub struct Shaper {
    /// Towards the peer (what we encrypt).
    pub egress: Lane,
    /// From the peer (what we decrypt).
    pub ingress: Lane,
    bits_per_sec: u64,
}

impl Shaper {
    /// Shapes both directions to `mbps` megabits per second, on `clock`.
    pub fn from_mbps(mbps: u32, clock: &FedClock) -> Shaper {
        let bits_per_sec = u64::from(mbps) * 1_000_000;
        Shaper {
            egress: Lane::with_clock(bits_per_sec / 8, clock.clone()),
            ingress: Lane::with_clock(bits_per_sec / 8, clock.clone()),
            bits_per_sec,
        }
    }

    pub fn bits_per_sec(&self) -> u64 {
        self.bits_per_sec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    /// Moves every packet now due into `out`, as the device's polls do one by one;
    /// how long until the next is due, `None` when the queue is empty.
    fn release<C: Clock>(lane: &Lane<C>, out: &mut Vec<Vec<u8>>) -> Option<Duration> {
        loop {
            match lane.next() {
                Next::Due(p) => out.push(p),
                Next::Wait(w) => return Some(w),
                Next::Empty => return None,
            }
        }
    }

    /// A lane whose time stands still unless the test advances it.
    fn fake_lane(bytes_per_sec: u64) -> (Lane<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (Lane::with_clock(bytes_per_sec, clock.clone()), clock)
    }

    #[test]
    fn within_burst_passes_then_queues_then_drops() {
        // 8 Mbit/s = 1 MB/s: burst 64 KiB (65 packets of 1000 B), queue 50 KB.
        let (lane, clock) = fake_lane(1_000_000);
        let pkt = [0u8; 1000];
        let mut now = 0;
        while lane.offer(&pkt) == Admit::Now {
            now += 1;
        }
        assert_eq!(now, 65, "a burst of 64 KiB");
        let mut queued = 1;
        while lane.offer(&pkt) == Admit::Queued {
            queued += 1;
        }
        assert_eq!(queued, 50, "50 ms of queue");
        assert_eq!(lane.dropped(), 1);
        assert_eq!(lane.queued_bytes(), 50_000);

        // Nothing is due before its time; 10 ms at 1 MB/s release 10 packets.
        let mut out = Vec::new();
        let wait = release(&lane, &mut out).expect("the queue is not empty");
        assert!(out.is_empty(), "released {} early", out.len());
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(1),
            "{wait:?}"
        );
        clock.advance(Duration::from_millis(10));
        assert!(release(&lane, &mut out).is_some());
        assert_eq!(out.len(), 10);
        assert_eq!(lane.queued_bytes(), 40_000);
        // The queue drains completely at the rate, and a drained lane has nothing due.
        clock.advance(Duration::from_millis(40));
        assert_eq!(release(&lane, &mut out), None);
        assert_eq!(out.len(), 50);
    }

    #[test]
    fn released_packets_keep_order_and_rate() {
        let (lane, clock) = fake_lane(2_000_000); // 2 MB/s
        let mut sent = 0usize;
        let mut out = Vec::new();
        let mut seq = 0u32;
        let mut expect = 0u32;
        let mut elapsed = Duration::ZERO;
        // Offer 1 MB as fast as the queue takes it; release as the bucket allows, moving
        // time on by exactly what the lane says it needs.
        while sent < 1_000_000 {
            let mut pkt = [0u8; 1000];
            pkt[..4].copy_from_slice(&seq.to_be_bytes());
            match lane.offer(&pkt) {
                Admit::Now => {
                    assert_eq!(seq, expect);
                    expect += 1;
                    sent += 1000;
                    seq += 1;
                }
                Admit::Queued => seq += 1,
                Admit::Dropped => {
                    let wait = release(&lane, &mut out);
                    for p in out.drain(..) {
                        assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), expect);
                        expect += 1;
                        sent += 1000;
                    }
                    if let Some(w) = wait {
                        clock.advance(w);
                        elapsed += w;
                    }
                }
            }
        }
        // 1 MB at 2 MB/s, less the 64 KiB burst: 0.467 s, give or take a packet.
        let secs = elapsed.as_secs_f64();
        let ideal = (1_000_000.0 - 65_536.0) / 2_000_000.0;
        assert!(
            (secs - ideal).abs() < 0.001,
            "took {secs:.4} s, not {ideal:.4} s"
        );
    }

    /// Offers `secs` of UDP at `offered_bps` (bytes/s) in packets of `len` bytes to
    /// `lanes` in series at time steps of 100 µs; each lane is polled only when a
    /// packet reaches it and on a 1 ms tick (a coarse timer, so releases come late),
    /// and what one lane releases is offered to the next. The bytes the last lane
    /// delivered after the first half second, per second.
    fn delivered_rate(
        lanes: &[Lane<FakeRelativeClock>],
        clock: &FakeRelativeClock,
        offered_bps: f64,
        len: usize,
        secs: f64,
    ) -> f64 {
        let step = Duration::from_micros(100);
        let gap = len as f64 / offered_bps;
        let (mut t, mut next_arrival, mut counted) = (0.0f64, 0.0f64, 0usize);
        let mut out = Vec::new();
        while t < secs {
            let tick = (t * 10_000.0).round() as u64 % 10 == 0;
            let mut arriving = Vec::new();
            while next_arrival <= t {
                arriving.push(vec![0u8; len]);
                next_arrival += gap;
            }
            for (i, lane) in lanes.iter().enumerate() {
                let polled = tick || !arriving.is_empty();
                for p in arriving.drain(..) {
                    if lane.offer(&p) == Admit::Now {
                        out.push(p);
                    }
                }
                if polled {
                    release(lane, &mut out);
                }
                if i + 1 < lanes.len() {
                    arriving.append(&mut out);
                }
            }
            if t >= 0.5 {
                counted += out.iter().map(Vec::len).sum::<usize>();
            }
            out.clear();
            clock.advance(step);
            t += step.as_secs_f64();
        }
        counted as f64 / (secs - 0.5)
    }

    #[test]
    fn udp_over_the_rate_delivers_the_rate() {
        // 20 Mbit/s, offered 30 Mbit/s of 1248-byte IPv6/UDP packets (1200 B payload).
        let clock = FakeRelativeClock::default();
        let lane = Lane::with_clock(2_500_000, clock.clone());
        let rate = delivered_rate(std::slice::from_ref(&lane), &clock, 3_750_000.0, 1248, 3.0);
        assert!(
            (rate / 2_500_000.0 - 1.0).abs() < 0.01,
            "{rate:.0} B/s of 2500000"
        );
        assert!(
            lane.dropped() > 0,
            "offered over the rate, the queue must overflow"
        );
    }

    #[test]
    fn two_lanes_in_series_at_one_rate_deliver_the_rate() {
        // The agent's label and the relay's token cap on one flow, both at 20 Mbit/s.
        let clock = FakeRelativeClock::default();
        let lanes = [
            Lane::with_clock(2_500_000, clock.clone()),
            Lane::with_clock(2_500_000, clock.clone()),
        ];
        let rate = delivered_rate(&lanes, &clock, 3_750_000.0, 1248, 3.0);
        assert!(
            (rate / 2_500_000.0 - 1.0).abs() < 0.01,
            "{rate:.0} B/s of 2500000"
        );
        assert_eq!(lanes[1].dropped(), 0, "the second lane never drops");
    }

    #[test]
    fn charges_exact_bytes_over_time() {
        let mut q = Queue::default();
        let mut cells = 0u64;
        for _ in 0..1000 {
            let (n, carry) = q.charge(1420);
            cells += n.map_or(0, |n| u64::from(n.get()));
            q.carry = carry;
        }
        assert_eq!(cells * CELL as u64 + q.carry as u64, 1_420_000);
        // A tiny packet is carried, not charged a whole cell.
        let mut q = Queue::default();
        assert_eq!(q.charge(40), (None, 40));
        q.carry = 40;
        assert_eq!(q.charge(40).0.map(|n| n.get()), Some(1));
    }

    #[test]
    fn cells_round_up() {
        assert_eq!(cells(0).get(), 1);
        assert_eq!(cells(64).get(), 1);
        assert_eq!(cells(65).get(), 2);
        assert_eq!(cells(65_535).get(), 1024);
    }
}
