//! The agent's full data path, measured end to end with a real Docker daemon:
//!
//! ```text
//!   remote host -> router -> relay (sidecar-relay) -> NAT -> docker host -> container
//!                                                            sidecar-agent run
//! ```
//!
//! The topology is the one of `tests/agent_docker.rs` (tests/support/relay.rs and
//! tests/support/docker.rs): a private `dockerd` in the client site's namespace behind the
//! NAT, `sidecar-agent run` next to it, busybox containers labeled `sidecar.enable=true`.
//! Three columns, each on a fresh topology, in one invocation:
//!
//! * `tun`: `sidecar-agent run --mode tun`, a TUN device (`sidecar0`) in the container;
//! * `netstack`: `sidecar-agent run --mode netstack`, a userspace stack in the agent that
//!   forwards every port to the container's Docker address (and answers ICMP itself);
//! * `wg-go client (no agent)`: the fixture's [`support::relay::Client`], wireguard-go in
//!   the client site configured from the same kind of allocation, with the iperf3 server
//!   in the site itself: the relay path without the agent, for reference.
//!
//! Per column: iperf3 TCP with 1 and 4 streams remote → container and container → remote
//! (`-R`), `ping -c 20 -i 0.05` from the remote host to the /128 (avg and p50), and for
//! the agent columns label-to-reachable: from `docker run` returning to the first ping
//! reply at the container's public address, median of 5 containers.
//!
//! The busybox image has no iperf3: the host's `iperf3 -s -1` runs inside the container's
//! network namespace (`nsenter --net=/proc/PID/ns/net`), in the foreground under a
//! [`ChildGuard`] so that it is reaped even when a run fails.
//!
//! Run with `cargo bench --bench agent_path`; `AGENT_PATH_SECS` sets the length of each
//! iperf3 run (default 5). The agent and relay binaries are rebuilt (release) first. Prints
//! one table; asserts nothing about speed. A failed measurement shows as `FAILED` in its
//! cell, with the reason below the table.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::agent::{agent_bin, agent_status};
use support::docker::{Dockerd, DOCKER_TOOLS};
use support::process::{self, ChildGuard, TempDir};
use support::relay::{relay_bin, Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::{ping_until_reply, Iperf};
use support::wg::wireguard_go_version;
use support::{ping_with, require_tools, unique_name, wait_until, Netns, BASE_TOOLS};

const ENABLE: (&str, &str) = ("sidecar.enable", "true");
/// The containers only need to stay up; `--init` (from the fixture) stops them promptly.
const KEEP_RUNNING: &str = "exec sleep 1000000";
/// Containers started for label-to-reachable; the first one also carries the traffic.
const CONTAINERS: usize = 5;
/// Upper bound for one container's label-to-reachable before it counts as failed.
const REACHABLE_TIMEOUT: Duration = Duration::from_secs(20);
const IPERF_PORT: u16 = 5201;

/// The `--mode` of `sidecar-agent run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentMode {
    Tun,
    Netstack,
}

impl AgentMode {
    fn name(self) -> &'static str {
        match self {
            AgentMode::Tun => "tun",
            AgentMode::Netstack => "netstack",
        }
    }
}

/// One measured figure, or why there is none.
type Figure = Result<f64, String>;

/// The figures of one column; "down" is remote → container, "up" container → remote.
struct Column {
    tcp1_down_gbps: Figure,
    tcp4_down_gbps: Figure,
    tcp1_up_gbps: Figure,
    tcp4_up_gbps: Figure,
    ping_avg_ms: Figure,
    ping_p50_ms: Figure,
    /// Median label-to-reachable; `None` where there is no label (the wg-go client).
    reachable_ms: Option<Figure>,
    /// Every container's label-to-reachable, in start order.
    reachable_samples: Vec<Result<Duration, String>>,
}

// ---------------------------------------------------------------------------------------
// `sidecar-agent run` in the docker host's namespace

/// `sidecar-agent run` with an explicit `--mode`; stopped (SIGTERM) by its guard on drop.
struct RunAgent {
    child: ChildGuard,
    state_dir: std::path::PathBuf,
}

