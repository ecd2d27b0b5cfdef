//! Emulated network conditions per container, end to end with a real Docker engine
//! (the topology of tests/agent_docker.rs): pings from the remote host beyond the
//! router to two containers served by one agent, one unshaped for comparison.
//!
//! - `sidecar.latency=50ms` (jitter 0, loss 0): the round trip rises by 100 ms ±10%;
//! - `sidecar-agent shape --latency 80ms`: 160 ms more, on the pings sent within a
//!   second of the command returning;
//! - `shape --loss 5%`: of 10,000 pings, 9.75 ±1 % get no answer (5 % each way);
//! - `shape --clear`: the round trip is the unshaped container's again;
//! - in netstack mode (the agent's userspace stack in place of a TUN device) the
//!   same label and `shape` add the same delay.

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::agent::{agent_bin, agent_status};
use support::docker::{Dockerd, DOCKER_TOOLS};
use support::process::{self, ChildGuard, TempDir};
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::{ping_until_reply, ping_with, Ping};
use support::{require_tools, unique_name, wait_until, Netns, BASE_TOOLS};

const ENABLE: (&str, &str) = ("sidecar.enable", "true");
/// Keeps the container up; the kernel inside answers the pings.
const IDLE: &str = "exec sleep 1000000";

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    require_tools(DOCKER_TOOLS);
}

/// `sidecar-agent run --mode MODE` in `ns`, ready once its first reconcile wrote
/// the status.
fn start_agent(
    ns: &Netns,
    relay: &Relay,
    docker: &Dockerd,
    state_dir: &Path,
    mode: &str,
) -> ChildGuard {
    let mut cmd = ns.program(agent_bin());
    cmd.args(["run", "--relay", &relay.url("")])
        .env("SIDECAR_TOKEN", &relay.creds.default_token)
        .args(["--pin", &relay.creds.pin])
        .arg("--docker")
        .arg(&docker.socket)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--mode", mode]);
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

/// `name`'s public IPv6 once `status` shows it active in `mode`, reachable from
/// `remote`.
fn wait_reachable(
    agent: &ChildGuard,
    state: &Path,
    remote: &Netns,
    name: &str,
    mode: &str,
) -> IpAddr {
    let mut ip = None;
    wait_until(Duration::from_secs(30), || {
        ip = agent_status(state).and_then(|text| {
            let cols: Vec<String> = text
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))?
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            let addr = cols.get(2)?.split('/').next()?;
            (cols.get(1)? == "active" && cols.get(4)? == mode).then(|| addr.parse().ok())?
        });
        ip.is_some()
    });
    let ip = ip.unwrap_or_else(|| {
        panic!(
            "{name} never became active:\n{}\nagent log:\n{}",
            agent_status(state).unwrap_or_default(),
            agent.stderr_tail(40)
        )
    });
    assert!(
        ping_until_reply(remote, ip, Duration::from_secs(20)),
        "{name} ({ip}) does not answer pings:\n{}",
        agent.stderr_tail(40)
    );
    ip
}

