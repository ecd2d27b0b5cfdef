//! Side-by-side throughput and latency, in one invocation:
//!
//! * the tunnel: sidecar-agent ⟷ sidecar-agent against wireguard-go ⟷ wireguard-go, on
//!   the same two-namespace topology;
//! * the relay path of `tests/support/relay.rs` (remote host → router → relay → NAT →
//!   client): `sidecar-relay run` (userspace WireGuard, TUN, kernel forwarding, its own
//!   NDP answers) against wireguard-go with kernel forwarding and kernel proxy NDP as the
//!   relay hop. The client is `sidecar-agent up` in both, configured from the same
//!   allocation (same address, MTU and keepalive), so the relay hop is what differs.
//!
//! Run with `cargo bench --bench side_by_side`; `SIDE_BY_SIDE_SECS` sets the length of each
//! iperf3 run (default 5, plus one omitted warm-up second) and `SIDE_BY_SIDE_REPEATS` how
//! often each cell is measured (default 3, at least 1). Repetitions alternate which
//! implementation goes first, so neither always gets the cooler machine. The agent and
//! relay binaries are rebuilt (release) first. Prints medians with min-max and the ratio
//! of the medians; asserts nothing about speed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::net::IpAddr;

use support::agent::agent_bin;
use support::relay::{
    relay_bin, Allocation, ClientSite, Relay, RelayOptions, Topology, CLIENT_PORT, RELAY_UPLINK4,
    UPLINK, WG_PORT,
};
use support::traffic::ping_until_reply;
use support::wg::{wireguard_go_version, MTU};
use support::{
    cidr, endpoint, inner, iperf3, ping_with, require_tools, underlay, Agent, AgentConfig, Family,
    KeyPair, Pair, Peer, WireguardGo, BASE_TOOLS,
};

const PORT_A: u16 = 51820;
const PORT_B: u16 = 51821;

#[derive(Clone, Copy, Debug)]
enum Implementation {
    Sidecar,
    WireguardGo,
}

impl Implementation {
    fn name(self) -> &'static str {
        match self {
            Implementation::Sidecar => "sidecar",
            Implementation::WireguardGo => "wireguard-go",
        }
    }
}

/// Keeps one tunnel endpoint alive for the duration of a measurement.
// The payloads are never read: they are held only so that dropping stops the process.
#[allow(dead_code)]
enum Endpoint<'p> {
    Sidecar(Agent<'p>),
    WireguardGo(WireguardGo<'p>),
}

/// What [`measure`] reports, in this order.
const TUNNEL_METRICS: [(&str, &str); 4] = [
    ("tcp 1 stream", "Gbit/s"),
    ("tcp 4 streams", "Gbit/s"),
    ("ping avg", "ms"),
    ("ping p50", "ms"),
];

/// iperf3 arguments shared by every run: TCP's first second (slow start, ARP, handshakes)
/// is left out of the figure.
fn iperf_args(secs: u64, extra: &str) -> String {
    format!("-t {secs} --omit 1 {extra}")
}

/// Brings up host `host` (1 = A, 2 = B) of the tunnel, peered with the other host over the
/// IPv4 underlay, inner IPv4 only.
fn start_endpoint<'p>(
    imp: Implementation,
    pair: &'p Pair,
    host: u8,
    keys: &KeyPair,
    peer_keys: &KeyPair,
) -> Endpoint<'p> {
    let (ns, port, peer_host, peer_port) = match host {
        1 => (&pair.a, PORT_A, 2, PORT_B),
        _ => (&pair.b, PORT_B, 1, PORT_A),
    };
    let peer = Peer::new(&peer_keys.public)
        .allow(cidr(inner(Family::V4, peer_host), 32))
        .endpoint(endpoint(underlay(Family::V4, peer_host), peer_port));
    let address = cidr(inner(Family::V4, host), 24);
    match imp {
        Implementation::Sidecar => Endpoint::Sidecar(Agent::start(
            ns,
            &AgentConfig {
                private_key: keys.private.clone(),
                addresses: vec![address],
                listen_port: Some(port),
                mtu: Some(MTU),
                peers: vec![peer],
            },
        )),
        Implementation::WireguardGo => {
            let wg = WireguardGo::start(ns, keys, port);
            wg.add_addr(&address);
            wg.add_peer(&peer);
            Endpoint::WireguardGo(wg)
        }
    }
}

fn measure(imp: Implementation, secs: u64) -> Vec<f64> {
    let pair = Pair::new();
    let (keys_a, keys_b) = (KeyPair::generate(), KeyPair::generate());
    let _a = start_endpoint(imp, &pair, 1, &keys_a, &keys_b);
    let _b = start_endpoint(imp, &pair, 2, &keys_b, &keys_a);

    let server = inner(Family::V4, 1);
    assert!(
        ping_until_reply(&pair.b, server, std::time::Duration::from_secs(10)),
        "{} tunnel does not come up",
        imp.name()
    );
    let gbps = |args: &str| {
        let run = iperf3(&pair.a, &pair.b, server, &iperf_args(secs, args));
        run.received_bits_per_second() / 1e9
    };
    let tcp1_gbps = gbps("");
    let tcp4_gbps = gbps("-P 4");
    let ping = ping_with(&pair.b, server, "-c 20 -i 0.05 -W 2");
    assert!(ping.received > 0, "no ping replies:\n{}", ping.output);
    vec![tcp1_gbps, tcp4_gbps, ping.avg_ms(), ping.p50_ms()]
}