impl RunAgent {
    fn start(
        ns: &Netns,
        relay: &Relay,
        token: &str,
        docker: &Dockerd,
        state_dir: &Path,
        mode: AgentMode,
    ) -> Self {
        let mut cmd = ns.program(agent_bin());
        cmd.args(["run", "--relay", &relay.url("")])
            .args(["--token", token])
            .args(["--pin", &relay.creds.pin])
            .arg("--docker")
            .arg(&docker.socket)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--mode", mode.name()]);
        let mut child =
            ChildGuard::spawn(&format!("sidecar-agent run --mode {}", mode.name()), cmd);
        // Ready once the first reconcile has written the status snapshot.
        let mut ready = false;
        wait_until(Duration::from_secs(30), || {
            if !child.is_running() {
                return true;
            }
            ready = agent_status(state_dir).is_some();
            ready
        });
        assert!(
            ready && child.is_running(),
            "sidecar-agent run did not come up (exit: {:?}):\n{}",
            child.try_wait(),
            child.stderr_tail(40)
        );
        RunAgent {
            child,
            state_dir: state_dir.to_owned(),
        }
    }

    /// `(state, ipv6, mode)` of container `name` in `sidecar-agent status`.
    fn row(&self, name: &str) -> Option<(String, Option<Ipv6Addr>, String)> {
        let text = agent_status(&self.state_dir)?;
        text.lines().find_map(|line| {
            let w: Vec<&str> = line.split_whitespace().collect();
            (w.len() >= 5 && w[0] == name).then(|| {
                let ipv6 = w[2].split('/').next().and_then(|a| a.parse().ok());
                (w[1].to_owned(), ipv6, w[4].to_owned())
            })
        })
    }
}

// ---------------------------------------------------------------------------------------
// Measurements

/// The network namespace the iperf3 server runs in.
enum ServerAt<'a> {
    /// A container's, entered through its init process.
    Container(u32),
    /// One of the topology's namespaces.
    Netns(&'a Netns),
}

impl ServerAt<'_> {
    /// `cmdline` (split on whitespace) inside that namespace.
    fn command(&self, cmdline: &str) -> Command {
        match self {
            ServerAt::Container(pid) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/proc/{pid}/ns/net"))
                    .args(cmdline.split_whitespace());
                cmd
            }
            ServerAt::Netns(ns) => ns.command(cmdline),
        }
    }
}

