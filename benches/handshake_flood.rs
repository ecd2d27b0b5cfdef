//! An established peer's TCP throughput through `sidecar-relay` while the relay is
//! flooded with handshake initiations, against the same without the flood.
//!
//! Topology of `tests/support/relay.rs`: remote host → router → relay → NAT → client,
//! the client being `sidecar-agent up` with its allocation. The flood comes from the
//! router namespace: `HANDSHAKE_FLOOD_RATE` (default 10,000) initiations a second, each
//! with a valid mac1 from a fresh random key, from spoofed sources in
//! `198.51.100.128/25` (raw socket). The router counts the relay's answers to those
//! sources (cookie replies) and drops them.
//!
//! iperf3 (one TCP stream, remote → client, `HANDSHAKE_FLOOD_SECS` seconds, default 5)
//! runs alternately without and with the flood, `HANDSHAKE_FLOOD_ROUNDS` times each
//! (default 2). Prints both rates, their ratio (target: at least 0.90) and the cookie
//! replies; asserts only that the client stayed reachable.
//!
//! Run with `cargo bench --bench handshake_flood`. The binaries are rebuilt first.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::{IpAddr, SocketAddrV4};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use support::agent::agent_bin;
use support::flood::{self, Flood};
use support::relay::{
    relay_bin, Allocation, ClientSite, Relay, RelayOptions, Topology, CLIENT_PORT, RELAY_UPLINK4,
    WG_PORT,
};
use support::traffic::ping_until_reply;
use support::{iperf3, require_tools, Agent, AgentConfig, KeyPair, Peer, BASE_TOOLS};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `sidecar-agent up` configured from `alloc`, with the IPv6 default route into it.
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    // `cargo test --all-targets` runs harness-less benches without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("handshake_flood: measurement runs only under `cargo bench`");
        return;
    }
    require_tools(BASE_TOOLS);
    require_tools(&["iperf3", "timeout", "curl", "nft", "sysctl"]);
    let rate = u32::try_from(env_u64("HANDSHAKE_FLOOD_RATE", 10_000)).expect("rate fits u32");
    let secs = env_u64("HANDSHAKE_FLOOD_SECS", 5);
    let rounds = env_u64("HANDSHAKE_FLOOD_ROUNDS", 2).max(1);
    println!("sidecar-relay: {}", relay_bin().display());
    println!("sidecar-agent: {}", agent_bin().display());

    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let (_, token) = relay.create_token("flood-bench", 4, 0, None);
    let site = topo.client_site();
    let keys = KeyPair::generate();
    let resp = relay.register(&site.ns, &token, &keys.public, false);
    assert_eq!(resp.status, 201, "registration failed: {resp:?}");
    let alloc = Allocation::from_json(&resp.json);
    let _client = client(&site, &keys, &alloc);
    let addr: IpAddr = alloc.ipv6.into();
    assert!(
        ping_until_reply(&topo.remote, addr, Duration::from_secs(15)),
        "the client does not answer through the relay"
    );

    let target = SocketAddrV4::new(RELAY_UPLINK4, WG_PORT);
    flood::prepare_router(&topo.router, target);
    let relay_public: [u8; 32] = STANDARD
        .decode(&alloc.relay_public_key)
        .expect("relay key is base64")
        .try_into()
        .expect("relay key is 32 bytes");
    let packets = flood::initiations(relay_public, 1024);

    let gbps = || {
        let run = iperf3(&site.ns, &topo.remote, addr, &format!("-t {secs}"));
        run.received_bits_per_second() / 1e9
    };
    let mut quiet = Vec::new();
    let mut flooded = Vec::new();
    let (mut sent, mut flood_time, mut replies) = (0u64, Duration::ZERO, 0u64);
    for _ in 0..rounds {
        quiet.push(gbps());
        let before = flood::cookie_replies(&topo.router);
        let flood = Flood::start(&topo.router, target, packets.clone(), rate);
        // Let the gate reach its steady state (load detected, cookies demanded).
        std::thread::sleep(Duration::from_millis(500));
        flooded.push(gbps());
        let (n, t) = flood.stop();
        sent += n;
        flood_time += t;
        replies += flood::cookie_replies(&topo.router) - before;
    }
    assert!(
        ping_until_reply(&topo.remote, addr, Duration::from_secs(5)),
        "the client stopped answering after the flood"
    );
    assert!(relay.dump().iter().any(|p| p.public_key == keys.public));

    let (q, f) = (median(&mut quiet), median(&mut flooded));
    println!(
        "handshake flood: relay in its namespace, sidecar-agent client behind NAT, iperf3 \
         1 TCP stream remote -> client, {secs} s runs, {rounds} of each, {} CPUs shared by all",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "flood: {sent} initiations in {:.1} s ({:.0}/s) from 126 spoofed sources; the relay sent \
         {replies} cookie replies ({:.1}% of them)",
        flood_time.as_secs_f64(),
        sent as f64 / flood_time.as_secs_f64(),
        100.0 * replies as f64 / sent.max(1) as f64,
    );
    println!("{:<28} {:>10}  runs", "", "Gbit/s");
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "{:<28} {:>10.2}  {}",
        "without flood (median)",
        q,
        list(&quiet)
    );
    println!(
        "{:<28} {:>10.2}  {}",
        "with flood (median)",
        f,
        list(&flooded)
    );
    println!(
        "{:<28} {:>10.3}  (target >= 0.90)",
        "ratio flooded / quiet",
        f / q
    );
}
