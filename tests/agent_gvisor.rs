//! gVisor, for real: Debian's `runsc` registered as a runtime of the test's dockerd, a
//! labeled container started with `--runtime=runsc`, and the agent in auto mode. The
//! sandbox runs the container's network stack itself (runsc's default
//! `--network=sandbox`), so a TUN device in the container's namespace would never be
//! seen; the agent must notice that by itself, say why in `status`, and serve the
//! container in netstack mode: reachable on its public address over TCP, UDP and ping
//! from the internet side. A runc container beside it still gets its TUN device. And
//! under a flood of 2,000 UDP flows, the container's share of the agent's descriptors
//! holds: a second container still comes up and the first still serves new clients
//! (without the share, the agent runs out of descriptors for everything). With
//! `sidecar.proxy_protocol`, the sandboxed server learns each client's own address.
//!
//! The servers run inside the sandbox (busybox `nc` for TCP, Perl for UDP): a socket of
//! this test opened in the container's namespace would not see the sandbox's traffic.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sidecar::netstack::ProxyProtocol;
use support::agent::{agent_bin, agent_status};
use support::docker::{Dockerd, DOCKER_TOOLS};
use support::process::{ChildGuard, TempDir};
use support::proxy_header::parse_proxy_header;
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::{ping_with, tcp_echo};
use support::{require_tools, unique_name, wait_until, Netns, BASE_TOOLS};

const ENABLE: (&str, &str) = ("sidecar.enable", "true");
const ECHO_PORT: u16 = 8080;
const UDP_PORT: u16 = 7007;
const REACHABLE_BOUND: Duration = Duration::from_secs(20);
/// Where the host's /usr is mounted (read-only) in the gVisor container.
const HOST_USR: &str = "/host/usr";

/// The `docker run` options and the command of the gVisor container: a busybox TCP
/// echo, and a UDP echo in Perl (busybox-static has no UDP server; `perl-base` is
/// part of every Debian system), started through the host's dynamic loader since the
/// busybox image has no libraries of its own.
fn gvisor_servers() -> (Vec<String>, String) {
    let loader =
        std::fs::canonicalize("/lib64/ld-linux-x86-64.so.2").expect("the host's dynamic loader");
    let libdir = loader.parent().expect("loader directory");
    let rel = libdir.strip_prefix("/usr").expect("merged /usr");
    let lib = format!("{HOST_USR}/{}", rel.display());
    let perl = format!(
        "{lib}/ld-linux-x86-64.so.2 --library-path {lib} {HOST_USR}/bin/perl -I{lib}/perl-base \
         -MSocket -e 'socket(S, PF_INET, SOCK_DGRAM, 0) or die \"socket: $!\"; \
         bind(S, pack_sockaddr_in({UDP_PORT}, INADDR_ANY)) or die \"bind: $!\"; \
         while (my $from = recv(S, my $buf, 2048, 0)) {{ send(S, $buf, 0, $from) }}'"
    );
    let cmd = format!("{perl} & /bin/nc -ll -p {ECHO_PORT} -e /bin/cat & exec /bin/sleep 1000000");
    (
        vec![
            "--runtime=runsc".into(),
            "-v".into(),
            format!("/usr:{HOST_USR}:ro"),
        ],
        cmd,
    )
}

/// `sidecar-agent run --mode auto` in `ns`; SIGTERM on drop (by its guard).
struct Agent {
    child: ChildGuard,
    state_dir: PathBuf,
}

impl Agent {
    fn start(ns: &Netns, relay: &Relay, docker: &Dockerd, state_dir: &Path) -> Agent {
        Agent::start_limited(ns, relay, docker, state_dir, None)
    }

    /// Like [`Agent::start`], with soft and hard RLIMIT_NOFILE set to `nofile`.
    fn start_limited(
        ns: &Netns,
        relay: &Relay,
        docker: &Dockerd,
        state_dir: &Path,
        nofile: Option<u64>,
    ) -> Agent {
        let mut cmd = ns.program(agent_bin());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.args(["run", "--relay", &relay.url("")])
            .args(["--token", &relay.creds.default_token])
            .args(["--pin", &relay.creds.pin])
            .arg("--docker")
            .arg(&docker.socket)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--mode", "auto"]);
        let mut child = ChildGuard::spawn("sidecar-agent run", cmd);
        let ok = wait_until(Duration::from_secs(30), || {
            !child.is_running() || agent_status(state_dir).is_some()
        });
        assert!(
            ok && child.is_running(),
            "sidecar-agent run did not come up:\n{}",
            child.stderr_tail(40)
        );
        Agent {
            child,
            state_dir: state_dir.to_owned(),
        }
    }

    fn status(&self) -> String {
        agent_status(&self.state_dir).unwrap_or_default()
    }

    /// The status row of `name` (its first line split in columns) and the indented
    /// lines under it, once it has an IPv6 address.
    fn wait_row(&self, name: &str) -> (Vec<String>, Vec<String>) {
        let mut found = None;
        wait_until(REACHABLE_BOUND, || {
            found = row_of(&self.status(), name)
                .filter(|(cols, _)| cols.get(2).is_some_and(|a| a.contains(':')));
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no row with an address for {name}:\n{}\nagent log:\n{}",
                self.status(),
                self.child.stderr_tail(40)
            )
        })
    }
}

