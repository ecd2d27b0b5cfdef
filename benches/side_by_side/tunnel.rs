//! The tunnel between two namespaces joined by a veth: each implementation on both
//! ends (outer and inner IPv4), and the veth itself as the baseline.

use std::time::Duration;

use crate::daemon::{Daemon, Installed, Launch, Userspace};
use crate::measure::{self, Path, Settings};
use crate::probe;
use crate::report::{self, Metric};
use crate::support::traffic::ping_until_reply;
use crate::support::{cidr, endpoint, inner, underlay, Family, KeyPair, Pair, Peer};

const PORT_A: u16 = 51820;
const PORT_B: u16 = 51821;

/// What [`measure`] reports, in this order. The first is the one compared with the veth.
pub const METRICS: [Metric; 7] = [
    report::gbps("tcp 1 stream"),
    report::gbps("tcp 4 streams"),
    report::ms("ping avg idle"),
    report::ms("ping p99 idle"),
    report::ms("ping avg loaded"),
    report::ms("ping p99 loaded"),
    report::percent("ping loss loaded"),
];

/// One column of the table.
pub enum Side {
    /// No tunnel: the same traffic over the veth's own addresses.
    Veth,
    Tunnel(Installed),
}

impl Side {
    pub fn name(&self) -> &'static str {
        match self {
            Side::Veth => "veth",
            Side::Tunnel(i) => i.kind.name(),
        }
    }
}

/// Brings up host `host` (1 = A, 2 = B) of the tunnel, peered with the other host over
/// the underlay; inner IPv4 only.
fn start_end<'p>(
    imp: &Installed,
    launch: &Launch,
    pair: &'p Pair,
    host: u8,
    keys: &KeyPair,
    peer_keys: &KeyPair,
) -> Daemon<'p> {
    let (ns, port, peer_host, peer_port) = match host {
        1 => (&pair.a, PORT_A, 2, PORT_B),
        _ => (&pair.b, PORT_B, 1, PORT_A),
    };
    let daemon = Daemon::start(ns, imp, launch, keys, port);
    daemon.add_addr(&cidr(inner(Family::V4, host), 24));
    daemon.add_peer(
        &Peer::new(&peer_keys.public)
            .allow(cidr(inner(Family::V4, peer_host), 32))
            .endpoint(endpoint(underlay(Family::V4, peer_host), peer_port)),
    );
    daemon
}

/// One round of every metric for `side` on a fresh pair of namespaces; the server
/// (iperf3 and the ping target) is host A, traffic and pings come from host B.
pub fn measure(side: &Side, launch: &Launch, s: Settings) -> Vec<f64> {
    let pair = Pair::new();
    let keys = (KeyPair::generate(), KeyPair::generate());
    let mut ends = Vec::new();
    let addr = match side {
        Side::Veth => underlay(Family::V4, 1),
        Side::Tunnel(imp) => {
            let imp_launch = match imp.kind {
                Userspace::Sidecar | Userspace::SidecarWg => launch.clone(),
                _ => Launch::default(),
            };
            ends.push(start_end(imp, &imp_launch, &pair, 1, &keys.0, &keys.1));
            ends.push(start_end(imp, &imp_launch, &pair, 2, &keys.1, &keys.0));
            inner(Family::V4, 1)
        }
    };
    assert!(
        ping_until_reply(&pair.b, addr, Duration::from_secs(10)),
        "{} does not carry a ping to {addr}",
        side.name()
    );
    let path = Path {
        server: &pair.a,
        client: &pair.b,
        addr,
    };
    let tcp1 = measure::tcp_gbps(&path, s, "");
    let tcp4 = measure::tcp_gbps(&path, s, "-P 4");
    let idle = measure::ping_idle(&path);
    let probe = probe::enabled().then(|| {
        let iface = |i: usize| {
            ends.get(i)
                .map_or_else(|| Pair::LINK.to_owned(), |d: &Daemon<'_>| d.iface.clone())
        };
        [(&pair.a, iface(0)), (&pair.b, iface(1))]
    });
    let (loaded, depths) = measure::ping_loaded(&path, s, "", probe);
    if let Some(d) = depths {
        println!(
            "    {}: {}",
            side.name(),
            d.describe(["A (server)", "B (client)"])
        );
    }
    for end in &mut ends {
        end.assert_running();
    }
    vec![
        tcp1,
        tcp4,
        idle.avg_ms,
        idle.p99_ms,
        loaded.avg_ms,
        loaded.p99_ms,
        loaded.loss_percent,
    ]
}
