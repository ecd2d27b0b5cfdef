//! Address math for the store: which addresses of the configured prefixes may be
//! handed out, and where the search for a key's address starts. Pure functions, no
//! storage, so the rules can be tested on their own.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ring::digest::{digest, SHA256};
use sidecar::{IpPrefix, Key};

use super::{AddressPlan, StoreError};

/// Upper bound on IPv6 probes per allocation. A /64 never gets near it; in a tiny
/// prefix (/112) it covers the whole space, and anything larger that has this many
/// consecutive taken addresses is full for practical purposes.
const MAX_V6_PROBES: u128 = 1 << 16;

/// Host offsets 0 (subnet-router anycast, RFC 4291) up to this one are kept for the
/// relay and the operator (`::1` .. `::ff` of the prefix).
const LOW_RESERVED: u128 = 0xff;

/// The address plan, checked and turned into integers.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    v6_net: u128,
    v6_len: u8,
    /// Host bits the interface identifier may use: all of them for prefixes longer
    /// than /64, else the low 64 (so every peer lands in the prefix's first /64).
    v6_bits: u32,
    v4: Option<V4Pool>,
    reserved6: HashSet<u128>,
    reserved4: HashSet<u32>,
    /// Identifies the IPv4 pool and its reservations, so a stored allocation cursor
    /// is only trusted for the plan it was computed under.
    v4_fingerprint: String,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct V4Pool {
    net: u32,
    len: u8,
    /// Number of addresses in the pool (up to 2^32, hence u64).
    size: u64,
}

impl Plan {
    pub(crate) fn new(plan: &AddressPlan) -> Result<Plan, StoreError> {
        let IpAddr::V6(net6) = plan.ipv6.network().addr() else {
            return Err(StoreError::Invalid(format!(
                "the peer prefix {} is not an IPv6 prefix",
                plan.ipv6
            )));
        };
        let v6_len = plan.ipv6.len();
        let v4 = match plan.ipv4_pool {
            None => None,
            Some(pool) => {
                let IpAddr::V4(net4) = pool.network().addr() else {
                    return Err(StoreError::Invalid(format!(
                        "the IPv4 pool {pool} is not an IPv4 prefix"
                    )));
                };
                Some(V4Pool {
                    net: u32::from(net4),
                    len: pool.len(),
                    size: 1u64 << (32 - u32::from(pool.len())),
                })
            }
        };
        let mut reserved6 = HashSet::new();
        let mut reserved4 = HashSet::new();
        for addr in &plan.reserved {
            match addr {
                IpAddr::V6(a) => {
                    reserved6.insert(u128::from(*a));
                }
                IpAddr::V4(a) => {
                    reserved4.insert(u32::from(*a));
                }
            }
        }
        let mut r4: Vec<u32> = reserved4.iter().copied().collect();
        r4.sort_unstable();
        let v4_fingerprint = match plan.ipv4_pool {
            None => String::new(),
            Some(pool) => {
                let list: Vec<String> = r4.iter().map(|a| Ipv4Addr::from(*a).to_string()).collect();
                format!("{}|{}", pool.network(), list.join(","))
            }
        };
        Ok(Plan {
            v6_net: u128::from(net6),
            v6_len,
            v6_bits: (128 - u32::from(v6_len)).min(64),
            v4,
            reserved6,
            reserved4,
            v4_fingerprint,
        })
    }

    pub(crate) fn v4_pool(&self) -> Option<&V4Pool> {
        self.v4.as_ref()
    }

    pub(crate) fn v4_fingerprint(&self) -> &str {
        &self.v4_fingerprint
    }

    /// Number of candidate IPv6 offsets (2^v6_bits; 1 for a /128).
    fn v6_space(&self) -> u128 {
        1u128 << self.v6_bits
    }

    /// Where the search for `key`'s IPv6 address starts: the first 8 bytes of
    /// SHA-256(key), reduced to the host bits available. Deterministic, so a key
    /// lands on the same address in any store with the same plan and history.
    pub(crate) fn v6_start(&self, key: &Key) -> u128 {
        let h = digest(&SHA256, &key.0);
        let mut iid = [0u8; 8];
        iid.copy_from_slice(&h.as_ref()[..8]);
        u128::from(u64::from_be_bytes(iid)) % self.v6_space()
    }

