//! The relay path of `tests/support/relay.rs` (remote host → router → relay → NAT →
//! client): `sidecar-relay run` (userspace WireGuard, TUN, kernel forwarding, its own
//! NDP answers) against each peer implementation as the relay hop with kernel
//! forwarding and kernel proxy NDP. The client is `sidecar-agent up` behind every hop,
//! configured from the same allocation (address, MTU, keepalive), so the hop is what
//! differs.

use std::net::IpAddr;
use std::time::Duration;

use crate::daemon::{Daemon, Installed, Launch};
use crate::measure::{self, Path, Settings};
use crate::report::{self, Metric};
use crate::support::relay::{
    Allocation, ClientSite, Relay, RelayOptions, Topology, CLIENT_PORT, RELAY_UPLINK4, UPLINK,
    WG_PORT,
};
use crate::support::traffic::ping_until_reply;
use crate::support::{endpoint, Agent, AgentConfig, KeyPair, Peer};

/// What [`measure`] reports, in this order; "down" is remote → client, "up" is client →
/// remote, pings go from the remote host, the loading stream runs down.
pub const METRICS: [Metric; 9] = [
    report::gbps("tcp 1 stream down"),
    report::gbps("tcp 4 streams down"),
    report::gbps("tcp 1 stream up"),
    report::gbps("tcp 4 streams up"),
    report::ms("ping avg idle"),
    report::ms("ping p99 idle"),
    report::ms("ping avg loaded"),
    report::ms("ping p99 loaded"),
    report::percent("ping loss loaded"),
];

/// The hop between the router and the NAT.
pub enum Hop {
    /// `sidecar-relay run`.
    Sidecar,
    /// A peer implementation with a peer and a /128 route per client, kernel
    /// forwarding, kernel proxy NDP on the uplink.
    Peer(Installed),
}

impl Hop {
    pub fn name(&self) -> String {
        match self {
            Hop::Sidecar => "sidecar-relay".to_owned(),
            Hop::Peer(i) => format!("{}+kernel", i.kind.name()),
        }
    }
}

/// `sidecar-agent up` in the client site with the wg-quick file an agent would write from
/// `alloc`: the relay as the only peer for `::/0`, the /128 on the interface, the
/// allocation's MTU and keepalive. The agent installs no default route through its own
/// tunnel, so the IPv6 default route (the site's underlay is IPv4 only) is added here.
fn client<'s>(site: &'s ClientSite, keys: &KeyPair, alloc: &Allocation) -> Agent<'s> {
    let peer = Peer::new(&alloc.relay_public_key)
        .allow("::/0")
        .endpoint(alloc.relay_endpoint.clone())
        .keepalive(alloc.keepalive);
    let agent = Agent::start(
        &site.ns,
        &AgentConfig {
            private_key: keys.private.clone(),
            addresses: vec![format!("{}/128", alloc.ipv6)],
            listen_port: Some(CLIENT_PORT),
            mtu: Some(alloc.mtu),
            peers: vec![peer],
            noise_backend: None,
        },
    );
    site.ns
        .ip(&format!("-6 route add default dev {}", agent.iface));
    agent
}

/// Every metric, always started from the remote host towards the client.
fn measure_path(
    hop: &Hop,
    topo: &Topology,
    site: &ClientSite,
    addr: IpAddr,
    s: Settings,
) -> Vec<f64> {
    assert!(
        ping_until_reply(&topo.remote, addr, Duration::from_secs(15)),
        "the client behind {} does not answer the remote host",
        hop.name()
    );
    let path = Path {
        server: &site.ns,
        client: &topo.remote,
        addr,
    };
    let down1 = measure::tcp_gbps(&path, s, "");
    let down4 = measure::tcp_gbps(&path, s, "-P 4");
    let up1 = measure::tcp_gbps(&path, s, "-R");
    let up4 = measure::tcp_gbps(&path, s, "-R -P 4");
    let idle = measure::ping_idle(&path);
    let (loaded, _) = measure::ping_loaded(&path, s, "", None);
    vec![
        down1,
        down4,
        up1,
        up4,
        idle.avg_ms,
        idle.p99_ms,
        loaded.avg_ms,
        loaded.p99_ms,
        loaded.loss_percent,
    ]
}

/// One round through `sidecar-relay`; also returns the allocation, which the peer hops
/// copy so that the client is configured identically.
fn measure_sidecar(s: Settings) -> (Vec<f64>, Allocation) {
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    // A token of its own without a bandwidth cap, whatever `init`'s default token has.
    let (_, token) = relay.create_token("side-by-side", 4, 0, None);
    let site = topo.client_site();
    let keys = KeyPair::generate();
    let resp = relay.register(&site.ns, &token, &keys.public, false);
    assert_eq!(resp.status, 201, "registration failed: {resp:?}");
    let alloc = Allocation::from_json(&resp.json);
    let _client = client(&site, &keys, &alloc);
    let m = measure_path(&Hop::Sidecar, &topo, &site, alloc.ipv6.into(), s);
    (m, alloc)
}

/// One round with peer `imp` plus the kernel as the relay hop, on a fresh topology.
/// The router still has the /64 on-link and no route for the client: the relay
/// namespace answers its Neighbor Solicitations by kernel proxy NDP (`proxy_delay` 0, so
/// the kernel answers at once, as `sidecar-relay` does).
fn measure_peer(imp: &Installed, s: Settings, like: &Allocation) -> Vec<f64> {
    let topo = Topology::new();
    let relay_keys = KeyPair::generate();
    let mut hop = Daemon::start(&topo.relay, imp, &Launch::default(), &relay_keys, WG_PORT);
    let site = topo.client_site();
    let keys = KeyPair::generate();
    let alloc = Allocation {
        pubkey: keys.public.clone(),
        relay_public_key: relay_keys.public.clone(),
        relay_endpoint: endpoint(RELAY_UPLINK4.into(), WG_PORT),
        ..like.clone()
    };
    let host = format!("{}/128", alloc.ipv6);
    hop.add_peer(&Peer::new(&keys.public).allow(host.clone()));
    hop.add_route(&host);
    for setting in [
        "net.ipv6.conf.all.forwarding=1".to_owned(),
        format!("net.ipv6.conf.{UPLINK}.proxy_ndp=1"),
        format!("net.ipv6.neigh.{UPLINK}.proxy_delay=0"),
    ] {
        topo.relay.exec(&format!("sysctl -qw {setting}"));
    }
    topo.relay
        .ip(&format!("-6 neigh add proxy {} dev {UPLINK}", alloc.ipv6));
    let _client = client(&site, &keys, &alloc);
    let figures = measure_path(&Hop::Peer(imp.clone()), &topo, &site, alloc.ipv6.into(), s);
    hop.assert_running();
    figures
}

/// Runs `hops[i]` for one round; the first call must be for [`Hop::Sidecar`], whose
/// allocation the others copy.
pub struct Runner {
    alloc: Option<Allocation>,
}

impl Runner {
    pub fn new() -> Runner {
        Runner { alloc: None }
    }

    pub fn measure(&mut self, hop: &Hop, s: Settings) -> Vec<f64> {
        match hop {
            Hop::Sidecar => {
                let (figures, alloc) = measure_sidecar(s);
                self.alloc.get_or_insert(alloc);
                figures
            }
            Hop::Peer(imp) => {
                let like = self
                    .alloc
                    .as_ref()
                    .expect("the first round measures sidecar-relay first");
                measure_peer(imp, s, like)
            }
        }
    }
}
