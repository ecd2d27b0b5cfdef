//! Tenant isolation, decided per packet in the data path from what the relay knows:
//! which peer and tenant hold each address, the host's own addresses, and which of
//! its routes go out through the uplink. Nothing here depends on nftables or VRFs.
//!
//! - From a peer: to another peer only of the same tenant (and not if the tenant
//!   isolates its peers); never to the host's own addresses; elsewhere only where
//!   the host's routes go out through the uplink.
//! - To a peer: from another peer under the same rules; from the host's own
//!   addresses only ICMP errors (packet too big, time exceeded, ...); nothing from
//!   networks the host reaches through other interfaces.
//!
//! Where a packet came from is judged by its source address against the routes (as
//! a strict reverse-path check would): the tunnel device does not say which
//! interface the kernel received a packet on.

use std::collections::HashMap;

use foldhash::HashMap as FastMap;
use std::net::IpAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use sidecar::route::{self, RouteEntry, RouteKind, RouteWatch};
use sidecar::wg::{AllowedIps, DropReason, PacketInfo, Policy, Verdict};
use sidecar::{IpPrefix, Key};

use crate::dataplane::PeerEntry;

/// Without notifications (a lost one is reported, but be safe) the view is read
/// again this often.
const RESYNC: Duration = Duration::from_secs(30);
/// Changes come in bursts (an interface with its addresses and routes): wait for
/// the burst to end before reading the tables.
const SETTLE: Duration = Duration::from_millis(50);

/// The relay's [`Policy`]: construct with [`TenantPolicy::new`], keep it in step with
/// the data plane's peers, and keep its host view fresh with [`TenantPolicy::refresh`]
/// or [`TenantPolicy::follow_host`].
pub struct TenantPolicy {
    tables: RwLock<Tables>,
    /// The peers' prefix and IPv4 pool: addresses there that no peer holds are
    /// answered with destination unreachable.
    prefixes: Vec<IpPrefix>,
    /// The relay's TUN device, whose routes are the peers' own.
    tun_ifindex: u32,
    /// The configured uplink; without one, the interfaces of the default routes.
    uplink: Option<String>,
}

#[derive(Default)]
struct Tables {
    /// Probed on every packet: a fast seeded hash.
    peers: FastMap<IpAddr, Owner>,
    addresses: HashMap<Key, Vec<IpAddr>>,
    host: HostView,
}

struct Owner {
    key: Key,
    tenant: Arc<str>,
    isolate: bool,
}

/// The host's side: its own addresses and which destinations leave by the uplink.
#[derive(Default)]
pub struct HostView {
    /// Table `local`: every address of every interface, and broadcast addresses.
    own: AllowedIps<()>,
    /// Table `main` without the TUN device's routes: `true` where the route goes
    /// out through the uplink.
    via_uplink: AllowedIps<bool>,
    uplinks: Vec<u32>,
}

impl HostView {
    /// The view from a route dump. `uplinks` are the uplink's interface indexes
    /// (empty: those of the default routes); routes through `tun_ifindex` are left
    /// out, since the peers' own addresses are judged by the peer table.
    pub fn from_routes(routes: &[RouteEntry], uplinks: &[u32], tun_ifindex: u32) -> HostView {
        let mut uplinks = uplinks.to_vec();
        if uplinks.is_empty() {
            for r in routes {
                if r.table == route::MAIN_TABLE && r.kind == RouteKind::Unicast && r.dst.len() == 0
                {
                    uplinks.extend(r.oifs.iter().filter(|&&o| o != tun_ifindex));
                }
            }
            uplinks.sort_unstable();
            uplinks.dedup();
        }
        let mut own = AllowedIps::new();
        // (prefix) -> (best metric, all routes at that metric go out the uplink)
        let mut best: HashMap<IpPrefix, (u32, bool)> = HashMap::new();
        for r in routes {
            match (r.table, r.kind) {
                (t, RouteKind::Local | RouteKind::Broadcast | RouteKind::Anycast)
                    if t == libc::RT_TABLE_LOCAL as u32 =>
                {
                    own.insert(r.dst, ());
                }
                (route::MAIN_TABLE, RouteKind::Unicast) => {
                    if r.oifs.is_empty() || r.oifs.contains(&tun_ifindex) {
                        continue;
                    }
                    let out = r.oifs.iter().all(|o| uplinks.contains(o));
                    let entry = best.entry(r.dst).or_insert((r.metric, out));
                    if r.metric < entry.0 {
                        *entry = (r.metric, out);
                    } else if r.metric == entry.0 {
                        entry.1 &= out;
                    }
                }
                _ => {}
            }
        }
        let mut via_uplink = AllowedIps::new();
        for (prefix, (_, out)) in best {
            via_uplink.insert(prefix, out);
        }
        HostView {
            own,
            via_uplink,
            uplinks,
        }
    }