/// One iperf3 run from the remote host to the server at `addr`: received Gbit/s.
fn iperf_gbps(server: &ServerAt, remote: &Netns, addr: IpAddr, secs: u64, args: &str) -> Figure {
    let mut srv = ChildGuard::spawn(
        "iperf3 -s",
        server.command(&format!("iperf3 -s -1 -p {IPERF_PORT}")),
    );
    let listening = wait_until(Duration::from_secs(5), || {
        !srv.is_running()
            || !process::output(&mut server.command(&format!("ss -Hltn sport = :{IPERF_PORT}")))
                .stdout
                .is_empty()
    });
    if !(listening && srv.is_running()) {
        return Err(format!("iperf3 server did not start: {}", srv.stderr()));
    }
    // The outer timeout bounds a run whose path died mid-way.
    let cmdline = format!(
        "timeout {} iperf3 -c {addr} -p {IPERF_PORT} -J --connect-timeout 5000 -t {secs} {args}",
        secs + 20
    );
    let out = remote.try_exec(&cmdline);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if let Some(e) = json["error"].as_str() {
        return Err(format!("`{cmdline}`: {e}"));
    }
    if !out.status.success() || !json.is_object() {
        return Err(format!(
            "`{cmdline}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Iperf { json }.received_bits_per_second() / 1e9)
}

/// Throughput both ways and latency from the remote host to `addr`.
fn measure_path(server: &ServerAt, remote: &Netns, addr: IpAddr, secs: u64, what: &str) -> Column {
    assert!(
        ping_until_reply(remote, addr, Duration::from_secs(15)),
        "{what}: {addr} does not answer the remote host"
    );
    let tcp1_down_gbps = iperf_gbps(server, remote, addr, secs, "");
    let tcp4_down_gbps = iperf_gbps(server, remote, addr, secs, "-P 4");
    let tcp1_up_gbps = iperf_gbps(server, remote, addr, secs, "-R");
    let tcp4_up_gbps = iperf_gbps(server, remote, addr, secs, "-R -P 4");
    let ping = ping_with(remote, addr, "-c 20 -i 0.05 -W 2");
    let (ping_avg_ms, ping_p50_ms) = if ping.received == 0 {
        let e = format!("no ping replies:\n{}", ping.output);
        (Err(e.clone()), Err(e))
    } else {
        if !ping.all_received() {
            eprintln!(
                "{what}: ping lost {} of {}",
                ping.transmitted - ping.received,
                ping.transmitted
            );
        }
        (Ok(ping.avg_ms()), Ok(ping.p50_ms()))
    };
    Column {
        tcp1_down_gbps,
        tcp4_down_gbps,
        tcp1_up_gbps,
        tcp4_up_gbps,
        ping_avg_ms,
        ping_p50_ms,
        reachable_ms: None,
        reachable_samples: Vec::new(),
    }
}

/// A labeled container started by [`label_to_reachable`].
struct Started {
    id: String,
    /// Its public address, once `sidecar-agent status` showed one.
    ipv6: Option<Ipv6Addr>,
    /// `docker run` returning → first ping reply from the remote host.
    took: Result<Duration, String>,
}

/// Starts a labeled container and times `docker run` returning → first ping reply from
/// the remote host at its public /128 (the address is read from `sidecar-agent status`,
/// which the agent rewrites as soon as it has set a container up).
fn label_to_reachable(
    agent: &RunAgent,
    docker: &Dockerd,
    remote: &Netns,
    mode: AgentMode,
) -> Started {
    let name = unique_name("ap");
    let id = docker.run_named(&name, &[ENABLE], KEEP_RUNNING);
    let t0 = Instant::now();
    let mut row = None;
    wait_until(REACHABLE_TIMEOUT, || {
        row = agent.row(&name).filter(|r| r.1.is_some());
        row.is_some()
    });
    let Some((state, Some(v6), row_mode)) = row else {
        let why = format!(
            "{name}: no address in `sidecar-agent status` within {REACHABLE_TIMEOUT:?}:\n{}",
            agent.child.stderr_tail(20)
        );
        return Started {
            id,
            ipv6: None,
            took: Err(why),
        };
    };
    assert_eq!(
        (state.as_str(), row_mode.as_str()),
        ("active", mode.name()),
        "{name}: unexpected status row"
    );
    let left = REACHABLE_TIMEOUT
        .saturating_sub(t0.elapsed())
        .as_secs()
        .max(1);
    let p = ping_with(remote, IpAddr::V6(v6), &format!("-i 0.05 -c 1 -w {left}"));
    let took = t0.elapsed();
    Started {
        id,
        ipv6: Some(v6),
        took: if p.received >= 1 {
            Ok(took)
        } else {
            Err(format!(
                "{name} ({v6}): no ping reply within {REACHABLE_TIMEOUT:?}:\n{}",
                p.output
            ))
        },
    }
}

/// One agent column: a fresh topology, relay, dockerd and `sidecar-agent run --mode MODE`.
fn measure_agent(mode: AgentMode, secs: u64) -> Column {
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    // A token of its own without a bandwidth cap, whatever `init`'s default token has.
    let (_, token) = relay.create_token("agent-path", 16, 0, None);
    let site = topo.client_site();
    let docker = Dockerd::new(&site.ns);
    let state = TempDir::new();
    let agent = RunAgent::start(&site.ns, &relay, &token, &docker, state.path(), mode);

    let started: Vec<Started> = (0..CONTAINERS)
        .map(|_| label_to_reachable(&agent, &docker, &topo.remote, mode))
        .collect();
    let samples: Vec<Result<Duration, String>> = started.iter().map(|s| s.took.clone()).collect();
    let reachable_ms = median_ms(&samples);

    // The traffic goes to the first container, with the others idle next to it.
    let first = &started[0];
    let addr =
        IpAddr::V6(first.ipv6.unwrap_or_else(|| {
            panic!("the first container never got an address: {:?}", first.took)
        }));
    let has_tun = docker.interfaces(&first.id).iter().any(|i| i == "sidecar0");
    assert_eq!(
        has_tun,
        mode == AgentMode::Tun,
        "sidecar0 in the container does not match --mode {}",
        mode.name()
    );
    let server = ServerAt::Container(docker.pid(&first.id));
    let mut column = measure_path(&server, &topo.remote, addr, secs, mode.name());
    column.reachable_ms = Some(reachable_ms);
    column.reachable_samples = samples;
    column
}

/// The same path with wireguard-go in the client site instead of agent and container.
fn measure_wg_go_client(secs: u64) -> Column {
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let (_, token) = relay.create_token("agent-path", 16, 0, None);
    let site = topo.client_site();
    let client = site.connect(&relay, &token, false);
    measure_path(
        &ServerAt::Netns(client.ns()),
        &topo.remote,
        client.ipv6(),
        secs,
        "wg-go client",
    )
}

/// The median of the successful samples in ms; an error if any sample failed.
fn median_ms(samples: &[Result<Duration, String>]) -> Figure {
    let mut ok = Vec::new();
    for s in samples {
        match s {
            Ok(d) => ok.push(d.as_secs_f64() * 1e3),
            Err(e) => return Err(e.clone()),
        }
    }
    ok.sort_by(f64::total_cmp);
    ok.get(ok.len() / 2)
        .copied()
        .ok_or_else(|| "no samples".to_owned())
}

// ---------------------------------------------------------------------------------------
// Output

fn cell(f: &Figure, unit: &str) -> String {
    match f {
        Ok(v) => format!("{v:.2} {unit}"),
        Err(_) => "FAILED".to_owned(),
    }
}

/// One row per metric, one column per setup; failures explained below the table.
fn table(columns: &[(&str, &Column)]) -> String {
    type Pick = fn(&Column) -> Option<&Figure>;
    let metrics: [(&str, &str, Pick); 7] = [
        ("tcp 1 stream remote -> container", "Gbit/s", |c| {
            Some(&c.tcp1_down_gbps)
        }),
        ("tcp 4 streams remote -> container", "Gbit/s", |c| {
            Some(&c.tcp4_down_gbps)
        }),
        ("tcp 1 stream container -> remote", "Gbit/s", |c| {
            Some(&c.tcp1_up_gbps)
        }),
        ("tcp 4 streams container -> remote", "Gbit/s", |c| {
            Some(&c.tcp4_up_gbps)
        }),
        ("ping avg (20 x 50 ms)", "ms", |c| Some(&c.ping_avg_ms)),
        ("ping p50 (20 x 50 ms)", "ms", |c| Some(&c.ping_p50_ms)),
        ("label-to-reachable (median of 5)", "ms", |c| {
            c.reachable_ms.as_ref()
        }),
    ];
    let width = metrics.iter().map(|m| m.0.len()).max().unwrap_or(0);
    let col_width = columns.iter().map(|c| c.0.len()).max().unwrap_or(0).max(12);
    let mut out = String::new();
    let _ = write!(out, "{:<width$}", "metric");
    for (name, _) in columns {
        let _ = write!(out, "   {name:>col_width$}");
    }
    out.push('\n');
    let mut notes = String::new();
    for (metric, unit, pick) in metrics {
        let _ = write!(out, "{metric:<width$}");
        for (name, column) in columns {
            let text = match pick(column) {
                Some(f) => {
                    if let Err(e) = f {
                        let _ = writeln!(notes, "{name} / {metric}: {e}");
                    }
                    cell(f, unit)
                }
                None => "-".to_owned(),
            };
            let _ = write!(out, "   {text:>col_width$}");
        }
        out.push('\n');
    }
    for (name, column) in columns {
        if column.reachable_samples.is_empty() {
            continue;
        }
        let samples: Vec<String> = column
            .reachable_samples
            .iter()
            .map(|s| match s {
                Ok(d) => format!("{:.0}", d.as_secs_f64() * 1e3),
                Err(_) => "failed".to_owned(),
            })
            .collect();
        let _ = writeln!(
            out,
            "  {name} label-to-reachable samples (ms): {}",
            samples.join(", ")
        );
    }
    if !notes.is_empty() {
        let _ = write!(out, "\nfailures:\n{notes}");
    }
    out
}

fn main() {
    // `cargo test --all-targets` runs harness-less benches without `--bench`; a multi-minute
    // measurement of a debug build would be both slow and meaningless there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("agent_path: measurement runs only under `cargo bench`");
        return;
    }
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    require_tools(DOCKER_TOOLS);
    let secs: u64 = std::env::var("AGENT_PATH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);

    println!("wireguard-go: {}", wireguard_go_version());
    // Both rebuilt (release) here, before anything is measured.
    println!("sidecar-agent: {}", agent_bin().display());
    println!("sidecar-relay: {}", relay_bin().display());
    println!(
        "path: remote -> router -> relay (sidecar-relay) -> NAT -> docker host -> container; \
         outer IPv4, inner IPv6, {secs} s iperf3 runs"
    );
    println!("  tun: sidecar-agent run --mode tun (sidecar0 TUN in the container)");
    println!(
        "  netstack: sidecar-agent run --mode netstack (userspace stack in the agent, \
         forwarding to the container's Docker address; it answers ping itself)"
    );
    println!(
        "  wg-go client (no agent): wireguard-go in the client site, iperf3 server in the site"
    );
    println!("  iperf3 server in the container's netns (nsenter); ping and iperf3 clients on the remote host");

    let tun = measure_agent(AgentMode::Tun, secs);
    let netstack = measure_agent(AgentMode::Netstack, secs);
    let wg_go = measure_wg_go_client(secs);
    println!();
    print!(
        "{}",
        table(&[
            ("tun", &tun),
            ("netstack", &netstack),
            ("wg-go client (no agent)", &wg_go),
        ])
    );
}
