//! Post-quantum preshared keys and machine-bound tokens, end to end against the
//! relay binary in the namespaces of tests/support/relay.rs:
//!
//! - a plain WireGuard client (wireguard-go) gets its preshared key with
//!   `sidecar-agent psk`; the relay's `wg show` has the same key and traffic flows;
//!   a registration without the X-Wing step is refused while require_pq is on;
//! - an agent in Docker registers a container with a preshared key, and while the
//!   key rotates every 2 s a 10 ms ping and a TCP stream through the tunnel lose
//!   nothing;
//! - a token bound to one machine refuses another (403 machine_mismatch) until the
//!   admin resets the binding; an unbound token works from two machines;
//! - a TLS client that offers only X25519MLKEM768 connects and the relay logs it
//!   as post-quantum.

mod support;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::agent::{agent_bin, agent_status};
use support::docker::{Dockerd, DOCKER_TOOLS};
use support::process::{ChildGuard, TempDir};
use support::relay::{
    time_until_reply, Allocation, Client, ClientSite, Relay, RelayOptions, Topology, API_PORT,
    RELAY_TOOLS, RELAY_UPLINK4, REMOTE6,
};
use support::traffic::ping_with;
use support::wg::KeyPair;
use support::{require_tools, unique_name, wait_until, Netns, BASE_TOOLS};

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
}

/// A relay as `init` makes it by default: post-quantum keys required. The default
/// token stays unbound so one test process can play several machines with it.
fn pq_relay<'t>(topo: &'t Topology, rotate_secs: u64) -> Relay<'t> {
    Relay::start_with_init_args(
        topo,
        &RelayOptions::default(),
        &[
            "--require-pq",
            "true",
            "--pq-rotate-secs",
            &rotate_secs.to_string(),
            "--bind-default-token",
            "false",
        ],
    )
}

/// `sidecar-agent psk` from `ns`: registers `pubkey` and writes its preshared key.
fn psk_command(
    ns: &Netns,
    relay: &Relay,
    token: &str,
    pubkey: &str,
    psk_file: &Path,
    machine_id: Option<&Path>,
) -> Output {
    let mut cmd = ns.program(agent_bin());
    cmd.args(["psk", "--relay", &relay.url("")])
        .args(["--token", token, "--pin", &relay.creds.pin])
        .args(["--pubkey", pubkey])
        .arg("--psk-file")
        .arg(psk_file)
        .env_remove("SIDECAR_MACHINE_ID_FILE");
    if let Some(id) = machine_id {
        cmd.env("SIDECAR_MACHINE_ID_FILE", id);
    }
    cmd.output().expect("run sidecar-agent psk")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The allocation of a registered key, from the token's listing.
fn listed_allocation(relay: &Relay, token: &str, pubkey: &str) -> Allocation {
    let r = relay.call(relay.ns(), "GET", "/v1/peers", token, None);
    assert_eq!(r.status, 200, "{r:?}");
    let mut peer = r.json["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pubkey"] == pubkey).cloned())
        .unwrap_or_else(|| panic!("{pubkey} is not listed: {}", r.body));
    peer["created"] = json!(false);
    Allocation::from_json(&peer)
}

fn connect_with_psk<'s>(
    site: &'s ClientSite,
    relay: &Relay,
    dir: &TempDir,
) -> (Client<'s>, String) {
    let keys = KeyPair::generate();
    let psk_file = dir.join(&unique_name("psk"));
    let out = psk_command(
        &site.ns,
        relay,
        &relay.creds.default_token,
        &keys.public,
        &psk_file,
        None,
    );
    assert!(
        out.status.success(),
        "sidecar-agent psk failed: {}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("preshared-key"), "no wg set line: {stdout}");
    let psk = std::fs::read_to_string(&psk_file)
        .unwrap()
        .trim()
        .to_owned();
    let alloc = listed_allocation(relay, &relay.creds.default_token, &keys.public);
    let relay_key = alloc.relay_public_key.clone();
    let client = Client::configure(site, keys, alloc);
    client.wg.wg(&format!(
        "set {{}} peer {relay_key} preshared-key {}",
        psk_file.display()
    ));
    (client, psk)
}

#[test]
fn plain_client_gets_the_relays_pq_psk_and_a_plain_registration_is_refused() {
    require();
    let topo = Topology::new();
    let mut relay = pq_relay(&topo, 3600);
    let site = topo.client_site();
    let dir = TempDir::new();

    let plain = KeyPair::generate();
    let refused = relay.register(&site.ns, &relay.creds.default_token, &plain.public, false);
    assert_eq!(
        (refused.status, refused.error()),
        (403, "pq_required"),
        "{refused:?}"
    );
    assert!(refused.message().contains("post-quantum"), "{refused:?}");
    assert!(
        relay.peer(&plain.public).is_none(),
        "a refused peer is on the data plane"
    );

    let (client, psk) = connect_with_psk(&site, &relay, &dir);
    assert_eq!(
        relay.preshared_key(&client.keys.public).as_deref(),
        Some(psk.as_str()),
        "`wg show preshared-keys` on the relay must show the client's key"
    );
    assert_eq!(psk.len(), 44, "a base64 key: {psk}");
    let took = time_until_reply(client.ns(), REMOTE6.into(), Duration::from_secs(30));
    assert!(
        took.is_some(),
        "no traffic with the preshared key:\n{}\nrelay log:\n{}",
        client.wg.wg("show {}"),
        relay.log_tail(30)
    );
    // The key never reaches the log.
    assert!(
        !relay.log().contains(&psk),
        "the relay logged the preshared key"
    );

    // Only the ciphertext is stored: a restarted relay derives the same key again.
    relay.stop(libc::SIGTERM);
    relay.run();
    assert_eq!(
        relay.preshared_key(&client.keys.public).as_deref(),
        Some(psk.as_str()),
        "the preshared key after a restart"
    );

    let again = relay.call(
        relay.ns(),
        "GET",
        "/v1/pq",
        &relay.creds.default_token,
        None,
    );
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json["required"], true);
}

