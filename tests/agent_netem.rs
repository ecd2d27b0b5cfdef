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
//!   same label and `shape` add the same delay;
//! - `sidecar.api=true`: the container waits on `GET /v1/self` at 127.0.0.1:9530
//!   until its network is initialized, `PUT /v1/self/conditions` adds its latency
//!   within a second and `DELETE` clears it; bad bodies are refused with the reason;
//!   a container without the label reaches no such endpoint, neither its own nor
//!   the other's. In netstack mode the endpoint works the same.

mod support;

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::agent::{agent_bin, agent_status};
use support::docker::{Dockerd, DOCKER_TOOLS};
use support::process::{self, ChildGuard, TempDir};
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::{ping_until_reply, ping_with, Ping};
use support::{require_tools, unique_name, wait_until, Netns, BASE_TOOLS};

const ENABLE: (&str, &str) = ("sidecar.enable", "true");
const API: (&str, &str) = ("sidecar.api", "true");
/// The container's own endpoint, as a program inside it reaches it.
const SELF_API: &str = "127.0.0.1:9530";
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

/// An HTTP request sent from inside container `id` to its own endpoint: the
/// status code and the body of the answer; panics without one.
fn self_request(
    docker: &Dockerd,
    id: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> (u16, String) {
    try_self_request(docker, id, method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path} inside {id}: {e}"))
}

/// [`self_request`], or what went wrong. The request is written by hand and sent
/// with busybox's `nc`: the image's static busybox wget cannot PUT or DELETE (and
/// crashes resolving even a literal address without the C library's NSS modules).
fn try_self_request(
    docker: &Dockerd,
    id: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> Result<(u16, String), String> {
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {SELF_API}\r\nConnection: close\r\n");
    if let Some((content_type, body)) = body {
        request.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    let (host, port) = SELF_API.split_once(':').unwrap();
    let script = format!(r#"printf '%s' "$1" | nc -w 5 {host} {port}"#);
    let out = docker.exec(id, &["sh", "-c", &script, "sh", &request]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            format!(
                "no HTTP answer ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `GET /v1/self` from inside `id`, as a program there would wait on it: the
/// answer, parsed, or why there was none.
fn get_self(docker: &Dockerd, id: &str) -> Result<Value, String> {
    let (status, body) = try_self_request(docker, id, "GET", "/v1/self", None)?;
    if status != 200 {
        return Err(format!("GET /v1/self: {status} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET /v1/self is not JSON ({e}): {body}"))
}

/// Waits, as a test instance would, until `GET /v1/self` inside `id` says the
/// network is initialized; that answer.
fn wait_initialized(docker: &Dockerd, agent: &ChildGuard, id: &str) -> Value {
    let mut last = Err(String::from("never asked"));
    let ok = wait_until(Duration::from_secs(30), || {
        last = get_self(docker, id);
        last.as_ref().is_ok_and(|v| v["initialized"] == true)
    });
    assert!(
        ok,
        "GET /v1/self inside {id} never said initialized: {last:?}\nagent log:\n{}",
        agent.stderr_tail(40)
    );
    last.unwrap()
}

/// Sets conditions from inside `id` with `PUT /v1/self/conditions`; the answer.
fn put_conditions(docker: &Dockerd, id: &str, json: &str) -> Value {
    let (status, body) = self_request(
        docker,
        id,
        "PUT",
        "/v1/self/conditions",
        Some(("application/json", json)),
    );
    assert_eq!(status, 200, "PUT /v1/self/conditions {json}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
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
fn the_container_waits_for_its_network_and_changes_its_own_conditions() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions { ipv4_pool: false });
    let site = topo.client_site();
    let docker = Dockerd::new(&site.ns);
    let state = TempDir::new();
    let agent = start_agent(&site.ns, &relay, &docker, state.path(), "tun");

    let api_name = unique_name("api");
    let other_name = unique_name("other");
    let api = docker.run_named(&api_name, &[ENABLE, API], IDLE);
    let other = docker.run_named(&other_name, &[ENABLE], IDLE);

    // Before anything else, as a test instance does: wait until initialized.
    let me = wait_initialized(&docker, &agent, &api);
    let api_ip = wait_reachable(&agent, state.path(), &topo.remote, &api_name, "tun");
    let other_ip = wait_reachable(&agent, state.path(), &topo.remote, &other_name, "tun");
    assert_eq!(me["container"], api.as_str(), "{me}");
    assert_eq!(me["name"], api_name.as_str(), "{me}");
    assert_eq!(me["ipv6"], api_ip.to_string().as_str(), "{me}");
    assert_eq!(me["ipv4"], Value::Null, "no IPv4 was asked: {me}");
    assert_eq!(me["mode"], "tun", "{me}");
    assert_eq!(me["conditions"], Value::Null, "{me}");

    // PUT: the pings sent right after the answer, the last within a second, all
    // see 50 ms each way.
    let (base, _) = rtt_ms(&topo.remote, other_ip, "unshaped");
    let me = put_conditions(
        &docker,
        &api,
        r#"{"latency":"50ms","jitter":"0ms","loss":"0%"}"#,
    );
    let started = Instant::now();
    let p = ping_with(&topo.remote, api_ip, "-c 10 -i 0.1 -W 2");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(p.received, 10, "{}", p.output);
    let least = p.rtts_ms.iter().copied().fold(f64::INFINITY, f64::min);
    assert_added(
        base,
        least,
        100.0,
        "PUT /v1/self/conditions latency 50ms, least of the pings of the first second",
    );
    let want = serde_json::json!({"latency": "50ms", "jitter": "0ms", "loss": "0%"});
    assert_eq!(me["conditions"], want, "the PUT's answer: {me}");
    assert_eq!(get_self(&docker, &api).unwrap()["conditions"], want);
    // The other container's round trip is its own.
    let (other_rtt, _) = rtt_ms(&topo.remote, other_ip, "unshaped, after the PUT");
    assert!(
        other_rtt < 20.0,
        "the other container got {other_rtt:.2} ms"
    );

    // Mistakes are named and change nothing.
    for (content_type, body, status, reason) in [
        (
            "application/json",
            r#"{"latency":"50"}"#,
            400,
            "latency: expected a duration",
        ),
        (
            "application/json",
            r#"{"loss":"5"}"#,
            400,
            "loss: expected a percentage",
        ),
        (
            "application/json",
            r#"{"latency":"11s"}"#,
            400,
            "above the maximum",
        ),
        (
            "application/json",
            r#"{"delay":"5ms"}"#,
            400,
            "unknown field",
        ),
        ("application/json", "latency=5ms", 415, "not JSON"),
        (
            "text/plain",
            r#"{"latency":"5ms"}"#,
            415,
            "send application/json",
        ),
    ] {
        let (got, answer) = self_request(
            &docker,
            &api,
            "PUT",
            "/v1/self/conditions",
            Some((content_type, body)),
        );
        assert_eq!(got, status, "PUT {content_type} {body}: {answer}");
        assert!(answer.contains(reason), "PUT {body}: {answer}");
    }
    let big = format!(r#"{{"latency":"5ms","x":"{}"}}"#, "a".repeat(5000));
    let (got, answer) = self_request(
        &docker,
        &api,
        "PUT",
        "/v1/self/conditions",
        Some(("application/json", &big)),
    );
    assert_eq!(got, 413, "a 5 kB body: {answer}");
    assert_eq!(
        get_self(&docker, &api).unwrap()["conditions"],
        want,
        "refused bodies changed the conditions"
    );

    // DELETE: back to the unshaped round trip.
    let (status, answer) = self_request(&docker, &api, "DELETE", "/v1/self/conditions", None);
    assert_eq!(status, 200, "DELETE: {answer}");
    assert!(answer.contains(r#""conditions":null"#), "{answer}");
    let (base, _) = rtt_ms(&topo.remote, other_ip, "unshaped");
    let (cleared, p) = rtt_ms(&topo.remote, api_ip, "after DELETE");
    assert_eq!(p.received, p.transmitted, "{}", p.output);
    assert!(
        (cleared - base).abs() <= 5.0,
        "after DELETE the round trip is {cleared:.2} ms, unshaped {base:.2} ms"
    );

    // Only that container reaches it: the other has none of its own, and the
    // first one's is on its loopback alone (its Docker address and its public
    // address refuse the port).
    let api_bridge = docker
        .bridge_ip(&api)
        .expect("the api container's bridge address");
    for (host, port) in [("127.0.0.1", "9530"), (&*api_bridge.to_string(), "9530")] {
        let script = format!(
            r#"printf 'GET /v1/self HTTP/1.1\r\nConnection: close\r\n\r\n' | nc -w 2 {host} {port}"#
        );
        let out = docker.exec(&other, &["sh", "-c", &script]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && said.contains("refused"),
            "the container without the label reached {host}:{port}: {}{said}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = topo
        .remote
        .try_exec(&format!("curl -s -m 2 -g http://[{api_ip}]:9530/v1/self"));
    assert_eq!(
        out.status.code(),
        Some(7),
        "from beyond the relay the endpoint answered (curl exit 7 is refused): {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (status, answer) = self_request(&docker, &api, "GET", "/v1/peers", None);
    assert_eq!(status, 404, "{answer}");
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
    let slow = docker.run_named(
        &slow_name,
        &[ENABLE, API, ("sidecar.latency", "50ms")],
        IDLE,
    );
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

    // The container's own endpoint is the same in netstack mode.
    let me = wait_initialized(&docker, &agent, &slow);
    assert_eq!(me["mode"], "netstack", "{me}");
    assert_eq!(me["ipv6"], slow_ip.to_string().as_str(), "{me}");
    assert_eq!(me["conditions"]["latency"], "20ms", "{me}");
    put_conditions(&docker, &slow, r#"{"latency":"30ms"}"#);
    let (base, _) = rtt_ms(&topo.remote, plain_ip, "unshaped, netstack");
    let (shaped, _) = rtt_ms(&topo.remote, slow_ip, "PUT latency 30ms, netstack");
    assert_added(
        base,
        shaped,
        60.0,
        "PUT /v1/self/conditions 30ms in netstack mode",
    );
}
