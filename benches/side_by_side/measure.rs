//! One measurement of a path: TCP throughput with iperf3 and ping round trips, idle
//! and behind a running TCP stream.

use std::net::IpAddr;
use std::time::Duration;

use crate::probe::{Depths, Probe};
use crate::support::traffic::iperf3_start;
use crate::support::{iperf3, ping_with, Netns, Ping};

/// Echo requests per ping series, one every 10 ms: enough replies that the 99th
/// percentile is an observed round trip rather than the maximum of a handful.
pub const PINGS: u32 = 500;

/// How long the loading stream runs before the pings start: slow start is over and
/// the stream fills the path.
const LOAD_SETTLE: Duration = Duration::from_secs(2);

/// Seconds of each iperf3 run (after one omitted warm-up second).
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub secs: u64,
}

/// Where traffic goes: iperf3's server and ping's target in `server` at `addr`, the
/// iperf3 client and ping in `client`.
pub struct Path<'a> {
    pub server: &'a Netns,
    pub client: &'a Netns,
    pub addr: IpAddr,
}

/// Received throughput of one iperf3 run, in Gbit/s.
pub fn tcp_gbps(path: &Path<'_>, s: Settings, extra: &str) -> f64 {
    let args = format!("-t {} --omit 1 {extra}", s.secs);
    iperf3(path.server, path.client, path.addr, &args).received_bits_per_second() / 1e9
}

/// Round-trip statistics of one ping series.
#[derive(Clone, Copy, Debug)]
pub struct Rtt {
    pub avg_ms: f64,
    pub p99_ms: f64,
    pub loss_percent: f64,
}

fn rtt(ping: &Ping) -> Rtt {
    assert!(
        ping.received > 0 && !ping.rtts_ms.is_empty(),
        "no ping replies:\n{}",
        ping.output
    );
    Rtt {
        avg_ms: ping.avg_ms(),
        p99_ms: percentile(&ping.rtts_ms, 99.0),
        loss_percent: 100.0 * f64::from(ping.transmitted - ping.received)
            / f64::from(ping.transmitted.max(1)),
    }
}

/// Nearest-rank percentile of non-empty samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ping_series(path: &Path<'_>) -> Ping {
    // -W 1: a reply later than a second counts as lost rather than stalling the series.
    ping_with(path.client, path.addr, &format!("-c {PINGS} -i 0.01 -W 1"))
}

/// Pings on an otherwise quiet path.
pub fn ping_idle(path: &Path<'_>) -> Rtt {
    rtt(&ping_series(path))
}

/// Pings while one TCP stream runs from `path.client` to `path.server` (`extra` adds
/// iperf3 arguments, e.g. `-R` for the other direction). With `probe` (namespace and
/// tunnel interface of the server end, then of the client end), also samples the
/// queues in between while the pings run.
pub fn ping_loaded(
    path: &Path<'_>,
    s: Settings,
    extra: &str,
    probe: Option<[(&Netns, String); 2]>,
) -> (Rtt, Option<Depths>) {
    let pinging = Duration::from_millis(u64::from(PINGS) * 10);
    let secs = s.secs.max((LOAD_SETTLE + pinging).as_secs() + 2);
    let run = iperf3_start(
        path.server,
        path.client,
        path.addr,
        &format!("-t {secs} {extra}"),
    );
    std::thread::sleep(LOAD_SETTLE);
    let probe = probe.map(Probe::start);
    let ping = ping_series(path);
    let depths = probe.map(Probe::finish);
    let load = run.finish();
    assert!(
        load.received_bytes() > 0,
        "the loading stream carried nothing: {}",
        load.json["end"]
    );
    (rtt(&ping), depths)
}
