//! Network emulation for one direction of one peer: a sans-IO delay line with
//! latency, jitter and random loss.
//!
//! Time is given, never read: [`DelayLine::offer`] and [`DelayLine::pop_due`] take
//! `now` in nanoseconds on the caller's clock, and [`DelayLine::next_release`] says
//! when the next packet is due, so a driver sleeps until one deadline instead of
//! polling. The RNG is seeded, so a test sees the same losses and delays every run.
//!
//! Packets wait in a min-heap ordered by release time and then by arrival, in
//! buffers taken from a pool of released ones: the steady state does not allocate.
//! A full line drops and counts, as a real queue would.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Duration;

/// Longest latency or jitter accepted: beyond this no transport would still work,
/// and a bound keeps the queue (and the memory it holds) bounded in time.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// Loss is drawn against this many parts: nine decimal places of a probability.
const LOSS_SCALE: u32 = 1_000_000_000;

/// How many packets may wait in one line by default: 50 ms of a gigabit of full
/// packets, with room to spare.
pub const DEFAULT_MAX_PACKETS: usize = 8192;
/// How many bytes may wait in one line by default.
pub const DEFAULT_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Released buffers kept for reuse; beyond this they are freed.
const MAX_SPARE: usize = 1024;

/// How the delay of each packet spreads around the latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Spread {
    /// Evenly within latency ± jitter.
    #[default]
    Uniform,
    /// Normally around the latency, with jitter as the standard deviation.
    Normal,
}

/// What a direction does to packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Conditions {
    latency: Duration,
    jitter: Duration,
    spread: Spread,
    /// Probability of loss, in parts of [`LOSS_SCALE`].
    loss: u32,
}

/// Why conditions were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConditionsError {
    #[error("latency {0:?} is above the maximum of {MAX_DELAY:?}")]
    Latency(Duration),
    #[error("jitter {0:?} is above the maximum of {MAX_DELAY:?}")]
    Jitter(Duration),
    #[error("loss {0} is not a fraction between 0 and 1")]
    Loss(String),
}

impl Conditions {
    /// Conditions that do nothing: packets pass at once.
    pub const NONE: Conditions = Conditions {
        latency: Duration::ZERO,
        jitter: Duration::ZERO,
        spread: Spread::Uniform,
        loss: 0,
    };

    /// `loss` is a fraction (0.01 is 1 %).
    pub fn new(
        latency: Duration,
        jitter: Duration,
        spread: Spread,
        loss: f64,
    ) -> Result<Conditions, ConditionsError> {
        if latency > MAX_DELAY {
            return Err(ConditionsError::Latency(latency));
        }
        if jitter > MAX_DELAY {
            return Err(ConditionsError::Jitter(jitter));
        }
        if !(0.0..=1.0).contains(&loss) {
            return Err(ConditionsError::Loss(loss.to_string()));
        }
        Ok(Conditions {
            latency,
            jitter,
            spread,
            loss: (loss * f64::from(LOSS_SCALE)).round() as u32,
        })
    }

    pub fn latency(&self) -> Duration {
        self.latency
    }

    pub fn jitter(&self) -> Duration {
        self.jitter
    }

    pub fn spread(&self) -> Spread {
        self.spread
    }

    /// The probability of loss, as a fraction.
    pub fn loss(&self) -> f64 {
        f64::from(self.loss) / f64::from(LOSS_SCALE)
    }

    /// Whether these conditions leave packets alone.
    pub fn is_none(&self) -> bool {
        self.latency.is_zero() && self.jitter.is_zero() && self.loss == 0
    }
}

/// What happened to an offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No delay and not lost: pass it on now (the line kept no copy).
    Pass,
    /// A copy waits until its release time.
    Delayed,
    /// Lost, as the loss rate asked.
    Lost,
    /// The line was full: dropped.
    Full,
}

struct Waiting {
    at: u64,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Waiting {}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One direction's delay line.
pub struct DelayLine {
    conditions: Conditions,
    rng: fastrand::Rng,
    waiting: BinaryHeap<Reverse<Waiting>>,
    spare: Vec<Vec<u8>>,
    bytes: usize,
    max_packets: usize,
    max_bytes: usize,
    seq: u64,
    /// The latest release time given: without jitter no packet goes before it, so
    /// order is kept even when the latency is lowered at run time.
    last_at: u64,
    lost: u64,
    full: u64,
}

impl DelayLine {
    /// A line with `conditions` whose random draws start from `seed`.
    pub fn new(conditions: Conditions, seed: u64) -> DelayLine {
        DelayLine::with_limits(conditions, seed, DEFAULT_MAX_PACKETS, DEFAULT_MAX_BYTES)
    }

