//! How long the store's durable commits (transaction and flush) take, by operation:
//! the store records here, `/metrics` reads it.

use std::collections::BTreeMap;
use std::time::Duration;

use parking_lot::Mutex;

use crate::histogram::Histogram;

/// Keyed by the store's own operation names (a fixed set), so the series are bounded.
#[derive(Default)]
pub struct CommitLatency {
    by_operation: Mutex<BTreeMap<&'static str, Histogram>>,
}

impl CommitLatency {
    pub fn record(&self, operation: &'static str, elapsed: Duration) {
        self.by_operation
            .lock()
            .entry(operation)
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    /// Every operation seen so far with its histogram, in name order.
    pub fn snapshot(&self) -> Vec<(&'static str, Histogram)> {
        self.by_operation
            .lock()
            .iter()
            .map(|(op, h)| (*op, h.clone()))
            .collect()
    }
}
