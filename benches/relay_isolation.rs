//! Cost of tenant isolation on the relay path: one peer's 1420-byte IPv6 packets
//! decrypted (peer -> TUN) and encrypted (TUN -> peer) by the relay's device, with
//! the relay's policy in the data path and without it. The policy holds 1,000 peers
//! in 100 tenants and a host view of a VPS with a second (private) interface.
//! Prints both per-packet times and their ratio, then the criterion groups.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use criterion::{BatchSize, Criterion};
use sidecar::route::{RouteEntry, RouteKind, MAIN_TABLE};
use sidecar::wg::{Device, Output, PeerConfig, Policy};
use sidecar::Key;
use sidecar_relay::dataplane::{PeerEntry, Tenant};
use sidecar_relay::policy::{HostView, TenantPolicy};

const SIZE: usize = 1420;
const TUN: u32 = 9;
const UPLINK: u32 = 2;
const LAN: u32 = 3;
const PEER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x1000);
const REMOTE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 2);
const CLIENT_EP: &str = "203.0.113.2:51820";
const RELAY_EP: &str = "192.0.2.2:51820";

fn packet(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut p = vec![0u8; SIZE];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((SIZE - 40) as u16).to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p
}

/// (relay, client) with an established session.
fn established() -> (Device, Device) {
    let (kr, kc) = (Key::generate_private(), Key::generate_private());
    let (relay, client) = (Device::with_private_key(kr), Device::with_private_key(kc));
    let mut to_client = PeerConfig::new(kc.public_key());
    to_client.endpoint = Some(CLIENT_EP.parse().unwrap());
    to_client.allowed_ips = vec![sidecar::IpPrefix::host(PEER.into())];
    relay.set_peer(&to_client);
    let mut to_relay = PeerConfig::new(kr.public_key());
    to_relay.endpoint = Some(RELAY_EP.parse().unwrap());
    to_relay.allowed_ips = vec!["::/0".parse().unwrap()];
    client.set_peer(&to_relay);
    let now = Instant::now();
    let mut buf = vec![0u8; 2048];
    let Output::Transmit { datagram, .. } =
        client.handle_packet(now, &packet(PEER, REMOTE), &mut buf)
    else {
        panic!("no handshake initiation")
    };
    let init = datagram.to_vec();
    let Output::Transmit { datagram, .. } =
        relay.handle_datagram(now, CLIENT_EP.parse().unwrap(), &init, &mut buf)
    else {
        panic!("no handshake response")
    };
    let resp = datagram.to_vec();
    let _ = client.handle_datagram(now, RELAY_EP.parse().unwrap(), &resp, &mut buf);
    while client.poll_transmit(now, &mut buf).is_some() {}
    (relay, client)
}

fn policy(relay_key: Key) -> Arc<TenantPolicy> {
    let p = TenantPolicy::new(vec!["2001:db8:1::/64".parse().unwrap()], None, TUN);
    let local = libc::RT_TABLE_LOCAL as u32;
    let route = |table, kind, dst: &str, oif, metric| RouteEntry {
        table,
        kind,
        dst: dst.parse().unwrap(),
        oifs: vec![oif],
        gateway: None,
        metric,
    };
    let mut routes = vec![
        route(local, RouteKind::Local, "2001:db8:1::2/128", UPLINK, 0),
        route(local, RouteKind::Local, "192.0.2.2/32", UPLINK, 0),
        route(local, RouteKind::Local, "2001:db8:9::1/128", LAN, 0),
        route(local, RouteKind::Local, "127.0.0.0/8", 1, 0),
        route(local, RouteKind::Local, "::1/128", 1, 0),
        route(local, RouteKind::Broadcast, "192.0.2.255/32", UPLINK, 0),
        route(MAIN_TABLE, RouteKind::Unicast, "::/0", UPLINK, 1024),
        route(MAIN_TABLE, RouteKind::Unicast, "0.0.0.0/0", UPLINK, 0),
        route(
            MAIN_TABLE,
            RouteKind::Unicast,
            "2001:db8:1::/64",
            UPLINK,
            256,
        ),
        route(MAIN_TABLE, RouteKind::Unicast, "2001:db8:9::/64", LAN, 256),
        route(MAIN_TABLE, RouteKind::Unicast, "192.0.2.192/28", LAN, 0),
        route(MAIN_TABLE, RouteKind::Unicast, "fe80::/64", UPLINK, 256),
        route(MAIN_TABLE, RouteKind::Unicast, "fe80::/64", LAN, 256),
    ];
    for i in 0..1000u16 {
        routes.push(route(
            MAIN_TABLE,
            RouteKind::Unicast,
            &format!("2001:db8:1::{:x}/128", 0x1000 + i),
            TUN,
            1024,
        ));
    }
    p.set_host_view(HostView::from_routes(&routes, &[], TUN));
    for i in 0..1000u16 {
        let mut key = [0u8; 32];
        key[..2].copy_from_slice(&i.to_be_bytes());
        let key = if i == 0 { relay_key } else { Key(key) };
        p.insert(&PeerEntry {
            public_key: key,
            ipv6: Ipv6Addr::from(u128::from(PEER) + u128::from(i)),
            ipv4: None,
            tenant: Tenant {
                id: format!("tok_{}", i % 100),
                isolate_peers: false,
            },
            bandwidth_mbps: None,
            preshared_key: None,
        });
    }
    Arc::new(p)
}