    /// A line that holds at most `max_packets` packets and `max_bytes` bytes.
    pub fn with_limits(
        conditions: Conditions,
        seed: u64,
        max_packets: usize,
        max_bytes: usize,
    ) -> DelayLine {
        DelayLine {
            conditions,
            rng: fastrand::Rng::with_seed(seed),
            waiting: BinaryHeap::new(),
            spare: Vec::new(),
            bytes: 0,
            max_packets,
            max_bytes,
            seq: 0,
            last_at: 0,
            lost: 0,
            full: 0,
        }
    }

    pub fn conditions(&self) -> Conditions {
        self.conditions
    }

    /// New conditions apply to packets offered from now on; those waiting keep
    /// their release times.
    pub fn set_conditions(&mut self, conditions: Conditions) {
        self.conditions = conditions;
    }

    /// Offers a packet arriving at `now_ns`.
    pub fn offer(&mut self, now_ns: u64, packet: &[u8]) -> Verdict {
        let c = self.conditions;
        if c.loss > 0 && self.rng.u32(..LOSS_SCALE) < c.loss {
            self.lost += 1;
            return Verdict::Lost;
        }
        let delay = self.draw_delay();
        let mut at = now_ns.saturating_add(delay);
        if c.jitter.is_zero() {
            at = at.max(self.last_at);
        }
        if at <= now_ns && self.waiting.is_empty() {
            return Verdict::Pass;
        }
        if self.waiting.len() >= self.max_packets || self.bytes + packet.len() > self.max_bytes {
            self.full += 1;
            return Verdict::Full;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(packet);
        self.bytes += packet.len();
        self.last_at = self.last_at.max(at);
        self.seq += 1;
        self.waiting.push(Reverse(Waiting {
            at,
            seq: self.seq,
            packet: buf,
        }));
        Verdict::Delayed
    }

    /// This packet's one-way delay in nanoseconds.
    fn draw_delay(&mut self) -> u64 {
        let c = self.conditions;
        if c.jitter.is_zero() {
            return c.latency.as_nanos() as u64;
        }
        let latency = c.latency.as_nanos() as f64;
        let jitter = c.jitter.as_nanos() as f64;
        let offset = match c.spread {
            Spread::Uniform => (self.rng.f64() * 2.0 - 1.0) * jitter,
            Spread::Normal => {
                // Box–Muller; 1 - u keeps the logarithm away from zero.
                let u1 = 1.0 - self.rng.f64();
                let u2 = self.rng.f64();
                (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * jitter
            }
        };
        (latency + offset).max(0.0) as u64
    }

    /// The next packet due at `now_ns`, in release order; hand the buffer back with
    /// [`DelayLine::recycle`].
    pub fn pop_due(&mut self, now_ns: u64) -> Option<Vec<u8>> {
        if self.waiting.peek()?.0.at > now_ns {
            return None;
        }
        let Reverse(w) = self.waiting.pop()?;
        self.bytes -= w.packet.len();
        Some(w.packet)
    }

    /// Returns a released buffer for reuse.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE {
            self.spare.push(buf);
        }
    }

    /// When the next packet is due (same clock as `now_ns`), if any waits.
    pub fn next_release(&self) -> Option<u64> {
        self.waiting.peek().map(|w| w.0.at)
    }

    /// Packets waiting.
    pub fn queued(&self) -> usize {
        self.waiting.len()
    }

