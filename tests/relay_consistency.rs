//! The relay keeps one truth: racing register / delete / revoke calls on overlapping
//! keys leave `wg show`, the relay's routes and its neighbour answers exactly as
//! `GET /v1/peers` says; and kill -9 in the middle of a registration storm loses no
//! acknowledged registration and hands no address out twice.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;
use support::relay::{Relay, RelayOptions, Topology, IPV4_POOL, RELAY_TOOLS};
use support::{require_tools, wait_until, BASE_TOOLS};

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
}

fn new_pubkey() -> String {
    sidecar::Key::generate_private().public_key().to_base64()
}

/// What `GET /v1/peers` with the admin token lists: pubkey -> (IPv6, IPv4).
fn listed(relay: &Relay) -> BTreeMap<String, (Ipv6Addr, Option<Ipv4Addr>)> {
    let r = relay.call(
        relay.ns(),
        "GET",
        "/v1/peers",
        &relay.creds.admin_token,
        None,
    );
    assert_eq!(r.status, 200, "GET /v1/peers: {r:?}");
    let host = |v: &serde_json::Value, suffix: &str| -> Option<String> {
        v.as_str()
            .map(|a| a.strip_suffix(suffix).unwrap_or(a).to_owned())
    };
    r.json["peers"]
        .as_array()
        .expect("peers array")
        .iter()
        .map(|p| {
            let key = p["pubkey"].as_str().expect("pubkey").to_owned();
            let v6 = host(&p["ipv6"], "/128")
                .and_then(|a| a.parse().ok())
                .expect("ipv6");
            let v4 = host(&p["ipv4"], "/32").map(|a| a.parse().expect("ipv4"));
            (key, (v6, v4))
        })
        .collect()
}

/// `wg show` on the relay: pubkey -> allowed IPs, sorted.
fn wg_peers(relay: &Relay) -> BTreeMap<String, BTreeSet<String>> {
    relay
        .dump()
        .into_iter()
        .map(|p| (p.public_key, p.allowed_ips.into_iter().collect()))
        .collect()
}

/// Host routes into the relay's TUN device.
fn tun_routes(relay: &Relay) -> BTreeSet<IpAddr> {
    let mut out = BTreeSet::new();
    for family in ["-6", "-4"] {
        let text = relay
            .ns()
            .ip(&format!("{family} route show dev {}", relay.iface));
        for line in text.lines() {
            let Some(dst) = line.split_whitespace().next() else {
                continue;
            };
            let dst = dst.trim_end_matches("/128").trim_end_matches("/32");
            match dst.parse::<IpAddr>() {
                // The device's own link-local route is not a peer's.
                Ok(IpAddr::V6(v)) if v.segments()[0] & 0xffc0 == 0xfe80 => {}
                Ok(a) => {
                    out.insert(a);
                }
                Err(_) => {}
            }
        }
    }
    out
}

/// Which of `addrs` the relay answers Neighbor Solicitations (IPv6) or ARP
/// requests (IPv4) for, as the router sees it: the router's neighbour cache is
/// flushed, the router sends one packet to every address at once (its kernel
/// solicits each), and an address counts as answered when the router has
/// resolved it to the relay's uplink MAC.
fn answered(topo: &Topology, addrs: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
    let mac = topo.relay_uplink_mac();
    let dev = "relay0";
    topo.router.ip(&format!("-6 neigh flush dev {dev}"));
    topo.router.ip(&format!("-4 neigh flush dev {dev}"));
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let mut sh = topo.router.program("sh");
    sh.arg("-c").arg(format!(
        "for a in {}; do ping -c 1 -W 1 $a >/dev/null 2>&1 & done; wait; true",
        list.join(" ")
    ));
    support::process::run_ok(sh);
    addrs
        .iter()
        .copied()
        .filter(|a| topo.router_neighbor(*a).as_deref() == Some(mac.as_str()))
        .collect()
}

