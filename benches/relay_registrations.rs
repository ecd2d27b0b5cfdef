//! Registration throughput and memory of `sidecar-relay`: a release relay in the
//! topology of `tests/support/relay.rs` (on-link /64, unique interface name), one
//! admin-created token, then `RELAY_BENCH_PEERS` (default 100000) registrations of random
//! public keys through the HTTPS API from the router namespace.
//!
//! Two client styles, one after the other on the same relay:
//!
//! * keep-alive: `RELAY_BENCH_CLIENTS` (default 16) threads, each with one pinned TLS
//!   connection it reuses for all of its requests (a minimal HTTP/1.1 client on rustls);
//!   the relay's RSS and store size are measured around this phase, then
//!   `RELAY_BENCH_TAIL_PEERS` (default 5000) more keep-alive registrations are timed on
//!   their own: the registration rate at that size;
//! * agent-style: the agent's own `RelayClient`, which opens a new TCP + TLS connection per
//!   request, with as many concurrent tasks, for `RELAY_BENCH_AGENT_PEERS` (default 1000)
//!   further peers.
//!
//! Those two run with the API's rate limits raised out of reach (one token and one source
//! address making thousands of requests a second is not a normal caller). Then the relay is
//! restarted with the default `[limits]` and a third phase runs with rate limiting on:
//! the same number of keep-alive clients, each with a token of its own and a source
//! address of its own, registering `RELAY_BENCH_LIMITED_PEERS` (default 10000) more peers.
//!
//! Run with `cargo bench --bench relay_registrations`. The relay binary is rebuilt first.
//! Prints a table and asserts only that every registration succeeded.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};
use sidecar::Key;
use sidecar_agent::relay_client::RelayClient;
use sidecar_proto::RegisterPeer;
use support::relay::{
    relay_bin, Relay, RelayOptions, Topology, API_PORT, RELAY_UPLINK4, ROUTER_LINK4,
};
use support::{require_tools, Netns, BASE_TOOLS};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn random_pubkey() -> Key {
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    Key(key)
}

fn register_body(pubkey: &Key) -> String {
    serde_json::to_string(&RegisterPeer {
        pubkey: *pubkey,
        ipv4: false,
        name: None,
        container: None,
    })
    .expect("serialize registration")
}

/// Who a keep-alive client is: its token, and the address it connects from (the
/// namespace's choice when `None`).
#[derive(Clone)]
struct Caller {
    token: String,
    source: Option<IpAddr>,
}

/// One HTTP/1.1 connection over pinned TLS, reused for every request; reconnects only
/// when the relay closes it.
struct KeepAlive {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    token: String,
    source: Option<IpAddr>,
    stream: Option<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    connections: usize,
}

fn io_error(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

impl KeepAlive {
    fn new(addr: SocketAddr, config: Arc<rustls::ClientConfig>, caller: &Caller) -> Self {
        KeepAlive {
            addr,
            config,
            token: caller.token.clone(),
            source: caller.source,
            stream: None,
            connections: 0,
        }
    }

    fn stream(
        &mut self,
    ) -> std::io::Result<&mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        if self.stream.is_none() {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(self.addr),
                socket2::Type::STREAM,
                None,
            )?;
            if let Some(source) = self.source {
                socket.bind(&SocketAddr::new(source, 0).into())?;
            }
            socket.connect_timeout(&self.addr.into(), Duration::from_secs(5))?;
            let tcp: TcpStream = socket.into();
            tcp.set_nodelay(true)?;
            tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
            let name = rustls::pki_types::ServerName::from(self.addr.ip());
            let conn = rustls::ClientConnection::new(self.config.clone(), name)
                .map_err(|e| io_error(format!("TLS client: {e}")))?;
            self.stream = Some(rustls::StreamOwned::new(conn, tcp));
            self.connections += 1;
        }
        Ok(self.stream.as_mut().expect("just connected"))
    }

    /// `POST path` with a JSON body; the status and the body of the answer.
    fn post(&mut self, path: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            self.token,
            body.len()
        );
        let stream = self.stream()?;
        stream.write_all(request.as_bytes())?;
        stream.flush()?;

        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        let head_len = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io_error("connection closed before a response".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io_error(format!("no status line in {head:?}")))?;
        let mut length = None;
        let mut close = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                "transfer-encoding" => {
                    return Err(io_error(format!("unsupported transfer-encoding {value}")))
                }
                _ => {}
            }
        }
        let length = length.ok_or_else(|| io_error(format!("no content-length in {head:?}")))?;
        while buf.len() < head_len + length {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io_error("connection closed inside a body".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        if close {
            self.stream = None;
        }
        Ok((status, buf[head_len..head_len + length].to_vec()))
    }
}