    /// The candidate addresses for `key`, in probe order, reserved ones skipped.
    pub(crate) fn v6_candidates(&self, key: &Key) -> impl Iterator<Item = Ipv6Addr> + '_ {
        let space = self.v6_space();
        let start = self.v6_start(key);
        (0..space.min(MAX_V6_PROBES))
            .map(move |i| (start + i) % space)
            .map(move |off| Ipv6Addr::from(self.v6_net | off))
            .filter(move |a| self.v6_allowed(*a))
    }

    /// True if `addr` may belong to a peer under this plan: inside the prefix and
    /// not reserved. Also used to find stored addresses a plan change left behind.
    pub(crate) fn v6_allowed(&self, addr: Ipv6Addr) -> bool {
        let bits = u128::from(addr);
        let host_mask = u128::MAX.checked_shr(u32::from(self.v6_len)).unwrap_or(0);
        if bits & !host_mask != self.v6_net {
            return false;
        }
        let host = bits & host_mask;
        if host <= LOW_RESERVED || self.reserved6.contains(&bits) {
            return false;
        }
        // In a /64 the top interface identifiers are subnet anycast addresses
        // (RFC 2526, with and without the universal/local bit; RFC 5453).
        if self.v6_len <= 64 {
            let iid = bits as u64;
            let anycast = iid >= 0xffff_ffff_ffff_ff80
                || (0xfdff_ffff_ffff_ff80..=0xfdff_ffff_ffff_ffff).contains(&iid);
            if anycast {
                return false;
            }
        }
        true
    }

    /// True if `addr` may be a peer's IPv4 address under this plan.
    pub(crate) fn v4_allowed(&self, addr: Ipv4Addr) -> bool {
        match &self.v4 {
            None => false,
            Some(pool) => pool
                .offset_of(addr)
                .is_some_and(|off| self.v4_usable(pool, off).is_some()),
        }
    }

    /// The address at `offset` of the pool, unless it is the network or broadcast
    /// address (pools shorter than /31) or explicitly reserved.
    pub(crate) fn v4_usable(&self, pool: &V4Pool, offset: u64) -> Option<Ipv4Addr> {
        if offset >= pool.size {
            return None;
        }
        if pool.len < 31 && (offset == 0 || offset == pool.size - 1) {
            return None;
        }
        // offset < 2^(32-len), so the sum stays within u32.
        let bits = pool.net | offset as u32;
        if self.reserved4.contains(&bits) {
            return None;
        }
        Some(Ipv4Addr::from(bits))
    }

    /// Describes the plan for log lines.
    pub(crate) fn describe(&self) -> String {
        let v6 = IpPrefix::new(IpAddr::V6(Ipv6Addr::from(self.v6_net)), self.v6_len)
            .map(|p| p.to_string())
            .unwrap_or_default();
        match &self.v4 {
            None => v6,
            Some(pool) => format!("{v6} + {}/{}", Ipv4Addr::from(pool.net), pool.len),
        }
    }
}