    /// Packets dropped by the loss rate.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Packets dropped because the line was full.
    pub fn full(&self) -> u64 {
        self.full
    }
}

/// Both directions of one peer, each with its own random draws, so loss in one
/// direction is independent of loss in the other.
pub struct Emulation {
    /// Towards the peer (what we encrypt).
    pub egress: DelayLine,
    /// From the peer (what we decrypt).
    pub ingress: DelayLine,
}

impl Emulation {
    pub fn new(conditions: Conditions, seed: u64) -> Emulation {
        Emulation {
            egress: DelayLine::new(conditions, seed),
            // Any fixed constant gives a different, still reproducible stream.
            ingress: DelayLine::new(conditions, seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    pub fn set_conditions(&mut self, conditions: Conditions) {
        self.egress.set_conditions(conditions);
        self.ingress.set_conditions(conditions);
    }

    /// The earlier of both directions' next release times.
    pub fn next_release(&self) -> Option<u64> {
        match (self.egress.next_release(), self.ingress.next_release()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn conditions(latency_ms: u64, jitter_ms: u64, spread: Spread, loss: f64) -> Conditions {
        Conditions::new(
            Duration::from_millis(latency_ms),
            Duration::from_millis(jitter_ms),
            spread,
            loss,
        )
        .unwrap()
    }

    fn packet(seq: u32) -> [u8; 64] {
        let mut p = [0u8; 64];
        p[..4].copy_from_slice(&seq.to_be_bytes());
        p
    }

    fn seq_of(p: &[u8]) -> u32 {
        u32::from_be_bytes(p[..4].try_into().unwrap())
    }

    #[test]
    fn no_conditions_pass_at_once() {
        let mut line = DelayLine::new(Conditions::NONE, 1);
        assert!(Conditions::NONE.is_none());
        for i in 0..100 {
            assert_eq!(line.offer(i * MS, &packet(i as u32)), Verdict::Pass);
        }
        assert_eq!(line.queued(), 0);
        assert_eq!(line.next_release(), None);
    }

    #[test]
    fn delay_is_exact() {
        let mut line = DelayLine::new(conditions(50, 0, Spread::Uniform, 0.0), 1);
        let t0 = 1_000 * MS;
        assert_eq!(line.offer(t0, &packet(7)), Verdict::Delayed);
        assert_eq!(line.next_release(), Some(t0 + 50 * MS));
        assert_eq!(line.pop_due(t0 + 50 * MS - 1), None, "one ns early");
        let p = line.pop_due(t0 + 50 * MS).expect("due at exactly 50 ms");
        assert_eq!(seq_of(&p), 7);
        assert_eq!(p.len(), 64);
        line.recycle(p);
        assert_eq!(line.next_release(), None);
    }

    #[test]
    fn order_kept_without_jitter_even_when_latency_drops() {
        let mut line = DelayLine::new(conditions(80, 0, Spread::Uniform, 0.0), 3);
        for i in 0..500u32 {
            assert_eq!(
                line.offer(u64::from(i) * 10_000, &packet(i)),
                Verdict::Delayed
            );
        }
        // Lower latency at run time: later packets still go after earlier ones.
        line.set_conditions(conditions(10, 0, Spread::Uniform, 0.0));
        for i in 500..1000u32 {
            assert_eq!(
                line.offer(u64::from(i) * 10_000, &packet(i)),
                Verdict::Delayed
            );
        }
        let mut expect = 0;
        let mut now = 0;
        while let Some(at) = line.next_release() {
            assert!(at >= now, "release times go forward");
            now = at;
            while let Some(p) = line.pop_due(now) {
                assert_eq!(seq_of(&p), expect);
                expect += 1;
                line.recycle(p);
            }
        }
        assert_eq!(expect, 1000);
    }

    #[test]
    fn jitter_spreads_delay_within_bounds_and_may_reorder() {
        // 10,000 packets in 1 s all wait at once: above the default limit.
        let c = conditions(50, 10, Spread::Uniform, 0.0);
        let mut line = DelayLine::with_limits(c, 42, 10_000, DEFAULT_MAX_BYTES);
        for i in 0..10_000u32 {
            assert_eq!(
                line.offer(u64::from(i) * 100_000, &packet(i)),
                Verdict::Delayed
            );
        }
        let mut delays = Vec::new();
        let mut reordered = 0;
        let mut last = None;
        while let Some(at) = line.next_release() {
            let p = line.pop_due(at).unwrap();
            let seq = seq_of(&p);
            let delay = at - u64::from(seq) * 100_000;
            assert!((40 * MS..=60 * MS).contains(&delay), "{delay}");
            delays.push(delay as f64);
            if last.is_some_and(|l| seq < l) {
                reordered += 1;
            }
            last = Some(seq);
            line.recycle(p);
        }
        assert_eq!(delays.len(), 10_000);
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        assert!((mean - 50e6).abs() < 0.5e6, "mean {mean}");
        assert!(reordered > 0, "jitter larger than the gap reorders");
    }

    #[test]
    fn normal_jitter_has_the_asked_deviation() {
        let mut line = DelayLine::new(conditions(100, 10, Spread::Normal, 0.0), 9);
        let draws: Vec<f64> = (0..10_000).map(|_| line.draw_delay() as f64).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!((mean - 100e6).abs() < 0.5e6, "mean {mean}");
        assert!((var.sqrt() - 10e6).abs() < 0.5e6, "sd {}", var.sqrt());
    }

    #[test]
    fn loss_rate_within_bounds_and_reproducible() {
        let run = |seed| {
            let mut line = DelayLine::new(conditions(0, 0, Spread::Uniform, 0.05), seed);
            let verdicts: Vec<Verdict> = (0..10_000u32)
                .map(|i| line.offer(u64::from(i), &packet(i)))
                .collect();
            (verdicts, line.lost())
        };
        let (a, lost) = run(5);
        // 500 expected; the binomial's deviation is about 22, so ±100 is over 4 of them.
        assert!((400..=600).contains(&lost), "{lost} of 10000 lost");
        assert_eq!(
            a.iter().filter(|v| **v == Verdict::Lost).count() as u64,
            lost
        );
        assert!(a.iter().all(|v| matches!(v, Verdict::Lost | Verdict::Pass)));
        assert_eq!(run(5).0, a, "a seed gives the same losses");
        assert_ne!(run(6).0, a);
    }

    #[test]
    fn directions_lose_independently() {
        let mut e = Emulation::new(conditions(0, 0, Spread::Uniform, 0.5), 11);
        let mut both = 0;
        let mut one = 0;
        for i in 0..10_000u32 {
            let out = e.egress.offer(u64::from(i), &packet(i)) == Verdict::Lost;
            let back = e.ingress.offer(u64::from(i), &packet(i)) == Verdict::Lost;
            match (out, back) {
                (true, true) => both += 1,
                (true, false) | (false, true) => one += 1,
                _ => {}
            }
        }
        // Independent at 50 %: a quarter lost both ways, half one way.
        assert!((2_300..=2_700).contains(&both), "{both}");
        assert!((4_700..=5_300).contains(&one), "{one}");
    }

    #[test]
    fn full_line_drops_and_counts() {
        let c = conditions(10, 0, Spread::Uniform, 0.0);
        let mut line = DelayLine::with_limits(c, 1, 4, 1 << 20);
        for i in 0..4 {
            assert_eq!(line.offer(0, &packet(i)), Verdict::Delayed);
        }
        assert_eq!(line.offer(0, &packet(4)), Verdict::Full);
        assert_eq!(line.full(), 1);
        let mut line = DelayLine::with_limits(c, 1, 100, 100);
        assert_eq!(line.offer(0, &packet(0)), Verdict::Delayed);
        assert_eq!(
            line.offer(0, &packet(1)),
            Verdict::Full,
            "64 + 64 bytes > 100"
        );
    }

    #[test]
    fn buffers_are_reused() {
        let mut line = DelayLine::new(conditions(1, 0, Spread::Uniform, 0.0), 1);
        line.offer(0, &packet(0));
        let p = line.pop_due(MS).unwrap();
        let ptr = p.as_ptr();
        line.recycle(p);
        line.offer(MS, &packet(1));
        let p = line.pop_due(2 * MS).unwrap();
        assert_eq!(
            p.as_ptr(),
            ptr,
            "the released buffer carries the next packet"
        );
        assert_eq!(seq_of(&p), 1);
    }

    #[test]
    fn bad_conditions_are_refused() {
        let d = Duration::from_secs(11);
        let zero = Duration::ZERO;
        assert_eq!(
            Conditions::new(d, zero, Spread::Uniform, 0.0),
            Err(ConditionsError::Latency(d))
        );
        assert!(Conditions::new(zero, d, Spread::Uniform, 0.0).is_err());
        for loss in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(Conditions::new(zero, zero, Spread::Uniform, loss).is_err());
        }
        let c = Conditions::new(zero, zero, Spread::Uniform, 0.005).unwrap();
        assert!((c.loss() - 0.005).abs() < 1e-12);
    }
}