/// What one client (thread or task) saw.
#[derive(Default)]
struct Outcome {
    created: usize,
    existing: usize,
    /// Answers 429.
    limited: usize,
    errors: Vec<String>,
    latencies: Vec<Duration>,
    connections: usize,
}

impl Outcome {
    fn merge(outcomes: impl IntoIterator<Item = Outcome>) -> Outcome {
        let mut all = Outcome::default();
        for o in outcomes {
            all.created += o.created;
            all.existing += o.existing;
            all.limited += o.limited;
            all.errors.extend(o.errors);
            all.latencies.extend(o.latencies);
            all.connections += o.connections;
        }
        all.latencies.sort();
        all
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i].as_secs_f64() * 1e3
    }

    fn note_error(&mut self, e: String) {
        if self.errors.len() < 5 {
            self.errors.push(e);
        }
    }
}

/// Registers `keys` over one keep-alive connection per caller, opened from `from`.
fn register_keep_alive(
    from: &Netns,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    callers: &[Caller],
    keys: &[Key],
) -> (Outcome, Duration) {
    let per_client = keys.len().div_ceil(callers.len()).max(1);
    from.enter(|| {
        let start = Instant::now();
        let outcomes: Vec<Outcome> = std::thread::scope(|s| {
            let workers: Vec<_> = keys
                .chunks(per_client)
                .zip(callers)
                .map(|(chunk, caller)| {
                    let config = config.clone();
                    // Threads started here inherit this thread's network namespace.
                    s.spawn(move || {
                        let mut conn = KeepAlive::new(addr, config, caller);
                        let mut out = Outcome::default();
                        for key in chunk {
                            let body = register_body(key);
                            let t = Instant::now();
                            // One retry on a fresh connection if the relay dropped ours.
                            let answer = conn.post("/v1/peers", &body).or_else(|_| {
                                conn.stream = None;
                                conn.post("/v1/peers", &body)
                            });
                            out.latencies.push(t.elapsed());
                            match answer {
                                Ok((201, _)) => out.created += 1,
                                Ok((200, _)) => out.existing += 1,
                                Ok((429, _)) => {
                                    out.limited += 1;
                                    out.note_error("429 rate_limited".into());
                                }
                                Ok((status, body)) => out.note_error(format!(
                                    "{status}: {}",
                                    String::from_utf8_lossy(&body)
                                )),
                                Err(e) => out.note_error(e.to_string()),
                            }
                        }
                        out.connections = conn.connections;
                        out
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("client thread panicked"))
                .collect()
        });
        (Outcome::merge(outcomes), start.elapsed())
    })
}

/// Registers `keys` with the agent's `RelayClient` (one TCP + TLS connection per
/// request) from `clients` concurrent tasks in `from`.
fn register_agent_style(
    from: &Netns,
    client: &RelayClient,
    keys: &[Key],
    clients: usize,
) -> (Outcome, Duration) {
    let per_client = keys.len().div_ceil(clients).max(1);
    from.enter(|| {
        // Built on this thread, so its worker threads are in `from` as well.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = keys
                .chunks(per_client)
                .map(|chunk| {
                    let client = client.clone();
                    let chunk = chunk.to_vec();
                    tokio::spawn(async move {
                        let mut out = Outcome::default();
                        for key in chunk {
                            let req = RegisterPeer {
                                pubkey: key,
                                ipv4: false,
                                name: None,
                                container: None,
                            };
                            let t = Instant::now();
                            let answer = client.register(&req).await;
                            out.latencies.push(t.elapsed());
                            out.connections += 1;
                            match answer {
                                Ok(a) if a.created => out.created += 1,
                                Ok(_) => out.existing += 1,
                                Err(e) => out.note_error(e.to_string()),
                            }
                        }
                        out
                    })
                })
                .collect();
            let mut outcomes = Vec::new();
            for t in tasks {
                outcomes.push(t.await.expect("client task panicked"));
            }
            (Outcome::merge(outcomes), start.elapsed())
        })
    })
}

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Apparent size and allocated size of everything under `dir`, in bytes.
fn disk_usage(dir: &Path) -> (u64, u64) {
    let du = |flags: &[&str]| {
        let out = support::process::run_ok({
            let mut cmd = std::process::Command::new("du");
            cmd.args(["-s", "--block-size=1"]).args(flags).arg(dir);
            cmd
        });
        out.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected du output: {out}"))
    };
    (du(&["--apparent-size"]), du(&[]))
}

/// The pid of the `sidecar-relay` process in `ns` (`ip netns exec` execs it).
fn relay_pid(ns: &Netns) -> u32 {
    let pids: Vec<u32> = ns
        .pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "sidecar-relay")
        })
        .collect();
    assert_eq!(
        pids.len(),
        1,
        "expected one sidecar-relay in {}: {pids:?}",
        ns.name()
    );
    pids[0]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn check(what: &str, expected: usize, out: &Outcome) {
    assert!(
        out.errors.is_empty() && out.created + out.existing == expected,
        "{what}: {} created, {} existing, {} rate-limited of {expected}; first errors: {:#?}",
        out.created,
        out.existing,
        out.limited,
        out.errors
    );
}