#[test]
fn racing_calls_leave_wg_show_routes_and_neighbour_answers_equal_to_the_api() {
    require();
    const KEYS: usize = 24;
    const WORKERS: usize = 24;
    const CALLS_EACH: usize = 13;
    let started = std::time::Instant::now();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: true });
    eprintln!("relay up after {:?}", started.elapsed());
    let keys: Vec<String> = (0..KEYS).map(|_| new_pubkey()).collect();
    // Three tenants; a revoked one is replaced by a fresh token in its slot.
    let slots: Mutex<Vec<(String, String)>> = Mutex::new(
        (0..3)
            .map(|i| relay.create_token(&format!("t{i}"), 100, 8, None))
            .collect(),
    );
    let ever: Mutex<BTreeSet<IpAddr>> = Mutex::new(BTreeSet::new());
    let calls = AtomicUsize::new(0);
    let revoked = AtomicUsize::new(0);

    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (relay, keys, slots, ever, calls, revoked) =
                (&relay, &keys, &slots, &ever, &calls, &revoked);
            s.spawn(move || {
                for c in 0..CALLS_EACH {
                    let n = w * CALLS_EACH + c;
                    // Overlapping on purpose: each key is hit by many workers.
                    let key = &keys[(w * 7 + c * 5) % KEYS];
                    let slot = (w + c) % 3;
                    let (id, secret) = slots.lock().unwrap()[slot].clone();
                    let r = match n % 9 {
                        0..=4 => relay.register(relay.ns(), &secret, key, n % 3 == 0),
                        5..=7 => relay.call(
                            relay.ns(),
                            "DELETE",
                            "/v1/peers",
                            &secret,
                            Some(&json!({"pubkey": key})),
                        ),
                        _ if n % 45 == 8 => {
                            let r = relay.call(
                                relay.ns(),
                                "DELETE",
                                "/v1/admin/tokens",
                                &relay.creds.admin_token,
                                Some(&json!({"id": id})),
                            );
                            if r.status == 204 {
                                revoked.fetch_add(1, Ordering::Relaxed);
                                let fresh = relay.create_token("fresh", 100, 8, None);
                                slots.lock().unwrap()[slot] = fresh;
                            }
                            r
                        }
                        _ => relay.call(relay.ns(), "GET", "/v1/peers", &secret, None),
                    };
                    assert!(
                        r.status != 0 && (r.status < 500 || r.error() == "pool_exhausted"),
                        "call {n}: {r:?}"
                    );
                    if matches!(r.status, 200 | 201) {
                        if let Some(a) = r.json["ipv6"].as_str() {
                            let a = a.trim_end_matches("/128").parse().expect("ipv6");
                            ever.lock().unwrap().insert(IpAddr::V6(a));
                        }
                        if let Some(a) = r.json["ipv4"].as_str() {
                            let a = a.trim_end_matches("/32").parse().expect("ipv4");
                            ever.lock().unwrap().insert(IpAddr::V4(a));
                        }
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let calls = calls.into_inner();
    let revoked = revoked.into_inner();
    eprintln!(
        "{calls} calls, {revoked} token revocations, by {:?}",
        started.elapsed()
    );
    assert!(revoked > 0, "the mix must revoke tokens");

    let api = listed(&relay);
    assert!(
        !api.is_empty(),
        "the mix should leave some peers registered"
    );
    // wg show: exactly the listed peers, each with exactly its addresses.
    let want_wg: BTreeMap<String, BTreeSet<String>> = api
        .iter()
        .map(|(k, (v6, v4))| {
            let mut ips = BTreeSet::from([format!("{v6}/128")]);
            if let Some(v4) = v4 {
                ips.insert(format!("{v4}/32"));
            }
            (k.clone(), ips)
        })
        .collect();
    assert_eq!(
        wg_peers(&relay),
        want_wg,
        "wg show differs from GET /v1/peers"
    );

    let owned: BTreeSet<IpAddr> = api
        .values()
        .flat_map(|(v6, v4)| std::iter::once(IpAddr::V6(*v6)).chain(v4.map(IpAddr::V4)))
        .collect();
    assert_eq!(
        tun_routes(&relay),
        owned,
        "routes into the TUN device differ"
    );

    // Every address ever handed out, plus two never handed out: the relay answers
    // for exactly the listed ones.
    let mut probe = ever.into_inner().unwrap();
    probe.insert("2001:db8:1::dead:beef".parse().unwrap());
    let pool: sidecar::IpPrefix = IPV4_POOL.parse().unwrap();
    let IpAddr::V4(base) = pool.network().addr() else {
        unreachable!()
    };
    probe.insert(IpAddr::V4(Ipv4Addr::from(u32::from(base) + 30)));
    assert!(owned.is_subset(&probe));
    eprintln!(
        "{} peers listed; probing {} addresses",
        api.len(),
        probe.len()
    );
    assert_eq!(
        answered(&topo, &probe),
        owned,
        "neighbour answers differ from GET /v1/peers (probed {} addresses)",
        probe.len()
    );
}

#[test]
fn kill_9_in_a_registration_storm_keeps_every_acknowledged_registration() {
    require();
    const WORKERS: usize = 12;
    const KILL_AFTER: usize = 40;
    let started = std::time::Instant::now();
    let topo = Topology::new();
    let mut relay = Relay::start(&topo, &RelayOptions::default());
    eprintln!("relay up after {:?}", started.elapsed());
    let (_, token) = relay.create_token("storm", 10_000, 0, None);
    let acked: Mutex<Vec<(String, Ipv6Addr)>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);

    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            let (relay, token, acked, stop) = (&relay, &token, &acked, &stop);
            s.spawn(move || {
                for _ in 0..500 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let key = new_pubkey();
                    let r = relay.register(relay.ns(), token, &key, false);
                    match r.status {
                        201 => {
                            let a = r.json["ipv6"]
                                .as_str()
                                .and_then(|a| a.strip_suffix("/128"))
                                .and_then(|a| a.parse().ok())
                                .unwrap_or_else(|| panic!("no ipv6 in {r:?}"));
                            acked.lock().unwrap().push((key, a));
                        }
                        // The relay is gone: curl could not connect or lost the answer.
                        0 => return,
                        other => panic!("registration answered {other}: {r:?}"),
                    }
                }
            });
        }
        let enough = wait_until(Duration::from_secs(60), || {
            acked.lock().unwrap().len() >= KILL_AFTER
        });
        assert!(enough, "the storm did not get going");
        relay.signal(libc::SIGKILL);
        stop.store(true, Ordering::Relaxed);
    });
    let exit = relay.wait_exit(Duration::from_secs(10));
    assert!(exit.is_some(), "relay survived SIGKILL");
    let acked = acked.into_inner().unwrap();
    eprintln!(
        "{} registrations acknowledged before kill -9, by {:?}",
        acked.len(),
        started.elapsed()
    );

    relay.run();
    eprintln!("relay back after {:?}", started.elapsed());
    let api = listed(&relay);
    for (key, a) in &acked {
        assert_eq!(
            api.get(key).map(|(v6, _)| v6),
            Some(a),
            "acknowledged registration of {key} ({a}) lost or re-addressed"
        );
    }
    let addrs: BTreeSet<Ipv6Addr> = api.values().map(|(v6, _)| *v6).collect();
    assert_eq!(addrs.len(), api.len(), "an address belongs to two peers");
    let on_wg: BTreeSet<String> = wg_peers(&relay).into_keys().collect();
    assert_eq!(
        on_wg,
        api.keys().cloned().collect(),
        "wg show after restart"
    );

    // New registrations after the restart get addresses nobody holds.
    let mut taken = addrs;
    for _ in 0..10 {
        let r = relay.register(relay.ns(), &token, &new_pubkey(), false);
        assert_eq!(r.status, 201, "{r:?}");
        let a: Ipv6Addr = r.json["ipv6"]
            .as_str()
            .and_then(|a| a.strip_suffix("/128"))
            .and_then(|a| a.parse().ok())
            .expect("ipv6");
        assert!(taken.insert(a), "{a} handed out twice");
    }
}