/// The hop between the router and the NAT in the relay topology.
#[derive(Clone, Copy, Debug)]
enum RelayHop {
    /// `sidecar-relay run`.
    Sidecar,
    /// wireguard-go with a peer and a /128 route per client, kernel forwarding, kernel
    /// proxy NDP on the uplink.
    WireguardGo,
}

impl RelayHop {
    fn name(self) -> &'static str {
        match self {
            RelayHop::Sidecar => "sidecar-relay",
            RelayHop::WireguardGo => "wg-go+kernel",
        }
    }
}

/// What [`measure_relay_path`] reports, in this order; "down" is remote → client, "up"
/// is client → remote.
const RELAY_METRICS: [(&str, &str); 6] = [
    ("relay tcp 1 stream down", "Gbit/s"),
    ("relay tcp 4 streams down", "Gbit/s"),
    ("relay tcp 1 stream up", "Gbit/s"),
    ("relay tcp 4 streams up", "Gbit/s"),
    ("relay ping avg", "ms"),
    ("relay ping p50", "ms"),
];

/// `sidecar-agent up` in the client site with the wg-quick file an agent would write from
/// `alloc`: the relay as the only peer for `::/0`, the /128 on the interface, the
/// allocation's MTU and keepalive. The agent installs no default route through its own
/// tunnel, so the IPv6 default route (the site's underlay is IPv4 only) is added here.
fn relay_client<'s>(site: &'s ClientSite, keys: &KeyPair, alloc: &Allocation) -> Agent<'s> {
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
        },
    );
    site.ns
        .ip(&format!("-6 route add default dev {}", agent.iface));
    agent
}

/// iperf3 both ways and ping, always started from the remote host towards the client.
fn measure_relay_path(
    hop: RelayHop,
    topo: &Topology,
    site: &ClientSite,
    client: IpAddr,
    secs: u64,
) -> Vec<f64> {
    assert!(
        ping_until_reply(&topo.remote, client, std::time::Duration::from_secs(15)),
        "the client behind {} does not answer the remote host",
        hop.name()
    );
    let gbps = |args: &str| {
        let run = iperf3(&site.ns, &topo.remote, client, &iperf_args(secs, args));
        run.received_bits_per_second() / 1e9
    };
    let down1 = gbps("");
    let down4 = gbps("-P 4");
    let up1 = gbps("-R");
    let up4 = gbps("-R -P 4");
    let ping = ping_with(&topo.remote, client, "-c 20 -i 0.05 -W 2");
    assert!(ping.received > 0, "no ping replies:\n{}", ping.output);
    vec![down1, down4, up1, up4, ping.avg_ms(), ping.p50_ms()]
}

/// The relay path through `sidecar-relay`; also returns the allocation, which the
/// wireguard-go run reuses so that the client is configured identically.
fn measure_sidecar_relay(secs: u64) -> (Vec<f64>, Allocation) {
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    // A token of its own without a bandwidth cap, whatever `init`'s default token has.
    let (_, token) = relay.create_token("side-by-side", 4, 0, None);
    let site = topo.client_site();
    let keys = KeyPair::generate();
    let resp = relay.register(&site.ns, &token, &keys.public, false);
    assert_eq!(resp.status, 201, "registration failed: {resp:?}");
    let alloc = Allocation::from_json(&resp.json);
    let _client = relay_client(&site, &keys, &alloc);
    let m = measure_relay_path(RelayHop::Sidecar, &topo, &site, alloc.ipv6.into(), secs);
    (m, alloc)
}

/// The same path with wireguard-go plus the kernel as the relay hop, on a fresh topology.
/// The router still has the /64 on-link and no route for the client: the relay
/// namespace answers its Neighbor Solicitations by kernel proxy NDP (`proxy_delay` 0, so
/// the kernel answers at once, as `sidecar-relay` does).
fn measure_wireguard_go_relay(secs: u64, like: &Allocation) -> Vec<f64> {
    let topo = Topology::new();
    let relay_keys = KeyPair::generate();
    let wg = WireguardGo::start(&topo.relay, &relay_keys, WG_PORT);
    let site = topo.client_site();
    let keys = KeyPair::generate();
    let alloc = Allocation {
        pubkey: keys.public.clone(),
        relay_public_key: relay_keys.public.clone(),
        relay_endpoint: endpoint(RELAY_UPLINK4.into(), WG_PORT),
        ..like.clone()
    };
    let host = format!("{}/128", alloc.ipv6);
    wg.add_peer(&Peer::new(&keys.public).allow(host.clone()));
    wg.add_route(&host);
    for setting in [
        "net.ipv6.conf.all.forwarding=1".to_owned(),
        format!("net.ipv6.conf.{UPLINK}.proxy_ndp=1"),
        format!("net.ipv6.neigh.{UPLINK}.proxy_delay=0"),
    ] {
        topo.relay.exec(&format!("sysctl -qw {setting}"));
    }
    topo.relay
        .ip(&format!("-6 neigh add proxy {} dev {UPLINK}", alloc.ipv6));
    let _client = relay_client(&site, &keys, &alloc);
    measure_relay_path(RelayHop::WireguardGo, &topo, &site, alloc.ipv6.into(), secs)
}