#[test]
fn a_bound_token_refuses_another_machine_until_the_admin_resets_it() {
    require();
    let topo = Topology::new();
    let relay = pq_relay(&topo, 3600);
    let site = topo.client_site();
    let dir = TempDir::new();
    let machine_a = dir.join("machine-a");
    let machine_b = dir.join("machine-b");
    std::fs::write(&machine_a, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(&machine_b, "fedcba9876543210fedcba9876543210\n").unwrap();
    let register = |token: &str, machine: &Path| {
        let keys = KeyPair::generate();
        let out = psk_command(
            &site.ns,
            &relay,
            token,
            &keys.public,
            &dir.join(&unique_name("psk")),
            Some(machine),
        );
        (out, keys.public)
    };

    let (id, bound) = relay.create_bound_token("bound", 10);
    let (first, _) = register(&bound, &machine_a);
    assert!(first.status.success(), "first machine: {}", text(&first));
    let (second, key_b) = register(&bound, &machine_b);
    assert!(
        !second.status.success(),
        "another machine was accepted: {}",
        text(&second)
    );
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("403") && err.contains("machine_mismatch"),
        "{err}"
    );
    assert!(
        err.contains("unbind-machine") && err.contains(&id),
        "no way out named: {err}"
    );
    assert!(relay.peer(&key_b).is_none());
    let again = register(&bound, &machine_a).0;
    assert!(
        again.status.success(),
        "the bound machine again: {}",
        text(&again)
    );

    let reset = relay.call(
        relay.ns(),
        "POST",
        "/v1/admin/tokens/unbind-machine",
        &relay.creds.admin_token,
        Some(&json!({"id": id})),
    );
    assert_eq!(reset.status, 204, "{reset:?}");
    let moved = register(&bound, &machine_b).0;
    assert!(moved.status.success(), "after the reset: {}", text(&moved));
    let old = register(&bound, &machine_a).0;
    assert!(
        !old.status.success(),
        "bound to the new machine now: {}",
        text(&old)
    );

    let (_, free) = relay.create_token("ci", 10, 0, None);
    for machine in [&machine_a, &machine_b] {
        let out = register(&free, machine).0;
        assert!(
            out.status.success(),
            "unbound token from {machine:?}: {}",
            text(&out)
        );
    }
}

#[test]
fn a_tls_client_offering_only_the_hybrid_group_is_reported_post_quantum() {
    require();
    let topo = Topology::new();
    let relay = pq_relay(&topo, 3600);
    let pin = relay.creds.pin.clone();
    let group = relay.ns().enter(move || hybrid_only_handshake(&pin));
    assert_eq!(group, "X25519MLKEM768");
    let logged = wait_until(Duration::from_secs(5), || {
        relay.log().lines().any(|l| {
            l.contains("TLS key exchange")
                && l.contains("X25519MLKEM768")
                && l.contains("post_quantum=true")
        })
    });
    assert!(logged, "relay log:\n{}", relay.log_tail(20));
}

/// A TLS 1.3 handshake with only X25519MLKEM768 offered; the group the client got.
fn hybrid_only_handshake(pin: &str) -> String {
    use rustls::crypto::aws_lc_rs;
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![aws_lc_rs::kx_group::X25519MLKEM768],
        ..aws_lc_rs::default_provider()
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            sidecar_proto::pin::PinnedVerifier::new(pin).unwrap(),
        ))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("relay.example").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let addr = SocketAddr::new(RELAY_UPLINK4.into(), API_PORT);
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(b"GET /v1/health HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    format!(
        "{:?}",
        conn.negotiated_key_exchange_group()
            .expect("a completed handshake has a group")
            .name()
    )
}

