//! The agent image, for real: `config/agent.Dockerfile` built by the test's own dockerd
//! with nothing pulled (from scratch: the agent binary and the libraries it links), run
//! as the README documents (host network and PID namespaces, the Docker socket, the TUN
//! device, three capabilities instead of `--privileged`, the relay settings from an env
//! file), and serving a labeled container end to end: reachable on its public address
//! over ping and TCP from the internet side.

mod support;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::agent::agent_bin;
use support::docker::{Dockerd, DOCKER_TOOLS};
use support::process::{self, TempDir};
use support::relay::{Relay, RelayOptions, Topology, RELAY_TOOLS};
use support::traffic::{ping_with, tcp_echo};
use support::{require_tools, unique_name, wait_until, BASE_TOOLS};

const ENABLE: (&str, &str) = ("sidecar.enable", "true");
const ECHO_PORT: u16 = 8080;
const REACHABLE_BOUND: Duration = Duration::from_secs(30);
/// The capabilities the README gives the agent's container (every other one dropped).
/// `SIDECAR_IMAGE_CAPS` (comma-separated) overrides them, to find out which are needed.
const CAPS: [&str; 3] = ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

fn caps() -> Vec<String> {
    match std::env::var("SIDECAR_IMAGE_CAPS") {
        Ok(list) => list
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(_) => CAPS.iter().map(|c| (*c).to_owned()).collect(),
    }
}

/// The image's root: the binary at /usr/local/bin and each library `ldd` names at its
/// own path, as the Dockerfile's instructions lay it out.
fn image_context(dir: &Path) {
    let bin = agent_bin();
    let install = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to.parent().expect("has a parent")).expect("mkdir");
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {from:?} to {to:?}: {e}"));
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    };
    install(&bin, &dir.join("usr/local/bin/sidecar-agent"));
    let ldd = process::run_ok({
        let mut c = Command::new("ldd");
        c.arg(&bin);
        c
    });
    let libs: Vec<&str> = ldd
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .collect();
    assert!(
        libs.iter().any(|l| l.contains("libc.so")),
        "ldd names no libc:\n{ldd}"
    );
    for lib in libs {
        install(Path::new(lib), &dir.join(lib.trim_start_matches('/')));
    }
}

#[test]
fn agent_image_built_from_scratch_serves_a_labeled_container_with_three_capabilities() {
    require_tools(BASE_TOOLS);
    require_tools(RELAY_TOOLS);
    require_tools(DOCKER_TOOLS);
    require_tools(&["ldd"]);
    let topo = Topology::new();
    let relay = Relay::start(&topo, &RelayOptions::default());
    let site = topo.client_site();
    let docker = Dockerd::new(&site.ns);

    let context = TempDir::new();
    image_context(context.path());
    let image = format!("{}:agent", unique_name("sidecar"));
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/agent.Dockerfile");
    let build = docker.try_docker(&[
        "build",
        "-f",
        dockerfile.to_str().expect("UTF-8 path"),
        "-t",
        &image,
        context.path().to_str().expect("UTF-8 path"),
    ]);
    assert!(
        build.status.success(),
        "docker build failed:\n{}\n{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );

    // The relay settings in an env file (mode 0600), not on any command line.
    let env_file = context.path().join("agent.env");
    std::fs::write(
        &env_file,
        format!(
            "SIDECAR_RELAY={}\nSIDECAR_TOKEN={}\nSIDECAR_PIN={}\n",
            relay.url(""),
            relay.creds.default_token,
            relay.creds.pin
        ),
    )
    .expect("write the env file");
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let agent_name = unique_name("agent");
    let socket_mount = format!("{}:/var/run/docker.sock", docker.socket.display());
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &agent_name,
        "--network",
        "host",
        "--pid",
        "host",
        "--cap-drop",
        "ALL",
    ];
    let caps = caps();
    for cap in &caps {
        args.extend(["--cap-add", cap.as_str()]);
    }
    let env_path = env_file.to_str().expect("UTF-8 path");
    args.extend([
        // /proc/sys writable: the agent turns IPv6 on for the device it adds in the
        // container's namespace (Docker starts containers with IPv6 off).
        "--security-opt",
        "systempaths=unconfined",
        "--device",
        "/dev/net/tun",
        "-v",
        &socket_mount,
        "--env-file",
        env_path,
        &image,
    ]);
    let agent = docker.docker(&args);
    let status = || {
        let out = docker.try_docker(&["exec", &agent, "/usr/local/bin/sidecar-agent", "status"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let logs = || {
        let out = docker.try_docker(&["logs", "--tail", "40", &agent]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let added = docker.inspect(&agent)["HostConfig"]["CapAdd"].clone();
    assert_eq!(
        added.as_array().map(Vec::len).unwrap_or(0),
        caps.len(),
        "{added}"
    );

    let name = unique_name("img");
    let t0 = Instant::now();
    docker.run_named(
        &name,
        &[ENABLE],
        "nc -ll -p 8080 -e cat & exec sleep 1000000",
    );
    let mut row = None;
    wait_until(REACHABLE_BOUND, || {
        row = status()
            .lines()
            .find(|l| l.starts_with(&name))
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter(|cols| cols.get(2).is_some_and(|a| a.contains(':')));
        row.is_some()
    });
    let cols = row.unwrap_or_else(|| {
        panic!(
            "the agent in its image never served {name}:\n{}\nagent log:\n{}",
            status(),
            logs()
        )
    });
    assert_eq!(cols[4], "tun", "{}", status());
    let ip: Ipv6Addr = cols[2]
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("IPv6 in status");
    let ip = IpAddr::V6(ip);
    let reached = wait_until(REACHABLE_BOUND, || {
        ping_with(&topo.remote, ip, "-c 1 -W 1").received == 1
    });
    eprintln!("agent image label-to-ping: {:?}", t0.elapsed());
    assert!(
        reached,
        "{ip} not reachable:\n{}\nagent log:\n{}",
        status(),
        logs()
    );
    let payload = b"through the agent image\n";
    let echoed = wait_until(Duration::from_secs(10), || {
        tcp_echo(&topo.remote, SocketAddr::new(ip, ECHO_PORT), payload)
            .is_ok_and(|got| got == payload)
    });
    assert!(
        echoed,
        "TCP echo at [{ip}]:{ECHO_PORT} failed\nagent log:\n{}",
        logs()
    );
}