fn row_of(status: &str, name: &str) -> Option<(Vec<String>, Vec<String>)> {
    let mut lines = status.lines().skip_while(|l| !l.starts_with(name));
    let cols = lines
        .next()?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let extra = lines
        .take_while(|l| l.starts_with(' '))
        .map(|l| l.trim().to_owned())
        .collect();
    Some((cols, extra))
}

fn ipv6_of(cols: &[String]) -> IpAddr {
    let v6: Ipv6Addr = cols[2]
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv6 in {cols:?}"));
    IpAddr::V6(v6)
}

/// Sends datagrams from `ns` to `addr` until one comes back from `addr` itself.
fn udp_roundtrip(ns: &Netns, addr: IpAddr) -> Result<(), String> {
    let sock = ns.udp_socket((Ipv6Addr::UNSPECIFIED, 0).into());
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("set_read_timeout");
    let payload = format!("udp to {addr}");
    let mut last = String::from("no answer");
    for _ in 0..20 {
        sock.send_to(payload.as_bytes(), (addr, UDP_PORT))
            .map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 1500];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if from.ip() == addr && &buf[..n] == payload.as_bytes() => return Ok(()),
            Ok((n, from)) => last = format!("{n} bytes from {from}"),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn require() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    require_tools(DOCKER_TOOLS);
    require_tools(&["unshare", "mount"]);
}

/// Starts the gVisor container with its servers; its id.
fn run_gvisor(docker: &Dockerd, name: &str) -> String {
    let (options, servers) = gvisor_servers();
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    docker.run_with(name, &options, &[ENABLE], &servers)
}