/// `sidecar-agent shape CONTAINER ARGS`; its output, or why it failed.
fn shape(state: &Path, container: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("shape")
        .arg(container)
        .args(args)
        .arg("--state-dir")
        .arg(state);
    let out = process::output(&mut cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Container `name`'s emulation drops so far, from the agent's `/metrics` (on
/// loopback in `ns`, the default `--health-listen`): (netem_loss, netem_full).
fn netem_drops(ns: &Netns, name: &str) -> (u64, u64) {
    let metrics = ns.exec("curl -sf http://127.0.0.1:9531/metrics");
    let count = |reason: &str| {
        let tail = format!(",name=\"{name}\",reason=\"{reason}\"}}");
        metrics
            .lines()
            .filter(|l| l.starts_with("sidecar_agent_container_dropped_total{"))
            .find_map(|l| l.split_once(&tail))
            .and_then(|(_, n)| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {reason} count for {name} in /metrics:\n{metrics}"))
    };
    (count("netem_loss"), count("netem_full"))
}

/// 40 pings 25 ms apart: the median round trip, in ms.
fn rtt_ms(remote: &Netns, ip: IpAddr, what: &str) -> (f64, Ping) {
    let p = ping_with(remote, ip, "-c 40 -i 0.025 -W 2");
    assert!(
        p.received >= 36,
        "{what}: too few replies from {ip}:\n{}",
        p.output
    );
    (p.p50_ms(), p)
}

/// Asserts that `shaped` is `base` plus `added` ms, within 10% of `added` (and 1 ms).
fn assert_added(base: f64, shaped: f64, added: f64, what: &str) {
    let rise = shaped - base;
    eprintln!(
        "{what}: unshaped {base:.2} ms, shaped {shaped:.2} ms, rise {rise:.2} ms (want {added} ms)"
    );
    let bound = (added * 0.1).max(1.0);
    assert!(
        (rise - added).abs() <= bound,
        "{what}: the round trip rose by {rise:.2} ms, not {added} ms ± {bound} ms \
         (unshaped {base:.2} ms, shaped {shaped:.2} ms)"
    );
}

#[test]
fn latency_and_loss_per_container_from_labels_and_at_run_time() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: false });
    let site = topo.client_site();
    let docker = Dockerd::new(&site.ns);
    let state = TempDir::new();
    let agent = start_agent(&site.ns, &relay, &docker, state.path(), "tun");

    let plain_name = unique_name("plain");
    let slow_name = unique_name("slow");
    docker.run_named(&plain_name, &[ENABLE], IDLE);
    let slow = docker.run_named(
        &slow_name,
        &[
            ENABLE,
            ("sidecar.latency", "50ms"),
            ("sidecar.jitter", "0ms"),
            ("sidecar.loss", "0%"),
        ],
        IDLE,
    );
    let plain_ip = wait_reachable(&agent, state.path(), &topo.remote, &plain_name, "tun");
    let slow_ip = wait_reachable(&agent, state.path(), &topo.remote, &slow_name, "tun");

    // From the label: 50 ms each way.
    let (base, _) = rtt_ms(&topo.remote, plain_ip, "unshaped");
    let (shaped, p) = rtt_ms(&topo.remote, slow_ip, "sidecar.latency=50ms");
    assert_added(base, shaped, 100.0, "sidecar.latency=50ms");
    assert_eq!(
        p.received, p.transmitted,
        "no loss was asked:\n{}",
        p.output
    );

    // At run time, by name: the pings sent right after the command returns, the
    // last of them within a second, all see the new latency.
    let said = shape(
        state.path(),
        &slow_name,
        &["--latency", "80ms", "--jitter", "0ms", "--loss", "0%"],
    )
    .unwrap_or_else(|e| panic!("shape failed: {e}"));
    assert!(said.contains("latency=80ms"), "{said}");
    let started = Instant::now();
    let p = ping_with(&topo.remote, slow_ip, "-c 10 -i 0.1 -W 2");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(p.received, 10, "{}", p.output);
    let (base, _) = rtt_ms(&topo.remote, plain_ip, "unshaped");
    let least = p.rtts_ms.iter().copied().fold(f64::INFINITY, f64::min);
    assert_added(
        base,
        least,
        160.0,
        "shape --latency 80ms, least of the pings of the first second",
    );

    // Loss, by container ID: 5% each way, so 1 - 0.95² = 9.75% of pings unanswered.
    let said = shape(state.path(), &slow[..12], &["--loss", "5%"])
        .unwrap_or_else(|e| panic!("shape failed: {e}"));
    assert!(
        said.contains("loss=5%") && said.contains("latency=0ms"),
        "{said}"
    );
    // Beside what ping saw, what the container's tunnel itself dropped: every
    // unanswered ping should be one of its netem_loss drops, and none netem_full.
    let before = netem_drops(&site.ns, &slow_name);
    let p = ping_with(&topo.remote, slow_ip, "-c 10000 -i 0.002 -W 1 -q");
    let after = netem_drops(&site.ns, &slow_name);
    assert_eq!(p.transmitted, 10_000, "{}", p.output);
    let unanswered = p.transmitted - p.received;
    let lost = 100.0 * f64::from(unanswered) / f64::from(p.transmitted);
    let (emulated, full) = (after.0 - before.0, after.1 - before.1);
    // A positive difference is pings lost outside the emulation; a negative one,
    // other packets (the container's own) it dropped.
    let device = format!(
        "the tunnel dropped {emulated} as netem_loss ({:.2}%) and {full} as netem_full; \
         ping missed {:+} beyond those",
        100.0 * emulated as f64 / f64::from(p.transmitted),
        i64::from(unanswered) - emulated as i64,
    );
    eprintln!(
        "shape --loss 5%: {unanswered} of 10000 pings unanswered, {lost:.2}% (want 9.75 ± 1); {device}"
    );
    assert!(
        (lost - 9.75).abs() <= 1.0,
        "{lost:.2}% of pings lost, not 9.75% ± 1; {device}:\n{}",
        p.output
    );
    assert_eq!(
        full, 0,
        "the delay line was full with no delay asked; {device}"
    );
    // The unshaped container, measured the same way, loses nothing: the losses above
    // are the emulation's, not the host's.
    let q = ping_with(&topo.remote, plain_ip, "-c 2000 -i 0.002 -W 1 -q");
    eprintln!(
        "unshaped: {} of {} pings unanswered",
        q.transmitted - q.received,
        q.transmitted
    );
    assert!(
        q.received + 10 >= q.transmitted,
        "the unshaped container lost pings too:\n{}",
        q.output
    );

    // Cleared: back to the unshaped round trip.
    shape(state.path(), &slow_name, &["--clear"]).unwrap_or_else(|e| panic!("shape failed: {e}"));
    let (base, _) = rtt_ms(&topo.remote, plain_ip, "unshaped");
    let (cleared, p) = rtt_ms(&topo.remote, slow_ip, "cleared");
    assert_eq!(
        p.received, p.transmitted,
        "cleared yet lossy:\n{}",
        p.output
    );
    assert!(
        (cleared - base).abs() <= 5.0,
        "after --clear the round trip is {cleared:.2} ms, unshaped {base:.2} ms"
    );

    // The control socket is the administrator's alone.
    let sock = state.path().join("control.sock");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&sock)
            .expect("control.sock in the state directory")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{sock:?} has mode {mode:o}");

    // Mistakes are named, and change nothing.
    let e = shape(state.path(), "no-such-container", &["--latency", "5ms"]).unwrap_err();
    assert!(e.contains("no container"), "{e}");
    let e = shape(state.path(), &slow_name, &["--latency", "5"]).unwrap_err();
    assert!(e.contains("expected a duration"), "{e}");
    let e = shape(state.path(), &slow_name, &[]).unwrap_err();
    assert!(e.contains("--latency"), "{e}");
}