    fn is_own(&self, a: IpAddr) -> bool {
        never_forwarded(a) || self.own.lookup(a).is_some()
    }

    /// Whether the host reaches `a` through another interface than the uplink.
    fn is_private(&self, a: IpAddr) -> bool {
        self.via_uplink.lookup(a) == Some(&false)
    }
}

/// Addresses that never mean a host beyond this one's links: loopback, link-local,
/// multicast, broadcast, unspecified and the like.
fn never_forwarded(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_link_local()
                || a.is_multicast()
                || a.is_broadcast()
                || o[0] == 0
                || o[0] >= 240
        }
        IpAddr::V6(a) => {
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some()
        }
    }
}

impl Tables {
    /// Traffic between the peer holding `from` and the peer `to`.
    fn between(&self, from: IpAddr, to: &Owner) -> Verdict {
        let Some(from) = self.peers.get(&from) else {
            return Verdict::Drop(DropReason::OtherTenant);
        };
        if from.key == to.key {
            Verdict::Pass
        } else if from.tenant != to.tenant {
            Verdict::Drop(DropReason::OtherTenant)
        } else if from.isolate || to.isolate {
            Verdict::Drop(DropReason::PeerIsolated)
        } else {
            Verdict::Pass
        }
    }
}

impl TenantPolicy {
    /// A policy with no peers and an empty host view (nothing but peer-to-peer
    /// traffic passes until [`TenantPolicy::refresh`] runs).
    pub fn new(prefixes: Vec<IpPrefix>, uplink: Option<String>, tun_ifindex: u32) -> TenantPolicy {
        TenantPolicy {
            tables: RwLock::new(Tables::default()),
            prefixes,
            tun_ifindex,
            uplink,
        }
    }

    /// Puts a peer's addresses under its tenant (replacing what it held before).
    pub fn insert(&self, peer: &PeerEntry) {
        let mut t = self.tables.write();
        Self::remove_locked(&mut t, &peer.public_key);
        let tenant: Arc<str> = Arc::from(peer.tenant.id.as_str());
        let mut addrs = vec![IpAddr::V6(peer.ipv6)];
        addrs.extend(peer.ipv4.map(IpAddr::V4));
        for &a in &addrs {
            t.peers.insert(
                a,
                Owner {
                    key: peer.public_key,
                    tenant: tenant.clone(),
                    isolate: peer.tenant.isolate_peers,
                },
            );
        }
        t.addresses.insert(peer.public_key, addrs);
    }

    pub fn remove(&self, key: &Key) {
        Self::remove_locked(&mut self.tables.write(), key);
    }

    fn remove_locked(t: &mut Tables, key: &Key) {
        for a in t.addresses.remove(key).unwrap_or_default() {
            if t.peers.get(&a).is_some_and(|o| o.key == *key) {
                t.peers.remove(&a);
            }
        }
    }

    /// Replaces the host view.
    pub fn set_host_view(&self, view: HostView) {
        self.tables.write().host = view;
    }

