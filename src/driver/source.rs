//! The local address each remote endpoint last sent to, so our replies leave from it
//! (`IP_PKTINFO`/`IPV6_PKTINFO`) on a host with several addresses: a peer that talks
//! to a secondary address would otherwise see its endpoint change to whatever source
//! the kernel picks, and a stateful firewall on its side would drop our replies.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use parking_lot::RwLock;

/// More remote addresses than this (roaming peers behind changing NATs, over a long
/// time) and the table starts over; each entry is re-learned from the next packet.
const MAX_ENTRIES: usize = 1 << 16;

#[derive(Default)]
pub(super) struct Sources {
    by_remote: RwLock<HashMap<SocketAddr, IpAddr, foldhash::fast::RandomState>>,
}

impl Sources {
    /// Records that `remote` sent an authenticated datagram to our `local` address.
    pub(super) fn learn(&self, remote: SocketAddr, local: IpAddr) {
        let remote = canonical(remote);
        if self.by_remote.read().get(&remote) == Some(&local) {
            return;
        }
        let mut map = self.by_remote.write();
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(remote, local);
    }

    /// The local address to send to `remote` from, if it has sent to us.
    pub(super) fn get(&self, remote: SocketAddr) -> Option<IpAddr> {
        self.by_remote.read().get(&canonical(remote)).copied()
    }

    /// Drops the source for `remote` (it is no longer one of our addresses).
    pub(super) fn forget(&self, remote: SocketAddr) {
        self.by_remote.write().remove(&canonical(remote));
    }

    /// Drops every source (a new socket may see addresses in another form).
    pub(super) fn clear(&self) {
        self.by_remote.write().clear();
    }
}

/// The device names peers by plain IPv4 addresses, a dual-stack socket by mapped
/// ones; either finds the same entry.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_plain_ipv4_are_one_remote() {
        let sources = Sources::default();
        let local: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        sources.learn("[::ffff:192.0.2.1]:51820".parse().unwrap(), local);
        assert_eq!(sources.get("192.0.2.1:51820".parse().unwrap()), Some(local));
        assert_eq!(sources.get("192.0.2.1:51821".parse().unwrap()), None);
        sources.forget("192.0.2.1:51820".parse().unwrap());
        assert_eq!(sources.get("192.0.2.1:51820".parse().unwrap()), None);
    }

    #[test]
    fn the_latest_local_address_wins() {
        let sources = Sources::default();
        let remote: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        sources.learn(remote, "2001:db8::a".parse().unwrap());
        sources.learn(remote, "2001:db8::b".parse().unwrap());
        assert_eq!(sources.get(remote), "2001:db8::b".parse().ok());
    }
}