// ---------------------------------------------------------------------------------------
// The agent in Docker

/// `sidecar-agent run` in `ns`, ready once its first reconcile wrote the status.
fn start_agent(ns: &Netns, relay: &Relay, docker: &Dockerd, state_dir: &Path) -> ChildGuard {
    let mut cmd = ns.program(agent_bin());
    cmd.args(["run", "--relay", &relay.url("")])
        .args(["--token", &relay.creds.default_token])
        .args(["--pin", &relay.creds.pin])
        .arg("--docker")
        .arg(&docker.socket)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--mode", "auto"]);
    let mut child = ChildGuard::spawn("sidecar-agent run", cmd);
    let ready = wait_until(Duration::from_secs(30), || {
        !child.is_running() || agent_status(state_dir).is_some()
    });
    assert!(
        ready && child.is_running(),
        "sidecar-agent run did not come up:\n{}",
        child.stderr_tail(40)
    );
    child
}

/// The relay's view of the container's peer once registered: (public key, IPv6).
fn container_peer(relay: &Relay, container: &str) -> (String, IpAddr) {
    let mut found = None;
    wait_until(Duration::from_secs(20), || {
        let r = relay.call(
            relay.ns(),
            "GET",
            &format!("/v1/peers/by-container/{container}"),
            &relay.creds.default_token,
            None,
        );
        if r.status == 200 {
            found = Some(r.json.clone());
        }
        found.is_some()
    });
    let peer: Value =
        found.unwrap_or_else(|| panic!("{container} never registered:\n{}", relay.log_tail(20)));
    let v6 = peer["ipv6"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let pubkey = peer["pubkey"].as_str().unwrap().to_owned();
    // The store shows a registration while it is still being made durable; it
    // reaches the data plane just before the agent gets its answer.
    assert!(
        wait_until(Duration::from_secs(10), || relay.peer(&pubkey).is_some()),
        "{container} is stored but never reached the relay's data plane:\n{}",
        relay.log_tail(20)
    );
    (pubkey, v6)
}

/// TCP echo (busybox `nc -e cat`) and a greeting; `sleep` keeps the container up.
const ECHO: &str = "nc -ll -p 8080 -e cat & exec sleep 1000000";
const ECHO_PORT: u16 = 8080;

struct DockerSetup<'t> {
    topo: &'t Topology,
    relay: Relay<'t>,
    site: ClientSite,
}

fn docker_setup(topo: &Topology, rotate_secs: u64) -> DockerSetup<'_> {
    require();
    require_tools(DOCKER_TOOLS);
    let relay = pq_relay(topo, rotate_secs);
    let site = topo.client_site();
    DockerSetup { topo, relay, site }
}

#[test]
fn an_agents_container_gets_a_pq_psk_on_both_sides() {
    let topo = Topology::new();
    let s = docker_setup(&topo, 3600);
    let docker = Dockerd::new(&s.site.ns);
    let state = TempDir::new();
    let agent = start_agent(&s.site.ns, &s.relay, &docker, state.path());
    let id = docker.run(&[("sidecar.enable", "true")], ECHO);
    let (pubkey, v6) = container_peer(&s.relay, &id);

    let psk = s.relay.preshared_key(&pubkey);
    assert!(
        psk.as_deref()
            .is_some_and(|k| k != "(none)" && k.len() == 44),
        "the relay has no preshared key for the container's peer: {psk:?}"
    );
    // The handshake needs the same key on the agent's side: traffic is the proof.
    let p = ping_with(&s.topo.remote, v6, "-c 3 -i 0.2 -w 20");
    assert!(
        p.received >= 1,
        "no traffic to {v6}:\n{}\nagent log:\n{}\nrelay log:\n{}",
        p.output,
        agent.stderr_tail(30),
        s.relay.log_tail(30)
    );
    let h = s.relay.peer(&pubkey).expect("peer on the relay");
    assert!(
        h.latest_handshake > 0,
        "no handshake with the preshared key"
    );
    assert!(
        !agent.stderr().contains(psk.as_deref().unwrap()),
        "the agent logged the key"
    );

    // On demand: SIGUSR1 makes the agent encapsulate again at once.
    let before = psk.unwrap();
    agent.signal(libc::SIGUSR1);
    let rotated = wait_until(Duration::from_secs(10), || {
        s.relay
            .preshared_key(&pubkey)
            .is_some_and(|k| k != before && k != "(none)")
    });
    assert!(
        rotated,
        "SIGUSR1 did not rotate:\n{}",
        agent.stderr_tail(20)
    );
    let p = ping_with(&s.topo.remote, v6, "-c 3 -i 0.2 -w 10");
    assert!(
        p.received >= 1,
        "no traffic after the rotation:\n{}",
        p.output
    );
}