/// Fresh datagrams from the client (replay protection forbids reusing them).
fn datagrams(client: &Device, n: usize) -> Vec<Vec<u8>> {
    let pkt = packet(PEER, REMOTE);
    let mut out = vec![0u8; 2048];
    (0..n)
        .map(
            |_| match client.handle_packet(Instant::now(), &pkt, &mut out) {
                Output::Transmit { datagram, .. } => datagram.to_vec(),
                other => panic!("client encapsulate: {other:?}"),
            },
        )
        .collect()
}

/// Nanoseconds per packet through the relay, both directions (decapsulate one from
/// the peer, encapsulate one for it), over `rounds` batches; the median batch.
fn relay_path_ns(relay: &Device, client: &Device, rounds: usize) -> f64 {
    let from: SocketAddr = CLIENT_EP.parse().unwrap();
    let down = packet(REMOTE, PEER);
    let mut out = vec![0u8; 2048];
    let mut per_packet: Vec<f64> = (0..rounds)
        .map(|_| {
            let batch = datagrams(client, 4000);
            let t = Instant::now();
            // The driver reads the clock once per batch.
            let now = t;
            for d in &batch {
                assert!(matches!(
                    relay.handle_datagram(now, from, d, &mut out),
                    Output::Deliver(_)
                ));
                assert!(matches!(
                    relay.handle_packet(now, &down, &mut out),
                    Output::Transmit { .. }
                ));
            }
            t.elapsed().as_nanos() as f64 / batch.len() as f64
        })
        .collect();
    per_packet.sort_by(f64::total_cmp);
    per_packet[rounds / 2]
}

fn main() {
    let (relay, client) = established();
    let policy = policy(Key::generate_private().public_key());
    let policy_dyn: Arc<dyn Policy> = policy.clone();
    // The check itself, for scale.
    let info = sidecar::wg::PacketInfo::parse(&packet(PEER, REMOTE)).unwrap();
    let t = Instant::now();
    for _ in 0..1_000_000 {
        std::hint::black_box(policy.check_from_peer(std::hint::black_box(&info)));
        std::hint::black_box(policy.check_to_peer(std::hint::black_box(&info)));
    }
    let check_ns = t.elapsed().as_nanos() as f64 / 1e6;

    // Interleaved, so drift in the machine's load hits both alike.
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        relay.set_policy(None);
        off.push(relay_path_ns(&relay, &client, 5));
        relay.set_policy(Some(policy_dyn.clone()));
        on.push(relay_path_ns(&relay, &client, 5));
    }
    off.sort_by(f64::total_cmp);
    on.sort_by(f64::total_cmp);
    let (off, on) = (off[off.len() / 2], on[on.len() / 2]);
    println!();
    println!(
        "relay path, 1420-byte IPv6 packets, one core (decapsulate + encapsulate per packet):"
    );
    println!("  isolation off {off:8.0} ns/packet");
    println!("  isolation on  {on:8.0} ns/packet");
    println!(
        "  ratio on/off  {:8.3}  ({:+.1}%)",
        on / off,
        (on / off - 1.0) * 100.0
    );
    println!("  the two policy checks alone (from and to the peer): {check_ns:.0} ns");
    println!();

    let mut c = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3))
        .configure_from_args();
    let from: SocketAddr = CLIENT_EP.parse().unwrap();
    let down = packet(REMOTE, PEER);
    let now = Instant::now();
    let mut g = c.benchmark_group("relay path 1420 B");
    for (name, p) in [
        ("isolation off", None),
        ("isolation on", Some(policy_dyn.clone())),
    ] {
        relay.set_policy(p);
        g.bench_function(format!("decapsulate, {name}"), |b| {
            b.iter_batched(
                || datagrams(&client, 1).pop().unwrap(),
                |d| {
                    let mut o = [0u8; 2048];
                    matches!(
                        relay.handle_datagram(now, from, &d, &mut o),
                        Output::Deliver(_)
                    )
                },
                BatchSize::SmallInput,
            )
        });
        let mut out = vec![0u8; 2048];
        g.bench_function(format!("encapsulate, {name}"), |b| {
            b.iter(|| {
                matches!(
                    relay.handle_packet(now, &down, &mut out),
                    Output::Transmit { .. }
                )
            })
        });
    }
    g.finish();
    c.final_summary();
}