/// Rewrites `[limits]` in `relay.toml`: the defaults, or (`raised`) every limit out of reach.
fn set_limits(config: &Path, raised: bool) {
    let text = std::fs::read_to_string(config).expect("read relay.toml");
    let base = match text.find("\n[limits]") {
        Some(i) => text[..i + 1].to_owned(),
        None => text,
    };
    let limits = if raised {
        "[limits]\ntoken_rate = 1000000\ntoken_burst = 1000000\nsource_rate = 1000000\n\
         source_burst = 1000000\nmax_connections = 4096\nmax_connections_per_source = 4096\n\
         max_requests_in_flight = 4096\n"
    } else {
        ""
    };
    std::fs::write(config, format!("{base}{limits}")).expect("write relay.toml");
}

/// The router's interface on the relay link, found by its address there.
fn router_relay_link(router: &Netns) -> String {
    let out = router.ip(&format!("-o -4 addr show to {ROUTER_LINK4}/32"));
    out.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no interface with {ROUTER_LINK4}: {out}"))
        .to_owned()
}

fn main() {
    // `cargo test --all-targets` runs harness-less benches without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("relay_registrations: measurement runs only under `cargo bench`");
        return;
    }
    require_tools(BASE_TOOLS);
    require_tools(&["curl", "nft", "sysctl", "du"]);
    let peers = env_usize("RELAY_BENCH_PEERS", 100_000).max(1);
    let tail_peers = env_usize("RELAY_BENCH_TAIL_PEERS", 5_000).max(1);
    let clients = env_usize("RELAY_BENCH_CLIENTS", 16).max(1);
    let agent_peers = env_usize("RELAY_BENCH_AGENT_PEERS", 1_000);
    let limited_peers = env_usize("RELAY_BENCH_LIMITED_PEERS", 10_000).max(clients);
    let max_peers =
        u32::try_from((peers + tail_peers + agent_peers).max(20_000)).expect("peer count fits u32");

    println!("sidecar-relay: {}", relay_bin().display());
    let topo = Topology::new();
    let mut relay = Relay::init(&topo, &RelayOptions::default());
    set_limits(&relay.config, true);
    relay.run();
    let pid = relay_pid(&topo.relay);
    let data_dir = relay
        .config
        .parent()
        .expect("relay.toml is in the data directory")
        .to_path_buf();
    let (_, token) = relay.create_token("registration-bench", max_peers, 0, None);
    let addr = SocketAddr::new(RELAY_UPLINK4.into(), API_PORT);
    let mut tls = sidecar_proto::pin::client_config(&relay.creds.pin).expect("client TLS config");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = Arc::new(tls);

    let keys: Vec<Key> = (0..peers).map(|_| random_pubkey()).collect();
    let tail_keys: Vec<Key> = (0..tail_peers).map(|_| random_pubkey()).collect();
    let agent_keys: Vec<Key> = (0..agent_peers).map(|_| random_pubkey()).collect();

    let (rss0, _) = memory_kib(pid);
    let disk0 = disk_usage(&data_dir);
    let one_token = vec![
        Caller {
            token: token.clone(),
            source: None,
        };
        clients
    ];
    let (keep_alive, keep_alive_time) =
        register_keep_alive(&topo.router, addr, tls.clone(), &one_token, &keys);
    check("keep-alive registrations", peers, &keep_alive);
    let (rss1, hwm1) = memory_kib(pid);
    let disk1 = disk_usage(&data_dir);
    let (tail, tail_time) =
        register_keep_alive(&topo.router, addr, tls.clone(), &one_token, &tail_keys);
    check("keep-alive registrations at size", tail_peers, &tail);

    let client =
        RelayClient::new(&relay.url(""), &token, &relay.creds.pin).expect("RelayClient::new");
    let (agent, agent_time) = register_agent_style(&topo.router, &client, &agent_keys, clients);
    check("agent-style registrations", agent_peers, &agent);
    let (rss2, hwm2) = memory_kib(pid);
    let disk2 = disk_usage(&data_dir);

    assert!(relay.is_running(), "relay died:\n{}", relay.log_tail(30));
    let rate = |o: &Outcome, t: Duration| (o.created + o.existing) as f64 / t.as_secs_f64();
    // Printed before the restart, which may be slow at this size.
    println!(
        "at {peers} registered peers: relay RSS {:.2} KiB/peer after registering (target at \
         most 2 KiB); {:.0} registrations/s over the first {peers}, {:.0} registrations/s for \
         the next {tail_peers} (target at least 1000); engine peer entry {} bytes",
        rss1.saturating_sub(rss0) as f64 / peers as f64,
        rate(&keep_alive, keep_alive_time),
        rate(&tail, tail_time),
        std::mem::size_of::<sidecar::wg::Peer>(),
    );
    let on_interface = relay.dump().len();
    assert_eq!(
        on_interface,
        peers + tail_peers + agent_peers,
        "`wg show {}` lists a different number of peers",
        relay.iface
    );

    // The same peers restored from the store by a fresh process: what steady state costs
    // without whatever the registration burst left behind (allocator, store caches).
    // The restarted relay runs with the default limits, for the rate-limited phase.
    relay.stop(libc::SIGTERM);
    set_limits(&relay.config, false);
    let restart = Instant::now();
    relay.run();
    let restart_time = restart.elapsed();
    let (rss3, _) = memory_kib(relay_pid(&topo.relay));
    assert_eq!(
        relay.dump().len(),
        peers + tail_peers + agent_peers,
        "the restarted relay restored a different number of peers"
    );

    // Rate limiting on (the defaults): a token and a source address per client, as if
    // each were its own Docker host.
    let link = router_relay_link(&topo.router);
    let per_token = u32::try_from(limited_peers.div_ceil(clients)).expect("fits u32");
    let callers: Vec<Caller> = (0..clients)
        .map(|i| {
            let source = Ipv4Addr::new(192, 0, 2, 200 + u8::try_from(i).expect("< 56 clients"));
            topo.router
                .ip(&format!("addr add {source}/24 dev {link} noprefixroute"));
            let (_, token) = relay.create_token(&format!("limited-{i}"), per_token, 0, None);
            Caller {
                token,
                source: Some(source.into()),
            }
        })
        .collect();
    let limited_keys: Vec<Key> = (0..limited_peers).map(|_| random_pubkey()).collect();
    let (limited, limited_time) =
        register_keep_alive(&topo.router, addr, tls, &callers, &limited_keys);
    check("rate-limited registrations", limited_peers, &limited);

    println!(
        "relay registrations: relay in its namespace (on-link /64, interface {}), clients in the \
         router namespace, {} CPUs shared by both",
        relay.iface,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<38} {:>6} {:>6} {:>8} {:>8} {:>7} {:>7} {:>7}",
        "client", "peers", "conns", "seconds", "reg/s", "p50 ms", "p90 ms", "p99 ms"
    );
    let row = |name: String, o: &Outcome, t: Duration| {
        let n = o.created + o.existing;
        println!(
            "{:<38} {:>6} {:>6} {:>8.2} {:>8.0} {:>7.2} {:>7.2} {:>7.2}",
            name,
            n,
            o.connections,
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64(),
            o.percentile_ms(0.5),
            o.percentile_ms(0.9),
            o.percentile_ms(0.99),
        );
    };
    row(
        format!("keep-alive, {clients} threads"),
        &keep_alive,
        keep_alive_time,
    );
    row(format!("keep-alive, after {peers} peers"), &tail, tail_time);
    row(
        format!("RelayClient (conn/request), {clients} tasks"),
        &agent,
        agent_time,
    );
    row(
        format!("limits on, {clients} tokens+sources"),
        &limited,
        limited_time,
    );
    println!(
        "rate limiting on (default [limits], {} answered 429) / raised out of reach, keep-alive: \
         {:.3} (target at least 1000 reg/s with limits on)",
        limited.limited,
        rate(&limited, limited_time) / rate(&keep_alive, keep_alive_time),
    );
    println!(
        "relay RSS: {:.1} MiB before, {:.1} MiB after {peers} peers (+{:.1} MiB, {:.0} bytes/peer), \
         {:.1} MiB after {} (peak {:.1} MiB)",
        mib(rss0),
        mib(rss1),
        mib(rss1.saturating_sub(rss0)),
        rss1.saturating_sub(rss0) as f64 * 1024.0 / peers as f64,
        mib(rss2),
        peers + tail_peers + agent_peers,
        mib(hwm1.max(hwm2)),
    );
    println!(
        "relay RSS after a restart restoring {} peers: {:.1} MiB ({:.0} bytes/peer over the \
         {:.1} MiB before registering; restart to ready {:.2} s)",
        peers + tail_peers + agent_peers,
        mib(rss3),
        rss3.saturating_sub(rss0) as f64 * 1024.0 / (peers + tail_peers + agent_peers) as f64,
        mib(rss0),
        restart_time.as_secs_f64(),
    );
    let per_peer = |after: u64, before: u64| after.saturating_sub(before) as f64 / peers as f64;
    println!(
        "store on disk ({}): apparent {:.1} MiB before, {:.1} MiB after {peers} peers \
         ({:.0} bytes/peer), {:.1} MiB after {}; allocated {:.1} -> {:.1} -> {:.1} MiB",
        data_dir.display(),
        disk0.0 as f64 / 1048576.0,
        disk1.0 as f64 / 1048576.0,
        per_peer(disk1.0, disk0.0),
        disk2.0 as f64 / 1048576.0,
        peers + tail_peers + agent_peers,
        disk0.1 as f64 / 1048576.0,
        disk1.1 as f64 / 1048576.0,
        disk2.1 as f64 / 1048576.0,
    );
}
