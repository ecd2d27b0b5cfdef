//! Traffic through the tunnel as a user would generate it: ping, iperf3 and a TCP echo.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

use super::netns::Netns;
use super::process::ChildGuard;
use super::wait_until;

/// What `ping` reported.
#[derive(Clone, Debug)]
pub struct Ping {
    pub transmitted: u32,
    pub received: u32,
    /// Round-trip time of each reply, in milliseconds.
    pub rtts_ms: Vec<f64>,
    pub output: String,
}

impl Ping {
    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }

    pub fn avg_ms(&self) -> f64 {
        self.rtts_ms.iter().sum::<f64>() / self.rtts_ms.len().max(1) as f64
    }

    pub fn p50_ms(&self) -> f64 {
        let mut v = self.rtts_ms.clone();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// `ping -c 3 -i 0.2` from `ns` to `dst`.
pub fn ping(ns: &Netns, dst: IpAddr) -> Ping {
    ping_with(ns, dst, "-c 3 -i 0.2 -W 2")
}

/// `ping ARGS DST` from `ns`; never panics on loss so callers can assert either way.
pub fn ping_with(ns: &Netns, dst: IpAddr, args: &str) -> Ping {
    let out = ns.try_exec(&format!("ping -n {args} {dst}"));
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_ping(&output)
}

fn parse_ping(output: &str) -> Ping {
    let mut ping = Ping {
        transmitted: 0,
        received: 0,
        rtts_ms: Vec::new(),
        output: output.to_owned(),
    };
    for line in output.lines() {
        if let Some(t) = line.split("time=").nth(1) {
            if let Some(ms) = t.split_whitespace().next().and_then(|v| v.parse().ok()) {
                ping.rtts_ms.push(ms);
            }
        }
        if line.contains("packets transmitted") {
            let number_before = |word: &str| {
                let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
                words
                    .iter()
                    .position(|w| *w == word)
                    .and_then(|i| words.get(i.checked_sub(1)?)?.parse().ok())
                    .unwrap_or(0)
            };
            ping.transmitted = number_before("packets");
            ping.received = number_before("received");
        }
    }
    ping
}

/// Pings until a reply comes back (a handshake may be in progress) or `timeout` passes.
pub fn ping_until_reply(ns: &Netns, dst: IpAddr, timeout: Duration) -> bool {
    wait_until(timeout, || ping_with(ns, dst, "-c 1 -W 1").received == 1)
}

/// A finished iperf3 run, as reported by the client with `-J`.
pub struct Iperf {
    pub json: Value,
}

impl Iperf {
    fn received(&self) -> &Value {
        let end = &self.json["end"];
        // Present for both TCP and UDP since iperf 3.?; older ones only had `sum` for UDP.
        if end["sum_received"].is_object() {
            &end["sum_received"]
        } else {
            &end["sum"]
        }
    }

    /// Bytes that arrived at the receiving side.
    pub fn received_bytes(&self) -> u64 {
        self.received()["bytes"].as_u64().unwrap_or(0)
    }

    pub fn received_bits_per_second(&self) -> f64 {
        self.received()["bits_per_second"].as_f64().unwrap_or(0.0)
    }

    /// Bytes the sending side wrote.
    pub fn sent_bytes(&self) -> u64 {
        self.json["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0)
    }

    /// TCP segments the sender retransmitted (0 for UDP).
    pub fn retransmits(&self) -> u64 {
        self.json["end"]["sum_sent"]["retransmits"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Checks a TCP run: at least `floor` bytes arrived, and what arrived is what was sent
    /// short of at most what can still be in flight when the sender's clock stops (the
    /// socket buffers, a few MiB at most). `what` names the run in the failure message.
    pub fn assert_tcp_delivered(&self, floor: u64, what: &str) {
        let (sent, received) = (self.sent_bytes(), self.received_bytes());
        let in_flight = (sent / 10).max(8 << 20);
        assert!(
            received >= floor && received <= sent && sent - received <= in_flight,
            "{what}: {sent} bytes sent, {received} received (at least {floor} required, \
             at most {in_flight} short): {}",
            self.json["end"]
        );
    }

    /// Checks a UDP run of `len`-byte datagrams: every datagram that arrived arrived whole,
    /// no more arrived than were sent, and at most `max_loss_percent` were lost.
    pub fn assert_udp_delivered(&self, len: u64, max_loss_percent: f64, what: &str) {
        let r = self.received();
        let packets = r["packets"].as_u64().unwrap_or(0);
        let lost = r["lost_packets"].as_u64().unwrap_or(0);
        let sent = self.json["end"]["sum_sent"]["packets"]
            .as_u64()
            .unwrap_or(0);
        let arrived = packets.saturating_sub(lost);
        let loss = self.udp_loss_percent();
        eprintln!("{what}: {arrived}/{sent} datagrams of {len} bytes arrived, {loss:.2}% lost");
        assert!(
            arrived > 0
                && arrived <= sent
                && self.received_bytes() == arrived * len
                && self.sent_bytes() == sent * len
                && loss <= max_loss_percent,
            "{what}: {sent} datagrams of {len} bytes sent ({} bytes), {arrived} arrived \
             ({} bytes), {loss:.2}% lost (at most {max_loss_percent}% allowed): {}",
            self.sent_bytes(),
            self.received_bytes(),
            self.json["end"]
        );
    }

    /// UDP datagrams lost, in percent of those sent.
    pub fn udp_loss_percent(&self) -> f64 {
        let r = self.received();
        let lost = r["lost_packets"].as_f64().unwrap_or(0.0);
        let packets = r["packets"].as_f64().unwrap_or(0.0);
        if packets == 0.0 {
            100.0
        } else {
            100.0 * lost / packets
        }
    }

    /// Bytes per reporting interval (one per second by default), in order.
    pub fn interval_bytes(&self) -> Vec<u64> {
        self.json["intervals"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| i["sum"]["bytes"].as_u64().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// An iperf3 server and client pair while the client runs.
pub struct IperfRun {
    server: ChildGuard,
    client: ChildGuard,
    what: String,
    limit: u64,
}

/// Starts a one-shot iperf3 server in `server` and a JSON-reporting client in `client`
/// connecting to `addr` with extra `args` (e.g. `-t 2 -R`).
pub fn iperf3_start(server: &Netns, client: &Netns, addr: IpAddr, args: &str) -> IperfRun {
    let mut srv = server.spawn("iperf3 -s -1");
    let listening = wait_until(Duration::from_secs(5), || {
        !srv.is_running() || !server.try_exec("ss -Hltn sport = :5201").stdout.is_empty()
    });
    assert!(
        listening && srv.is_running(),
        "iperf3 server did not start: {}",
        srv.stderr()
    );
    // The outer timeout bounds a run whose tunnel died mid-way, which iperf3 itself would
    // wait out for minutes.
    let limit = run_secs(args) + 20;
    let cmdline = format!("timeout {limit} iperf3 -c {addr} -J --connect-timeout 5000 {args}");
    let client_guard = client.spawn(&cmdline);
    IperfRun {
        server: srv,
        client: client_guard,
        what: cmdline,
        limit,
    }
}

impl IperfRun {
    /// Waits for the client and returns its report; panics if the run failed.
    pub fn finish(mut self) -> Iperf {
        let status = self
            .client
            .wait_timeout(Duration::from_secs(self.limit + 5));
        let stdout = self.client.stdout();
        let json: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        let error = json["error"].as_str().map(str::to_owned);
        assert!(
            status.is_some_and(|s| s.success()) && error.is_none() && json.is_object(),
            "`{}` failed ({status:?}): {}\nclient stderr: {}\nserver stderr: {}",
            self.what,
            error.unwrap_or_else(|| stdout.chars().take(2000).collect()),
            self.client.stderr(),
            self.server.stderr()
        );
        Iperf { json }
    }
}

/// The `-t` duration in `args`, or iperf3's default.
fn run_secs(args: &str) -> u64 {
    let mut words = args.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "-t")
        .and(words.next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(10)
}

/// Runs iperf3 from `client` to a server in `server` at `addr` and returns the report.
pub fn iperf3(server: &Netns, client: &Netns, addr: IpAddr, args: &str) -> Iperf {
    iperf3_start(server, client, addr, args).finish()
}

/// Sends `data` from `ns` to an echo server at `to`, half-closes, and returns what
/// came back before the server closed.
pub fn tcp_echo(ns: &Netns, to: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    ns.enter(|| {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(data)?;
        s.shutdown(Shutdown::Write)?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf)
    })
}