/// One cell of the comparison: every sample of one metric for both implementations.
struct Cell {
    metric: &'static str,
    unit: &'static str,
    ours: Vec<f64>,
    theirs: Vec<f64>,
}

/// Runs both sides `repeats` times, alternating which goes first, and collects each
/// metric's samples. `run(true)` measures ours, `run(false)` theirs; both return the
/// figures in the order of `metrics`.
fn compare(
    metrics: &[(&'static str, &'static str)],
    repeats: usize,
    mut run: impl FnMut(bool) -> Vec<f64>,
) -> Vec<Cell> {
    let mut cells: Vec<Cell> = metrics
        .iter()
        .map(|&(metric, unit)| Cell {
            metric,
            unit,
            ours: Vec::new(),
            theirs: Vec::new(),
        })
        .collect();
    for round in 0..repeats {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for ours in order {
            let figures = run(ours);
            assert_eq!(figures.len(), cells.len(), "one figure per metric");
            for (cell, v) in cells.iter_mut().zip(figures) {
                if ours {
                    cell.ours.push(v);
                } else {
                    cell.theirs.push(v);
                }
            }
        }
    }
    cells
}

/// (median, min, max) of non-empty samples.
fn spread(samples: &[f64]) -> (f64, f64, f64) {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// Renders cells as `metric  ours median (min-max) unit  theirs ...  ratio of medians`.
fn table(ours: &str, theirs: &str, cells: &[Cell]) -> String {
    let width = cells.iter().map(|c| c.metric.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in cells {
        let (om, olo, ohi) = spread(&c.ours);
        let (tm, tlo, thi) = spread(&c.theirs);
        let _ = writeln!(
            out,
            "{:<width$}   {ours} {om:>7.2} ({olo:.2}-{ohi:.2}) {:<6}   {theirs} {tm:>7.2} ({tlo:.2}-{thi:.2}) {:<6}   ratio {:.2}",
            c.metric,
            c.unit,
            c.unit,
            om / tm,
        );
    }
    out
}

fn main() {
    // `cargo test --all-targets` runs harness-less benches without `--bench`; a multi-second
    // measurement of a debug build would be both slow and meaningless there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("side_by_side: measurement runs only under `cargo bench`");
        return;
    }
    require_tools(BASE_TOOLS);
    require_tools(&["iperf3", "timeout", "curl", "nft", "sysctl"]);
    let secs: u64 = std::env::var("SIDE_BY_SIDE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let repeats: usize = std::env::var("SIDE_BY_SIDE_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);

    println!("wireguard-go: {}", wireguard_go_version());
    // Both rebuilt (release) here, before anything is measured.
    println!("sidecar-agent: {}", agent_bin().display());
    println!("sidecar-relay: {}", relay_bin().display());
    println!(
        "topology: two namespaces, veth, outer IPv4, inner IPv4, MTU {MTU}, {secs} s runs \
         (+1 s omitted), {repeats} repetitions alternating who goes first; median (min-max)"
    );

    let cells = compare(&TUNNEL_METRICS, repeats, |ours| {
        let imp = if ours {
            Implementation::Sidecar
        } else {
            Implementation::WireguardGo
        };
        measure(imp, secs)
    });
    print!(
        "{}",
        table(
            Implementation::Sidecar.name(),
            Implementation::WireguardGo.name(),
            &cells
        )
    );

    println!();
    println!(
        "relay path: remote -> router -> relay -> NAT -> client, outer IPv4, inner IPv6, {secs} s runs"
    );
    println!(
        "  client: sidecar-agent up in both (same allocation), so the relay hop dominates the difference"
    );
    println!(
        "  {}: sidecar-relay run (userspace WireGuard + TUN + kernel forwarding + its own NDP answers)",
        RelayHop::Sidecar.name()
    );
    println!(
        "  {}: wireguard-go + /128 route + kernel forwarding + kernel proxy NDP (proxy_delay 0)",
        RelayHop::WireguardGo.name()
    );
    println!("  down = remote -> client, up = client -> remote; ping from the remote host");
    // The first round runs ours first, so the allocation the wireguard-go hop copies
    // exists before it is needed.
    let mut alloc: Option<Allocation> = None;
    let cells = compare(&RELAY_METRICS, repeats, |ours| {
        if ours {
            let (figures, a) = measure_sidecar_relay(secs);
            alloc.get_or_insert(a);
            figures
        } else {
            let like = alloc
                .as_ref()
                .expect("the first round measures sidecar-relay first");
            measure_wireguard_go_relay(secs, like)
        }
    });
    print!(
        "{}",
        table(
            RelayHop::Sidecar.name(),
            RelayHop::WireguardGo.name(),
            &cells
        )
    );
}