    /// Reads the host's addresses and routes again (in the calling thread's namespace).
    pub fn refresh(&self) -> std::io::Result<()> {
        let uplinks = match &self.uplink {
            Some(name) => vec![route::interface_index(name)?],
            None => Vec::new(),
        };
        let routes = route::dump_routes()?;
        let view = HostView::from_routes(&routes, &uplinks, self.tun_ifindex);
        if view.uplinks.is_empty() {
            tracing::warn!(
                "no uplink: neither configured nor a default route; peers reach only each other"
            );
        }
        tracing::debug!(
            own = view.own.len(),
            routes = view.via_uplink.len(),
            uplinks = ?view.uplinks,
            "host view for tenant isolation"
        );
        self.set_host_view(view);
        Ok(())
    }

    /// Keeps the host view in step with the host's interfaces, addresses and routes,
    /// from a thread of its own that ends once the policy is dropped.
    pub fn follow_host(self: &Arc<Self>) -> std::io::Result<()> {
        let watch = RouteWatch::new()?;
        let policy: Weak<TenantPolicy> = Arc::downgrade(self);
        let tun = self.tun_ifindex;
        std::thread::Builder::new()
            .name("host-view".into())
            .spawn(move || {
                let mut last = Instant::now();
                loop {
                    let changed = match watch.wait(Duration::from_secs(5), tun) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "route notifications failed; reading the host view every 30 s");
                            std::thread::sleep(Duration::from_secs(5));
                            false
                        }
                    };
                    if changed {
                        while matches!(watch.wait(SETTLE, tun), Ok(true)) {}
                    }
                    let Some(policy) = policy.upgrade() else {
                        return;
                    };
                    if changed || last.elapsed() >= RESYNC {
                        if let Err(e) = policy.refresh() {
                            tracing::warn!(error = %e, "cannot read the host's routes; keeping the previous view");
                        }
                        last = Instant::now();
                    }
                }
            })?;
        Ok(())
    }
}

impl Policy for TenantPolicy {
    fn check_from_peer(&self, p: &PacketInfo) -> Verdict {
        let t = self.tables.read();
        if let Some(to) = t.peers.get(&p.dst) {
            return t.between(p.src, to);
        }
        if t.host.is_own(p.dst) {
            Verdict::Drop(DropReason::HostAddress)
        } else if t.host.is_private(p.dst) {
            Verdict::Drop(DropReason::PrivateNetwork)
        } else {
            Verdict::Pass
        }
    }

    fn check_to_peer(&self, p: &PacketInfo) -> Verdict {
        let t = self.tables.read();
        if t.peers.contains_key(&p.src) {
            return match t.peers.get(&p.dst) {
                Some(to) => t.between(p.src, to),
                None => Verdict::Drop(DropReason::OtherTenant),
            };
        }
        if t.host.is_own(p.src) {
            if p.icmp_error {
                Verdict::Pass
            } else {
                Verdict::Drop(DropReason::HostAddress)
            }
        } else if t.host.is_private(p.src) {
            Verdict::Drop(DropReason::PrivateNetwork)
        } else {
            Verdict::Pass
        }
    }

