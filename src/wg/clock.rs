//! Time as the device is told it: every input carries `now`, and this keeps the
//! latest one for the parts that ask for time rather than being given it (governor's
//! rate limiters). Times are nanoseconds since the first `now` the device saw, so
//! deadlines fit in atomics that the polls can read without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use governor::nanos::Nanos;

#[derive(Default)]
struct Inner {
    epoch: OnceLock<Instant>,
    latest: AtomicU64,
}

/// A clock that only moves when the device is fed a later `now`.
#[derive(Clone, Default)]
pub struct FedClock(Arc<Inner>);

impl FedClock {
    /// Notes `now` (time never goes back: the latest one wins) and returns it in
    /// nanoseconds since the epoch.
    pub fn feed(&self, now: Instant) -> u64 {
        let ns = self.ns(now);
        self.0.latest.fetch_max(ns, Ordering::Relaxed);
        ns
    }

    /// `now` in nanoseconds since the epoch (the first time ever asked), without
    /// moving the clock.
    pub fn ns(&self, now: Instant) -> u64 {
        let epoch = *self.0.epoch.get_or_init(|| now);
        u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The latest time fed, in nanoseconds since the epoch.
    pub fn latest(&self) -> u64 {
        self.0.latest.load(Ordering::Relaxed)
    }

    /// The instant `ns` nanoseconds after the epoch, once there is one.
    pub fn instant(&self, ns: u64) -> Option<Instant> {
        self.0
            .epoch
            .get()
            .map(|e| *e + Duration::from_nanos(ns.min(u64::MAX / 2)))
    }
}

impl governor::clock::Clock for FedClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.0.latest.load(Ordering::Relaxed))
    }
}

/// A point in time on a [`FedClock`] that can be read and moved without a lock.
pub(crate) struct Deadline(AtomicU64);

impl Default for Deadline {
    fn default() -> Self {
        Deadline(AtomicU64::new(Self::NEVER))
    }
}

impl Deadline {
    const NEVER: u64 = u64::MAX;

    pub(crate) fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Acquire)).filter(|&d| d != Self::NEVER)
    }

    /// Whether the deadline is set and has come at `now_ns`.
    pub(crate) fn is_due(&self, now_ns: u64) -> bool {
        self.0.load(Ordering::Acquire) <= now_ns
    }

    /// Moves it earlier to `ns` (never later).
    pub(crate) fn lower(&self, ns: u64) {
        // A load first: on the data path the deadline is nearly always earlier
        // already, and a plain load does not bounce the cache line between cores.
        if ns < self.0.load(Ordering::Acquire) {
            self.0.fetch_min(ns, Ordering::AcqRel);
        }
    }

    pub(crate) fn set(&self, ns: Option<u64>) {
        self.0.store(ns.unwrap_or(Self::NEVER), Ordering::Release);
    }
}

/// Nanoseconds in `d`, saturating.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