#[test]
fn netstack_mode_gets_the_same_latency() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: false });
    let site = topo.client_site();
    let docker = Dockerd::new(&site.ns);
    let state = TempDir::new();
    let agent = start_agent(&site.ns, &relay, &docker, state.path(), "netstack");

    let plain_name = unique_name("plain");
    let slow_name = unique_name("slow");
    docker.run_named(&plain_name, &[ENABLE], IDLE);
    docker.run_named(&slow_name, &[ENABLE, ("sidecar.latency", "50ms")], IDLE);
    let plain_ip = wait_reachable(&agent, state.path(), &topo.remote, &plain_name, "netstack");
    let slow_ip = wait_reachable(&agent, state.path(), &topo.remote, &slow_name, "netstack");

    let (base, _) = rtt_ms(&topo.remote, plain_ip, "unshaped, netstack");
    let (shaped, _) = rtt_ms(&topo.remote, slow_ip, "sidecar.latency=50ms, netstack");
    assert_added(base, shaped, 100.0, "sidecar.latency=50ms in netstack mode");

    shape(state.path(), &slow_name, &["--latency", "20ms"])
        .unwrap_or_else(|e| panic!("shape failed: {e}"));
    let (base, _) = rtt_ms(&topo.remote, plain_ip, "unshaped, netstack");
    let (shaped, _) = rtt_ms(&topo.remote, slow_ip, "shape --latency 20ms, netstack");
    assert_added(base, shaped, 40.0, "shape --latency 20ms in netstack mode");
}
