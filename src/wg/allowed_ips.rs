//! Longest-prefix-match table from IP prefixes to peers (cryptokey routing).
//!
//! One hash map per address family keyed by (masked address, length), plus the
//! list of lengths in use, longest first. A lookup probes one entry per distinct
//! length, which in practice is a handful (/32, /128, a few subnets, /0), so it
//! stays a few hash probes even with tens of thousands of peers.

use std::net::IpAddr;

// A fast seeded hash: the probes are on every packet's path, and keys (prefixes
// the owner configured) are not the sender's to choose.
use foldhash::HashMap;

use crate::prefix::{mask, IpPrefix};

#[derive(Debug)]
pub struct AllowedIps<T> {
    entries: HashMap<(IpAddr, u8), T>,
    /// Distinct lengths in use per family with how many entries use each, longest first.
    v4_lens: Vec<(u8, usize)>,
    v6_lens: Vec<(u8, usize)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            entries: HashMap::default(),
            v4_lens: Vec::new(),
            v6_lens: Vec::new(),
        }
    }
}

impl<T: Clone + PartialEq> AllowedIps<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `prefix` to `value`, taking it away from whichever value held it before
    /// (the WireGuard rule: an allowed IP belongs to exactly one peer).
    pub fn insert(&mut self, prefix: IpPrefix, value: T) -> Option<T> {
        let net = prefix.network();
        let key = (net.addr(), net.len());
        let old = self.entries.insert(key, value);
        if old.is_none() {
            let lens = self.lens_mut(net.addr());
            match lens.iter_mut().find(|(l, _)| *l == net.len()) {
                Some((_, count)) => *count += 1,
                None => {
                    lens.push((net.len(), 1));
                    lens.sort_unstable_by_key(|(len, _)| std::cmp::Reverse(*len));
                }
            }
        }
        old
    }

    pub fn remove(&mut self, prefix: IpPrefix) -> Option<T> {
        let net = prefix.network();
        let old = self.entries.remove(&(net.addr(), net.len()))?;
        let lens = self.lens_mut(net.addr());
        if let Some(pos) = lens.iter().position(|(l, _)| *l == net.len()) {
            lens[pos].1 -= 1;
            if lens[pos].1 == 0 {
                lens.remove(pos);
            }
        }
        Some(old)
    }

    /// Removes every prefix that maps to `value`.
    pub fn remove_value(&mut self, value: &T) {
        let doomed: Vec<IpPrefix> = self.prefixes_of(value).collect();
        for p in doomed {
            self.remove(p);
        }
    }

    /// All prefixes that map to `value`, in no particular order.
    pub fn prefixes_of<'a>(&'a self, value: &'a T) -> impl Iterator<Item = IpPrefix> + 'a {
        self.entries
            .iter()
            .filter(move |(_, v)| *v == value)
            .filter_map(|((addr, len), _)| IpPrefix::new(*addr, *len).ok())
    }

    /// The value of the longest prefix that contains `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        let lens = match ip {
            IpAddr::V4(_) => &self.v4_lens,
            IpAddr::V6(_) => &self.v6_lens,
        };
        lens.iter()
            .find_map(|(len, _)| self.entries.get(&(mask(ip, *len), *len)))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.v4_lens.clear();
        self.v6_lens.clear();
    }

    fn lens_mut(&mut self, addr: IpAddr) -> &mut Vec<(u8, usize)> {
        match addr {
            IpAddr::V4(_) => &mut self.v4_lens,
            IpAddr::V6(_) => &mut self.v6_lens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(p("0.0.0.0/0"), 1);
        t.insert(p("10.0.0.0/8"), 2);
        t.insert(p("10.1.0.0/16"), 3);
        t.insert(p("10.1.2.3/32"), 4);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&4));
        assert_eq!(t.lookup(ip("10.1.2.4")), Some(&3));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(&2));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&1));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
    }

    #[test]
    fn families_are_separate() {
        let mut t = AllowedIps::new();
        t.insert(p("::/0"), 6);
        assert_eq!(t.lookup(ip("192.0.2.1")), None);
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(&6));
        t.insert(p("2001:db8::/32"), 7);
        assert_eq!(t.lookup(ip("2001:db8:1::1")), Some(&7));
        assert_eq!(t.lookup(ip("2001:db9::1")), Some(&6));
    }

    #[test]
    fn insert_moves_prefix_and_host_bits_are_masked() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(p("10.0.0.5/24"), 1), None);
        assert_eq!(t.insert(p("10.0.0.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.0.0.9")), Some(&2));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn removal_updates_lengths() {
        let mut t = AllowedIps::new();
        t.insert(p("10.0.0.0/24"), 1);
        t.insert(p("10.0.1.0/24"), 1);
        t.insert(p("10.0.0.7/32"), 2);
        t.remove_value(&2);
        assert_eq!(t.lookup(ip("10.0.0.7")), Some(&1));
        assert_eq!(t.v4_lens, vec![(24, 2)]);
        assert_eq!(t.remove(p("10.0.0.0/24")), Some(1));
        assert_eq!(t.lookup(ip("10.0.0.7")), None);
        assert_eq!(t.lookup(ip("10.0.1.7")), Some(&1));
        let mut mine: Vec<_> = t.prefixes_of(&1).collect();
        mine.sort();
        assert_eq!(mine, vec![p("10.0.1.0/24")]);
    }
}
