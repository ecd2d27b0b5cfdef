//! Side-by-side throughput and latency: sidecar-agent ⟷ sidecar-agent against
//! wireguard-go ⟷ wireguard-go, on the same two-namespace topology, in one invocation.
//!
//! Run with `cargo bench --bench side_by_side`; `SIDE_BY_SIDE_SECS` sets the length of each
//! iperf3 run (default 5). Prints a table and asserts nothing about speed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;

use support::agent::agent_bin;
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

struct Measurements {
    tcp1_gbps: f64,
    tcp4_gbps: f64,
    ping_avg_ms: f64,
    ping_p50_ms: f64,
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

fn measure(imp: Implementation, secs: u64) -> Measurements {
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
        let run = iperf3(&pair.a, &pair.b, server, &format!("-t {secs} {args}"));
        run.received_bits_per_second() / 1e9
    };
    let tcp1_gbps = gbps("");
    let tcp4_gbps = gbps("-P 4");
    let ping = ping_with(&pair.b, server, "-c 20 -i 0.05 -W 2");
    assert!(ping.received > 0, "no ping replies:\n{}", ping.output);
    Measurements {
        tcp1_gbps,
        tcp4_gbps,
        ping_avg_ms: ping.avg_ms(),
        ping_p50_ms: ping.p50_ms(),
    }
}

/// One line of the comparison: the same metric for both implementations.
struct Row {
    metric: String,
    unit: &'static str,
    ours: f64,
    theirs: f64,
}

impl Row {
    fn new(metric: &str, unit: &'static str, ours: f64, theirs: f64) -> Self {
        Row {
            metric: metric.to_owned(),
            unit,
            ours,
            theirs,
        }
    }
}

/// Renders rows as `metric  ours N unit  theirs N unit  ratio ours/theirs`.
fn table(ours: &str, theirs: &str, rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.metric.len()).max().unwrap_or(0);
    let mut out = String::new();
    for r in rows {
        let _ = writeln!(
            out,
            "{:<width$}   {ours} {:>7.2} {:<6}   {theirs} {:>7.2} {:<6}   ratio {:.2}",
            r.metric,
            r.ours,
            r.unit,
            r.theirs,
            r.unit,
            r.ours / r.theirs,
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
    require_tools(&["iperf3", "timeout"]);
    let secs: u64 = std::env::var("SIDE_BY_SIDE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);

    println!("wireguard-go: {}", wireguard_go_version());
    println!("sidecar-agent: {}", agent_bin().display());
    println!("topology: two namespaces, veth, outer IPv4, inner IPv4, MTU {MTU}, {secs} s runs");

    let ours = measure(Implementation::Sidecar, secs);
    let theirs = measure(Implementation::WireguardGo, secs);
    let rows = [
        Row::new("tcp 1 stream", "Gbit/s", ours.tcp1_gbps, theirs.tcp1_gbps),
        Row::new("tcp 4 streams", "Gbit/s", ours.tcp4_gbps, theirs.tcp4_gbps),
        Row::new("ping avg", "ms", ours.ping_avg_ms, theirs.ping_avg_ms),
        Row::new("ping p50", "ms", ours.ping_p50_ms, theirs.ping_p50_ms),
    ];
    print!(
        "{}",
        table(
            Implementation::Sidecar.name(),
            Implementation::WireguardGo.name(),
            &rows
        )
    );
}