#[test]
fn rotation_every_two_seconds_loses_no_ping_and_no_byte() {
    let topo = Topology::new();
    let s = docker_setup(&topo, 2);
    let docker = Dockerd::new(&s.site.ns);
    let state = TempDir::new();
    let agent = start_agent(&s.site.ns, &s.relay, &docker, state.path());
    let id = docker.run(&[("sidecar.enable", "true")], ECHO);
    let (pubkey, v6) = container_peer(&s.relay, &id);
    assert!(
        ping_with(&s.topo.remote, v6, "-c 1 -w 20").received == 1,
        "container unreachable before the measurement:\n{}",
        agent.stderr_tail(30)
    );

    let window = Duration::from_secs(12);
    let remote = &s.topo.remote;
    let stop = AtomicBool::new(false);
    let (ping, transfer, keys) = std::thread::scope(|scope| {
        let ping = scope.spawn(|| {
            // 1000 pings 10 ms apart: the whole window; each waits up to 1 s.
            ping_with(remote, v6, "-i 0.01 -c 1000 -W 1")
        });
        let transfer = scope.spawn(|| remote.enter(|| echo_stream(v6, window, &stop)));
        let mut keys = BTreeSet::new();
        let started = Instant::now();
        while started.elapsed() < window {
            if let Some(k) = s.relay.preshared_key(&pubkey) {
                keys.insert(k);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        (ping.join().unwrap(), transfer.join().unwrap(), keys)
    });
    eprintln!(
        "rotation: {} preshared keys seen in {window:?}; ping {}/{} (avg {:.2} ms); echoed {:?}",
        keys.len(),
        ping.received,
        ping.transmitted,
        ping.avg_ms(),
        transfer
    );
    assert!(
        keys.len() >= 4,
        "the preshared key must change every 2 s on the relay: {} distinct in {window:?}\nagent log:\n{}",
        keys.len(),
        agent.stderr_tail(30)
    );
    assert!(
        ping.all_received(),
        "pings lost during rotation: {}/{}\nagent log:\n{}\nrelay log:\n{}",
        ping.received,
        ping.transmitted,
        agent.stderr_tail(30),
        s.relay.log_tail(30)
    );
    // The relay accepts a handshake under the previous key for a while, so the
    // relay's side changing is not enough: the agent must have followed each time.
    let followed = agent
        .stderr()
        .lines()
        .filter(|l| l.contains("post-quantum preshared key rotated"))
        .count();
    assert!(
        followed >= 4,
        "the agent put only {followed} new keys on its side in {window:?}:\n{}",
        agent.stderr_tail(30)
    );
    let sent = transfer.unwrap_or_else(|e| panic!("the TCP transfer failed during rotation: {e}"));
    assert!(
        sent > 1 << 20,
        "too little went through to mean anything: {sent} bytes"
    );
}

/// Streams data to the echo server at `addr` until `stop`, checking that every byte
/// comes back in order; the number of bytes echoed, or why the stream broke.
fn echo_stream(addr: IpAddr, at_least: Duration, stop: &AtomicBool) -> Result<u64, String> {
    let s = TcpStream::connect_timeout(&SocketAddr::new(addr, ECHO_PORT), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut reader = s.try_clone().map_err(|e| e.to_string())?;
    let mut writer = s;
    let chunk: Vec<u8> = (0..16 * 1024u32).map(|i| (i % 251) as u8).collect();
    let started = Instant::now();
    let echoed = std::thread::scope(|scope| {
        let read = scope.spawn(move || -> Result<u64, String> {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(|e| format!("read after {total} bytes: {e}"))?;
                if n == 0 {
                    return Ok(total);
                }
                for (i, b) in buf[..n].iter().enumerate() {
                    let expected = ((total + i as u64) % (16 * 1024) % 251) as u8;
                    if *b != expected {
                        return Err(format!("byte {} came back wrong", total + i as u64));
                    }
                }
                total += n as u64;
            }
        });
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) || started.elapsed() < at_least {
            if let Err(e) = writer.write_all(&chunk) {
                return Err(format!("write after {sent} bytes: {e}"));
            }
            sent += chunk.len() as u64;
            // About 3 MB/s: a steady stream, not a flood that drowns the pings.
            std::thread::sleep(Duration::from_millis(5));
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let echoed = read.join().map_err(|_| "reader panicked".to_owned())??;
        if echoed != sent {
            return Err(format!("sent {sent} bytes, {echoed} came back"));
        }
        Ok(echoed)
    })?;
    Ok(echoed)
}