fn assert_tcp_echo(ns: &Netns, ip: IpAddr, what: &str) {
    let payload = b"through gVisor\n";
    let mut last = String::new();
    let echoed = wait_until(Duration::from_secs(15), || {
        match tcp_echo(ns, SocketAddr::new(ip, ECHO_PORT), payload) {
            Ok(got) if got == payload => true,
            Ok(got) => {
                last = format!("echo answered {:?}", String::from_utf8_lossy(&got));
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(echoed, "{what}: TCP echo at [{ip}]:{ECHO_PORT}: {last}");
}

#[test]
fn runsc_container_is_served_in_netstack_mode_over_tcp_udp_and_ping() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let site = topo.client_site();
    let docker = Dockerd::with_runsc(&site.ns);
    let state = TempDir::new();
    let agent = Agent::start(&site.ns, &relay, &docker, state.path());

    let name = unique_name("gv");
    let t0 = Instant::now();
    let id = run_gvisor(&docker, &name);
    let runtime = docker.inspect(&id)["HostConfig"]["Runtime"].clone();
    assert_eq!(runtime, "runsc", "the container does not run under gVisor");
    let (cols, extra) = agent.wait_row(&name);
    let ip = ipv6_of(&cols);
    assert_eq!(cols[4], "netstack", "{}", agent.status());
    assert!(
        extra
            .iter()
            .any(|l| l.starts_with("mode:") && l.contains("sandbox")),
        "`status` does not say why netstack was chosen:\n{}",
        agent.status()
    );

    let reached = wait_until(REACHABLE_BOUND, || {
        ping_with(&topo.remote, ip, "-c 1 -W 1").received == 1
    });
    eprintln!("runsc label-to-ping: {:?}", t0.elapsed());
    assert!(
        reached,
        "{ip} (runsc) does not answer pings:\n{}\nagent log:\n{}",
        agent.status(),
        agent.child.stderr_tail(40)
    );
    let p = ping_with(&topo.remote, ip, "-c 3 -i 0.2 -W 2");
    assert!(p.all_received(), "ping {ip} lost replies:\n{}", p.output);

    assert_tcp_echo(&topo.remote, ip, "runsc");
    udp_roundtrip(&topo.remote, ip).unwrap_or_else(|e| {
        panic!(
            "UDP echo at [{ip}]:{UDP_PORT} (runsc): {e}\ncontainer log:\n{}",
            String::from_utf8_lossy(&docker.try_docker(&["logs", &id]).stderr)
        )
    });

    // The detection is about the sandbox, not a blanket switch: a runc container on
    // the same agent still gets its TUN device.
    let plain = unique_name("rc");
    docker.run_named(&plain, &[ENABLE], "exec sleep 1000000");
    let (cols, extra) = agent.wait_row(&plain);
    assert_eq!(cols[4], "tun", "{}", agent.status());
    assert!(
        !extra.iter().any(|l| l.starts_with("mode:")),
        "{}",
        agent.status()
    );
}

/// `sidecar.proxy_protocol=v2` on a sandboxed container: its server (an echo, so the
/// test sees what it received) reads a PROXY header naming the remote client's own
/// address and port and the container's public address, then the client's bytes.
#[test]
fn proxy_protocol_tells_the_container_the_real_client() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let site = topo.client_site();
    let docker = Dockerd::with_runsc(&site.ns);
    let state = TempDir::new();
    let agent = Agent::start(&site.ns, &relay, &docker, state.path());
    let name = unique_name("pp");
    let (options, servers) = gvisor_servers();
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    docker.run_with(
        &name,
        &options,
        &[ENABLE, ("sidecar.proxy_protocol", "v2")],
        &servers,
    );
    let (cols, _) = agent.wait_row(&name);
    assert_eq!(cols[4], "netstack", "{}", agent.status());
    let ip = ipv6_of(&cols);
    let public = SocketAddr::new(ip, ECHO_PORT);
    let payload = b"EHLO client.example\r\n";
    let mut last = String::new();
    let mut seen = None;
    wait_until(Duration::from_secs(15), || {
        let got = topo.remote.enter(|| -> std::io::Result<_> {
            let mut s = TcpStream::connect_timeout(&public, Duration::from_secs(3))?;
            let client = s.local_addr()?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(payload)?;
            s.shutdown(Shutdown::Write)?;
            let mut echoed = Vec::new();
            s.read_to_end(&mut echoed)?;
            Ok((client, echoed))
        });
        match got {
            Ok((client, echoed)) if !echoed.is_empty() => seen = Some((client, echoed)),
            Ok(_) => last = "the connection closed with nothing echoed".into(),
            Err(e) => last = e.to_string(),
        }
        seen.is_some()
    });
    let (client, echoed) = seen.unwrap_or_else(|| {
        panic!(
            "TCP echo at {public}: {last}\nagent log:\n{}",
            agent.child.stderr_tail(30)
        )
    });
    let ((source, destination), rest) = parse_proxy_header(ProxyProtocol::V2, &echoed);
    assert_eq!(
        source, client,
        "the header names someone else as the client"
    );
    assert_eq!(destination, public);
    assert_eq!(rest, payload, "the client's bytes do not follow the header");
}

/// 2,000 UDP flows towards the netstack container of an agent held to 1,024 file
/// descriptors: the container's share caps them, so a second labeled container still
/// comes up, and the first still serves a new client.
#[test]
fn udp_flood_on_one_container_leaves_room_for_another_and_for_new_clients() {
    require();
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let site = topo.client_site();
    let docker = Dockerd::with_runsc(&site.ns);
    let state = TempDir::new();
    let mut agent = Agent::start_limited(&site.ns, &relay, &docker, state.path(), Some(1024));

    let first = unique_name("gv");
    let id = run_gvisor(&docker, &first);
    let (cols, _) = agent.wait_row(&first);
    assert_eq!(cols[4], "netstack", "{}", agent.status());
    let ip = ipv6_of(&cols);
    udp_roundtrip(&topo.remote, ip).unwrap_or_else(|e| panic!("UDP before the flood: {e}"));

    // From eight addresses of the remote host (beside its own, on its link), so the
    // per-source cap alone does not hold the flood back: each flow a socket of its own
    // (a source port of its own), one datagram.
    const FLOWS: u16 = 2000;
    const SOURCES: u16 = 8;
    let sources: Vec<Ipv6Addr> = (0..SOURCES)
        .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x100 + i))
        .collect();
    for a in &sources {
        topo.remote
            .ip(&format!("-6 addr add {a}/64 dev eth0 nodad"));
    }
    topo.remote.enter(|| {
        for i in 0..FLOWS {
            let from = sources[usize::from(i % SOURCES)];
            let sock = std::net::UdpSocket::bind((from, 0)).expect("bind");
            sock.send_to(format!("flow {i}").as_bytes(), (ip, UDP_PORT))
                .expect("send");
        }
    });

    // Datagrams keep their order through the tunnel: once a probe behind the flood
    // is answered, the netstack has seen every flow of it.
    udp_roundtrip(&topo.remote, ip).unwrap_or_else(|e| {
        panic!(
            "UDP right after the flood: {e}\nagent log:\n{}",
            agent.child.stderr_tail(40)
        )
    });

    let second = unique_name("rc");
    let t0 = Instant::now();
    docker.run_named(
        &second,
        &[ENABLE],
        "nc -ll -p 8080 -e cat & exec sleep 1000000",
    );
    let (cols, _) = agent.wait_row(&second);
    eprintln!("second container served {:?} after the flood", t0.elapsed());
    let second_ip = ipv6_of(&cols);
    assert!(
        wait_until(REACHABLE_BOUND, || {
            ping_with(&topo.remote, second_ip, "-c 1 -W 1").received == 1
        }),
        "the second container is not reachable after the flood:\n{}\nagent log:\n{}",
        agent.status(),
        agent.child.stderr_tail(40)
    );

    // A new client of the first container (a new source port, so a new flow).
    udp_roundtrip(&topo.remote, ip).unwrap_or_else(|e| {
        panic!(
            "UDP after the flood: {e}\nagent log:\n{}\ncontainer log:\n{}",
            agent.child.stderr_tail(40),
            String::from_utf8_lossy(&docker.try_docker(&["logs", &id]).stderr)
        )
    });
    assert_tcp_echo(&topo.remote, ip, "after the flood");
    assert!(agent.child.is_running(), "{}", agent.child.stderr_tail(40));
}