    fn answers_unrouted(&self, dst: IpAddr) -> bool {
        self.prefixes.iter().any(|p| p.contains(dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Tenant;

    const TUN: u32 = 9;
    const UPLINK: u32 = 2;
    const LAN: u32 = 3;

    fn entry(key: u8, ipv6: &str, ipv4: Option<&str>, tenant: &str, isolate: bool) -> PeerEntry {
        PeerEntry {
            public_key: Key([key; 32]),
            ipv6: ipv6.parse().unwrap(),
            ipv4: ipv4.map(|a| a.parse().unwrap()),
            tenant: Tenant {
                id: tenant.into(),
                isolate_peers: isolate,
            },
            bandwidth_mbps: None,
            preshared_key: None,
        }
    }

    fn r(table: u32, kind: RouteKind, dst: &str, oif: u32, metric: u32) -> RouteEntry {
        RouteEntry {
            table,
            kind,
            dst: dst.parse().unwrap(),
            oifs: vec![oif],
            gateway: None,
            metric,
        }
    }

    fn policy(uplink: &[u32]) -> TenantPolicy {
        let local = libc::RT_TABLE_LOCAL as u32;
        let main = route::MAIN_TABLE;
        let routes = vec![
            r(local, RouteKind::Local, "2001:db8:1::2/128", UPLINK, 0),
            r(local, RouteKind::Local, "192.0.2.2/32", UPLINK, 0),
            r(local, RouteKind::Local, "2001:db8:9::1/128", LAN, 0),
            r(local, RouteKind::Broadcast, "192.0.2.255/32", UPLINK, 0),
            r(main, RouteKind::Unicast, "::/0", UPLINK, 1024),
            r(main, RouteKind::Unicast, "0.0.0.0/0", UPLINK, 0),
            r(main, RouteKind::Unicast, "2001:db8:1::/64", UPLINK, 256),
            r(main, RouteKind::Unicast, "2001:db8:1::/64", TUN, 4242),
            r(main, RouteKind::Unicast, "2001:db8:9::/64", LAN, 256),
            r(main, RouteKind::Unicast, "192.0.2.192/28", LAN, 0),
            r(main, RouteKind::Unicast, "2001:db8:1::a/128", TUN, 1024),
        ];
        let p = TenantPolicy::new(vec!["2001:db8:1::/64".parse().unwrap()], None, TUN);
        p.set_host_view(HostView::from_routes(&routes, uplink, TUN));
        p.insert(&entry(1, "2001:db8:1::a", Some("192.0.2.70"), "t1", false));
        p.insert(&entry(2, "2001:db8:1::b", None, "t1", false));
        p.insert(&entry(3, "2001:db8:1::c", None, "t2", false));
        p.insert(&entry(4, "2001:db8:1::d", None, "t3", true));
        p.insert(&entry(5, "2001:db8:1::e", None, "t3", true));
        p
    }

    fn pkt(src: &str, dst: &str, icmp_error: bool) -> PacketInfo {
        PacketInfo {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            icmp_error,
        }
    }

    #[test]
    fn check_from_peer() {
        for uplinks in [&[][..], &[UPLINK][..]] {
            let p = policy(uplinks);
            let from = |dst: &str| p.check_from_peer(&pkt("2001:db8:1::a", dst, false));
            assert_eq!(from("2001:db8:5::2"), Verdict::Pass, "beyond the router");
            assert_eq!(from("2001:db8:1::1"), Verdict::Pass, "the router itself");
            assert_eq!(from("2001:db8:1::b"), Verdict::Pass, "same tenant");
            assert_eq!(from("2001:db8:1::a"), Verdict::Pass, "itself");
            assert_eq!(
                from("2001:db8:1::c"),
                Verdict::Drop(DropReason::OtherTenant)
            );
            assert_eq!(
                from("2001:db8:1::2"),
                Verdict::Drop(DropReason::HostAddress)
            );
            assert_eq!(
                from("2001:db8:9::1"),
                Verdict::Drop(DropReason::HostAddress)
            );
            assert_eq!(from("ff02::1"), Verdict::Drop(DropReason::HostAddress));
            assert_eq!(from("fe80::1"), Verdict::Drop(DropReason::HostAddress));
            assert_eq!(from("::1"), Verdict::Drop(DropReason::HostAddress));
            assert_eq!(
                from("2001:db8:9::2"),
                Verdict::Drop(DropReason::PrivateNetwork)
            );
            let from4 = |dst: &str| p.check_from_peer(&pkt("192.0.2.70", dst, false));
            assert_eq!(from4("198.51.100.2"), Verdict::Pass);
            assert_eq!(from4("192.0.2.2"), Verdict::Drop(DropReason::HostAddress));
            assert_eq!(from4("192.0.2.255"), Verdict::Drop(DropReason::HostAddress));
            assert_eq!(
                from4("255.255.255.255"),
                Verdict::Drop(DropReason::HostAddress)
            );
            assert_eq!(from4("127.0.0.1"), Verdict::Drop(DropReason::HostAddress));
            assert_eq!(
                from4("192.0.2.200"),
                Verdict::Drop(DropReason::PrivateNetwork)
            );
            let iso = p.check_from_peer(&pkt("2001:db8:1::d", "2001:db8:1::e", false));
            assert_eq!(iso, Verdict::Drop(DropReason::PeerIsolated));
        }
    }

    #[test]
    fn check_to_peer() {
        let p = policy(&[UPLINK]);
        let to = |src: &str, err: bool| p.check_to_peer(&pkt(src, "2001:db8:1::a", err));
        assert_eq!(to("2001:db8:5::2", false), Verdict::Pass);
        assert_eq!(to("2001:db8:1::b", false), Verdict::Pass);
        assert_eq!(
            to("2001:db8:1::c", false),
            Verdict::Drop(DropReason::OtherTenant)
        );
        assert_eq!(
            to("2001:db8:1::2", false),
            Verdict::Drop(DropReason::HostAddress)
        );
        assert_eq!(
            to("2001:db8:1::2", true),
            Verdict::Pass,
            "packet too big from the host"
        );
        assert_eq!(
            to("2001:db8:9::2", false),
            Verdict::Drop(DropReason::PrivateNetwork)
        );
        assert_eq!(
            to("2001:db8:9::2", true),
            Verdict::Drop(DropReason::PrivateNetwork)
        );
        let iso = p.check_to_peer(&pkt("2001:db8:1::d", "2001:db8:1::e", false));
        assert_eq!(iso, Verdict::Drop(DropReason::PeerIsolated));
    }

    #[test]
    fn follows_adds_readdressing_and_removals() {
        let p = policy(&[UPLINK]);
        let a_to_c = || p.check_from_peer(&pkt("2001:db8:1::a", "2001:db8:1::c", false));
        assert_eq!(a_to_c(), Verdict::Drop(DropReason::OtherTenant));
        p.insert(&entry(3, "2001:db8:1::c", None, "t1", false));
        assert_eq!(a_to_c(), Verdict::Pass);
        p.insert(&entry(3, "2001:db8:1::f", None, "t2", false));
        // The old address is no peer's now: it leaves by the uplink's on-link route.
        assert_eq!(a_to_c(), Verdict::Pass);
        assert_eq!(
            p.check_from_peer(&pkt("2001:db8:1::a", "2001:db8:1::f", false)),
            Verdict::Drop(DropReason::OtherTenant)
        );
        p.remove(&Key([3; 32]));
        assert_eq!(
            p.check_from_peer(&pkt("2001:db8:1::a", "2001:db8:1::f", false)),
            Verdict::Pass
        );
        assert!(p.answers_unrouted("2001:db8:1::f".parse().unwrap()));
        assert!(!p.answers_unrouted("2001:db8:5::2".parse().unwrap()));
    }

    #[test]
    fn an_interface_besides_the_uplink_makes_its_routes_private() {
        // The uplink named explicitly: a default route elsewhere is private too.
        let routes = vec![
            r(route::MAIN_TABLE, RouteKind::Unicast, "::/0", LAN, 1024),
            r(
                route::MAIN_TABLE,
                RouteKind::Unicast,
                "2001:db8:5::/64",
                UPLINK,
                1024,
            ),
            r(
                route::MAIN_TABLE,
                RouteKind::Unicast,
                "2001:db8:5::/64",
                LAN,
                1024,
            ),
            r(
                route::MAIN_TABLE,
                RouteKind::Unicast,
                "2001:db8:6::/64",
                LAN,
                10,
            ),
            r(
                route::MAIN_TABLE,
                RouteKind::Unicast,
                "2001:db8:6::/64",
                UPLINK,
                5,
            ),
        ];
        let view = HostView::from_routes(&routes, &[UPLINK], TUN);
        assert!(view.is_private("2001:db8:7::1".parse().unwrap()));
        assert!(
            view.is_private("2001:db8:5::1".parse().unwrap()),
            "ties count as private"
        );
        assert!(
            !view.is_private("2001:db8:6::1".parse().unwrap()),
            "the lowest metric wins"
        );
    }
}
