//! Side-by-side throughput and latency of every userspace WireGuard at hand, in one
//! invocation:
//!
//! * the tunnel: each implementation on both ends of two namespaces joined by a veth
//!   (MTU 1420 in the tunnel), configured only with `wg` and `ip`: ours
//!   (`sidecar-agent up`), the same engine as `sidecar-wg` (wireguard-go's command
//!   line: nothing but `wg` and `ip` configures it), Mullvad's GotaTun (`gotatun`, from `gotatun-cli`),
//!   boringtun-cli and Debian's wireguard-go; and the bare veth as the baseline;
//! * the relay path (remote host → router → relay → NAT → client): `sidecar-relay run`
//!   against each peer as the relay hop with kernel forwarding and proxy NDP, the
//!   client being `sidecar-agent up` behind every hop.
//!
//! Per round and side: iperf3 TCP with 1 and with 4 streams, and 500 pings 10 ms apart
//! (average and 99th percentile of the individual round trips) on the idle path and
//! while one TCP stream runs. Rounds alternate the order of the sides. Prints medians
//! with min-max, ours divided by every other side, single-stream TCP as a share of the
//! veth, and where ours stands against the best peer; asserts nothing about speed.
//! A peer that cannot be installed or started fails the run.
//!
//! Knobs (environment):
//! * `SIDE_BY_SIDE_PEERS=sidecar-wg,gotatun,boringtun,wireguard-go` picks peers (default: all;
//!   `none` for ours and the baseline only);
//! * `SIDE_BY_SIDE_PATHS=tunnel,relay` picks sections (default: both);
//! * `SIDE_BY_SIDE_SECS` (default 10) is each iperf3 run, after one omitted second;
//! * `SIDE_BY_SIDE_REPEATS` (default 3, at least 1) is the number of rounds;
//! * `SIDE_BY_SIDE_PROBE=1` samples kernel queue depths on both ends during the loaded
//!   pings of the tunnel section and prints them per round;
//! * `SIDE_BY_SIDE_OURS_ENV="K=V K=V"` and `SIDE_BY_SIDE_OURS_CPUS=0` (a `taskset -c`
//!   list) start ours and sidecar-wg differently, for finding where its time goes.
//!
//! Run with `cargo bench --bench side_by_side`. The agent and relay binaries are rebuilt
//! (release) first; missing peers are installed with `cargo install --locked`.

#[path = "../../tests/support/mod.rs"]
mod support;

mod cleanup;
mod daemon;
mod measure;
mod probe;
mod relay;
mod report;
mod tunnel;

use daemon::{Installed, Launch, Userspace};
use measure::Settings;
use support::relay::relay_bin;
use support::wg::MTU;
use support::{require_tools, BASE_TOOLS};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// The comma-separated names in `name`, or `all` when it is unset or empty.
fn list(name: &str, all: &[&str]) -> Vec<String> {
    let v = std::env::var(name).unwrap_or_default();
    let picked: Vec<String> = v
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if picked.is_empty() {
        return all.iter().map(|s| (*s).to_owned()).collect();
    }
    for p in &picked {
        assert!(
            all.contains(&p.as_str()),
            "{name}: unknown `{p}`; choose from {}",
            all.join(",")
        );
    }
    picked
}