impl V4Pool {
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    fn offset_of(&self, addr: Ipv4Addr) -> Option<u64> {
        let bits = u32::from(addr);
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        (bits & mask == self.net).then_some(u64::from(bits & !mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(v6: &str, v4: Option<&str>, reserved: &[&str]) -> Plan {
        Plan::new(&AddressPlan {
            ipv6: v6.parse().unwrap(),
            ipv4_pool: v4.map(|p| p.parse().unwrap()),
            reserved: reserved.iter().map(|a| a.parse().unwrap()).collect(),
        })
        .unwrap()
    }

    #[test]
    fn v6_start_uses_the_hash_as_interface_identifier() {
        let p = plan("2001:db8:1:2::/64", None, &[]);
        let key = Key([7u8; 32]);
        let h = digest(&SHA256, &key.0);
        let iid = u64::from_be_bytes(h.as_ref()[..8].try_into().unwrap());
        let first = p.v6_candidates(&key).next().unwrap();
        assert_eq!(u128::from(first) as u64, iid);
        assert_eq!(
            u128::from(first) >> 64,
            u128::from("2001:db8:1:2::".parse::<Ipv6Addr>().unwrap()) >> 64
        );
    }

    #[test]
    fn v6_shorter_prefix_stays_in_first_slash_64() {
        let p = plan("2001:db8:ff00::/40", None, &[]);
        let a = p.v6_candidates(&Key([1u8; 32])).next().unwrap();
        assert_eq!(u128::from(a) >> 64, 0x2001_0db8_ff00_0000);
    }

    #[test]
    fn v6_longer_prefix_hashes_into_host_bits() {
        let p = plan("2001:db8::/120", None, &[]);
        // ::0 .. ::ff are reserved and a /120 has nothing else.
        assert_eq!(p.v6_candidates(&Key([1u8; 32])).count(), 0);
        let p = plan("2001:db8::/112", None, &[]);
        for i in 0..50u8 {
            let a = p.v6_candidates(&Key([i; 32])).next().unwrap();
            let host = u128::from(a) & 0xffff;
            assert!(host > 0xff, "{a}");
            assert_eq!(
                u128::from(a) >> 16,
                u128::from("2001:db8::".parse::<Ipv6Addr>().unwrap()) >> 16
            );
        }
        // Every usable address is a candidate exactly once.
        assert_eq!(p.v6_candidates(&Key([9u8; 32])).count(), 65536 - 256);
    }

    #[test]
    fn v6_reserved_addresses_are_skipped() {
        let p = plan("2001:db8::/64", None, &["2001:db8::1234", "10.0.0.1"]);
        for a in [
            "2001:db8::",
            "2001:db8::1",
            "2001:db8::ff",
            "2001:db8::1234",
        ] {
            assert!(!p.v6_allowed(a.parse().unwrap()), "{a}");
        }
        for a in [
            "2001:db8::ffff:ffff:ffff:ff80",
            "2001:db8::fdff:ffff:ffff:ffaa",
        ] {
            assert!(!p.v6_allowed(a.parse().unwrap()), "{a}");
        }
        assert!(p.v6_allowed("2001:db8::100".parse().unwrap()));
        assert!(!p.v6_allowed("2001:db9::100".parse().unwrap()));
    }

    #[test]
    fn v4_pool_skips_network_broadcast_and_reserved() {
        let p = plan("2001:db8::/64", Some("192.0.2.0/29"), &["192.0.2.1"]);
        let pool = *p.v4_pool().unwrap();
        let usable: Vec<Ipv4Addr> = (0..pool.size())
            .filter_map(|o| p.v4_usable(&pool, o))
            .collect();
        let want: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(192, 0, 2, i)).collect();
        assert_eq!(usable, want);
        assert!(p.v4_allowed("192.0.2.6".parse().unwrap()));
        assert!(!p.v4_allowed("192.0.2.7".parse().unwrap()));
        assert!(!p.v4_allowed("192.0.2.9".parse().unwrap()));

        // /31 and /32 pools have no network or broadcast address.
        let p = plan("2001:db8::/64", Some("192.0.2.4/31"), &[]);
        let pool = *p.v4_pool().unwrap();
        assert_eq!(
            (0..pool.size())
                .filter_map(|o| p.v4_usable(&pool, o))
                .count(),
            2
        );
        let p = plan("2001:db8::/64", Some("192.0.2.4/32"), &[]);
        let pool = *p.v4_pool().unwrap();
        assert_eq!(p.v4_usable(&pool, 0), Some(Ipv4Addr::new(192, 0, 2, 4)));

        let none = plan("2001:db8::/64", None, &[]);
        assert!(!none.v4_allowed("192.0.2.6".parse().unwrap()));
    }

    #[test]
    fn rejects_wrong_families() {
        let bad = AddressPlan {
            ipv6: "10.0.0.0/8".parse().unwrap(),
            ipv4_pool: None,
            reserved: vec![],
        };
        assert!(matches!(Plan::new(&bad), Err(StoreError::Invalid(_))));
        let bad = AddressPlan {
            ipv6: "2001:db8::/64".parse().unwrap(),
            ipv4_pool: Some("2001:db8::/64".parse().unwrap()),
            reserved: vec![],
        };
        assert!(matches!(Plan::new(&bad), Err(StoreError::Invalid(_))));
    }
}
