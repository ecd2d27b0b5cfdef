//! Where packets wait while a stream runs: sampled queue depths in the kernel on both
//! ends of the tunnel, so a latency figure can be traced to a queue (the TUN
//! device's qdisc and ring on the sending side, the UDP socket's receive queue on
//! the receiving side) rather than guessed at. Enabled with `SIDE_BY_SIDE_PROBE=1`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use std::process::Command;

use crate::support::Netns;

/// `cmdline` inside namespace `ns` (by name, so the sampling thread owns nothing of
/// the namespace); its stdout, empty on failure.
fn exec_in(ns: &str, cmdline: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmdline.split_whitespace())
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The largest depths seen, and how many packets were dropped meanwhile.
#[derive(Clone, Debug, Default)]
pub struct Depths {
    /// Per namespace: the deepest UDP receive queue (bytes, `ss` Recv-Q).
    pub udp_recv_q: [u64; 2],
    /// Per namespace: the deepest qdisc backlog on the tunnel interface (bytes,
    /// packets).
    pub qdisc_backlog: [(u64, u64); 2],
    /// Per namespace: packets the tunnel interface dropped on transmit (its ring full).
    pub tx_dropped: [u64; 2],
    /// Per namespace: UDP receive-buffer overflows (`/proc/net/snmp` RcvbufErrors).
    pub rcvbuf_errors: [u64; 2],
    pub samples: u32,
}

/// Whether `SIDE_BY_SIDE_PROBE` asks for queue sampling.
pub fn enabled() -> bool {
    std::env::var("SIDE_BY_SIDE_PROBE").is_ok_and(|v| !v.is_empty() && v != "0")
}

impl Depths {
    /// One line: per end, the deepest queues and the drops while the pings ran.
    pub fn describe(&self, names: [&str; 2]) -> String {
        let mut parts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let (b, p) = self.qdisc_backlog[i];
            parts.push(format!(
                "{name}: UDP Recv-Q max {} KB, qdisc backlog max {} KB/{p} pkts, tx_dropped {}, \
                 RcvbufErrors {}",
                self.udp_recv_q[i] / 1000,
                b / 1000,
                self.tx_dropped[i],
                self.rcvbuf_errors[i]
            ));
        }
        format!("{} ({} samples)", parts.join("; "), self.samples)
    }
}

/// Samples both namespaces every 20 ms until [`Probe::finish`].
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Depths>,
}

fn udp_recv_q(ns: &str) -> u64 {
    exec_in(ns, "ss -Huan")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

/// (backlog bytes, backlog packets) of the root qdisc on `iface`.
fn qdisc_backlog(ns: &str, iface: &str) -> (u64, u64) {
    let text = exec_in(ns, &format!("tc -s qdisc show dev {iface}"));
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some(at) = words.iter().position(|w| *w == "backlog") else {
        return (0, 0);
    };
    let num = |w: Option<&&str>, suffix: char| {
        w.and_then(|w| w.strip_suffix(suffix))
            .and_then(|n| {
                // tc abbreviates: 12Kb, 3Mb.
                let (digits, mult) = match n.chars().last() {
                    Some('K') => (&n[..n.len() - 1], 1_000),
                    Some('M') => (&n[..n.len() - 1], 1_000_000),
                    _ => (n, 1),
                };
                digits.parse::<u64>().ok().map(|d| d * mult)
            })
            .unwrap_or(0)
    };
    (num(words.get(at + 1), 'b'), num(words.get(at + 2), 'p'))
}

fn tx_dropped(ns: &str, iface: &str) -> u64 {
    exec_in(
        ns,
        &format!("cat /sys/class/net/{iface}/statistics/tx_dropped"),
    )
    .trim()
    .parse()
    .unwrap_or(0)
}

fn rcvbuf_errors(ns: &str) -> u64 {
    let text = exec_in(ns, "cat /proc/net/snmp");
    let udp: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
    let (Some(names), Some(values)) = (udp.first(), udp.get(1)) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

impl Probe {
    /// Starts sampling `ends[i]` (namespace, tunnel interface).
    pub fn start(ends: [(&Netns, String); 2]) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let names: Vec<(String, String)> = ends
            .iter()
            .map(|(ns, iface)| (ns.name().to_owned(), iface.clone()))
            .collect();
        let before: Vec<(u64, u64)> = names
            .iter()
            .map(|(ns, iface)| (tx_dropped(ns, iface), rcvbuf_errors(ns)))
            .collect();
        let thread = std::thread::spawn(move || {
            let ends = names;
            let mut d = Depths::default();
            while !flag.load(Ordering::Relaxed) {
                for (i, (ns, iface)) in ends.iter().enumerate() {
                    d.udp_recv_q[i] = d.udp_recv_q[i].max(udp_recv_q(ns));
                    let (b, p) = qdisc_backlog(ns, iface);
                    let q = &mut d.qdisc_backlog[i];
                    *q = (q.0.max(b), q.1.max(p));
                }
                d.samples += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            for (i, (ns, iface)) in ends.iter().enumerate() {
                d.tx_dropped[i] = tx_dropped(ns, iface).saturating_sub(before[i].0);
                d.rcvbuf_errors[i] = rcvbuf_errors(ns).saturating_sub(before[i].1);
            }
            d
        });
        Probe { stop, thread }
    }

    pub fn finish(self) -> Depths {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("probe thread")
    }
}