fn launch_from_env() -> Launch {
    let env = std::env::var("SIDE_BY_SIDE_OURS_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("SIDE_BY_SIDE_OURS_ENV: `{kv}` is not KEY=VALUE"));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let cpus = std::env::var("SIDE_BY_SIDE_OURS_CPUS")
        .ok()
        .filter(|c| !c.is_empty());
    Launch { env, cpus }
}

fn main() {
    // `cargo test --all-targets` runs harness-less benches without `--bench`; a
    // minutes-long measurement of a debug build would be both slow and meaningless.
    if !std::env::args().any(|a| a == "--bench") {
        println!("side_by_side: measurement runs only under `cargo bench`");
        return;
    }
    cleanup::on_signal_remove_leftovers();
    require_tools(BASE_TOOLS);
    require_tools(&["iperf3", "timeout", "curl", "nft", "sysctl", "taskset"]);
    let settings = Settings {
        secs: env_or("SIDE_BY_SIDE_SECS", 10u64).max(1),
    };
    let repeats = env_or("SIDE_BY_SIDE_REPEATS", 3usize).max(1);
    let peer_names: Vec<&str> = Userspace::PEERS.iter().map(|p| p.name()).collect();
    // `none` leaves only ours and the baseline, for quick runs of one change to ours.
    let peers: Vec<Userspace> = if std::env::var("SIDE_BY_SIDE_PEERS").is_ok_and(|v| v == "none") {
        Vec::new()
    } else {
        list("SIDE_BY_SIDE_PEERS", &peer_names)
            .iter()
            .filter_map(|n| Userspace::from_name(n))
            .collect()
    };
    let paths = list("SIDE_BY_SIDE_PATHS", &["tunnel", "relay"]);
    let launch = launch_from_env();

    // Everything is installed and built before anything is measured.
    let ours = daemon::install(Userspace::Sidecar);
    let relay = paths.iter().any(|p| p == "relay").then(relay_bin);
    let installed: Vec<Installed> = peers.iter().map(|&p| daemon::install(p)).collect();
    println!("ours: {} ({})", ours.path.display(), ours.version);
    if !launch.env.is_empty() || launch.cpus.is_some() {
        println!(
            "ours started with env {:?}, cpus {:?}",
            launch.env, launch.cpus
        );
    }
    for i in &installed {
        println!("{}: {} ({})", i.kind.name(), i.path.display(), i.version);
    }
    println!(
        "{} s iperf3 runs (+1 s omitted), {} pings 10 ms apart per series, {repeats} rounds \
         alternating the order; median (min-max)",
        settings.secs,
        measure::PINGS
    );

    if paths.iter().any(|p| p == "tunnel") {
        println!();
        println!(
            "tunnel: two namespaces, veth, outer IPv4, inner IPv4, MTU {MTU}; each side on \
             both ends, configured with wg and ip only; pings and load from B to A"
        );
        let mut sides = vec![tunnel::Side::Veth, tunnel::Side::Tunnel(ours.clone())];
        sides.extend(installed.iter().cloned().map(tunnel::Side::Tunnel));
        let names = sides.iter().map(|s| s.name().to_owned()).collect();
        let samples = report::collect(names, &tunnel::METRICS, repeats, |i| {
            tunnel::measure(&sides[i], &launch, settings)
        });
        println!("\n{}", samples.table());
        println!(
            "{}",
            samples.ratios(
                Userspace::Sidecar.name(),
                Some("veth"),
                &[Userspace::SidecarWg.name()],
            )
        );
    }

    if let Some(relay) = relay {
        println!();
        println!(
            "relay path: remote -> router -> relay -> NAT -> client, outer IPv4, inner IPv6; \
             the client is sidecar-agent up behind every hop (same allocation)"
        );
        println!("  sidecar-relay: {}", relay.display());
        println!("  <peer>+kernel: the peer + /128 route + kernel forwarding + kernel proxy NDP");
        println!(
            "  down = remote -> client, up = client -> remote; pings from the remote host, \
             loaded = while one stream runs down"
        );
        let mut hops = vec![relay::Hop::Sidecar];
        hops.extend(installed.iter().cloned().map(relay::Hop::Peer));
        let names = hops.iter().map(relay::Hop::name).collect();
        let mut runner = relay::Runner::new();
        let samples = report::collect(names, &relay::METRICS, repeats, |i| {
            runner.measure(&hops[i], settings)
        });
        println!("\n{}", samples.table());
        println!("{}", samples.ratios("sidecar-relay", None, &[]));
    }
}
