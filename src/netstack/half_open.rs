//! Connections that have not completed their handshake.
//!
//! Each one holds a smoltcp socket and an upstream connection to the container, so a
//! flood of SYNs from spoofed sources must not be able to pile them up: there are at
//! most so many per stack and per source, each lives only a short while, and a new
//! SYN takes the place of the oldest rather than being turned away. A client that
//! really wants to connect completes its handshake within a round trip and leaves
//! this table long before its place would be given away.

use std::collections::HashMap;
use std::time::Instant;

use smoltcp::wire::IpAddress;

struct Entry {
    source: IpAddress,
    since: Instant,
    deadline: Instant,
}

#[derive(Default)]
pub(super) struct HalfOpen {
    entries: HashMap<u64, Entry>,
    per_source: HashMap<IpAddress, usize>,
}

impl HalfOpen {
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    pub(super) fn count_from(&self, source: &IpAddress) -> usize {
        self.per_source.get(source).copied().unwrap_or(0)
    }

    pub(super) fn insert(&mut self, id: u64, source: IpAddress, now: Instant, deadline: Instant) {
        let entry = Entry {
            source,
            since: now,
            deadline,
        };
        if self.entries.insert(id, entry).is_none() {
            *self.per_source.entry(source).or_default() += 1;
        }
    }

    /// The handshake moved on (the SYN-ACK went out): it now has until `deadline`.
    pub(super) fn extend(&mut self, id: u64, deadline: Instant) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.deadline = deadline;
        }
    }

    /// Forgets `id` (established, or gone); false when it was not here.
    pub(super) fn remove(&mut self, id: u64) -> bool {
        let Some(entry) = self.entries.remove(&id) else {
            return false;
        };
        if let Some(n) = self.per_source.get_mut(&entry.source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&entry.source);
            }
        }
        true
    }

    /// The oldest entry, from `source` only when given. A linear scan: the table is
    /// small and this runs only when it is full.
    pub(super) fn oldest(&self, source: Option<&IpAddress>) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| source.is_none_or(|s| *s == e.source))
            .min_by_key(|(id, e)| (e.since, **id))
            .map(|(id, _)| *id)
    }

    /// Entries past their deadline.
    pub(super) fn expired(&self, now: Instant) -> Vec<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    fn addr(last: u8) -> IpAddress {
        IpAddress::Ipv4(Ipv4Addr::new(198, 51, 100, last))
    }

    #[test]
    fn oldest_overall_and_per_source() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut table = HalfOpen::default();
        table.insert(1, addr(1), t0, t0 + 5 * s);
        table.insert(2, addr(2), t0 + s, t0 + 5 * s);
        table.insert(3, addr(2), t0 + 2 * s, t0 + 5 * s);
        assert_eq!(table.oldest(None), Some(1));
        assert_eq!(table.oldest(Some(&addr(2))), Some(2));
        assert_eq!(table.oldest(Some(&addr(3))), None);
        assert_eq!(table.count_from(&addr(2)), 2);
        assert!(table.remove(2));
        assert!(!table.remove(2));
        assert_eq!(table.count_from(&addr(2)), 1);
        assert_eq!(table.oldest(Some(&addr(2))), Some(3));
        assert!(table.remove(3));
        assert_eq!(table.count_from(&addr(2)), 0);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn deadlines_move_when_extended() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut table = HalfOpen::default();
        table.insert(1, addr(1), t0, t0 + s);
        table.insert(2, addr(1), t0, t0 + s);
        table.extend(2, t0 + 3 * s);
        assert_eq!(table.expired(t0), Vec::<u64>::new());
        assert_eq!(table.expired(t0 + 2 * s), vec![1]);
        let mut both = table.expired(t0 + 3 * s);
        both.sort_unstable();
        assert_eq!(both, vec![1, 2]);
    }
}
