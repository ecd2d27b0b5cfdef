//! Why packets were dropped, the device's counters, and their Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::config::PeerInfo;
use super::device::Device;
use super::policy::PacketInfo;

/// How often each policy drop reason may be logged.
const DROP_LOG_INTERVAL_NS: u64 = 1_000_000_000;

/// Why a packet or datagram was dropped. Each reason has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a WireGuard message, or a truncated one.
    Malformed,
    /// A message for a session or peer we do not know.
    UnknownPeer,
    /// Failed authentication (MAC, AEAD tag, key, timestamp).
    Unauthenticated,
    /// A data packet whose counter was already seen.
    Replay,
    /// A decrypted packet whose source is not in the sending peer's allowed IPs.
    SourceNotAllowed,
    /// An outgoing packet whose destination matches no peer's allowed IPs.
    NoRoute,
    /// An outgoing packet for a peer whose endpoint is not known yet.
    NoEndpoint,
    /// The device has no private key.
    NoKey,
    /// The caller's buffer cannot hold the result.
    BufferTooSmall,
    /// Some other protocol error (no session yet, expired session).
    Protocol,
    /// Over the peer's rate with its shaping queue full.
    RateLimited,
    /// Between a peer and a peer of another tenant (policy).
    OtherTenant,
    /// Between two peers of a tenant whose peers are isolated from each other (policy).
    PeerIsolated,
    /// From a peer to the host's own addresses, or from them to a peer (policy).
    HostAddress,
    /// From a peer to a network the host reaches other than through its uplink, or
    /// from such a network to a peer (policy).
    PrivateNetwork,
    /// For an address of the peers' prefix that no peer holds (answered with
    /// destination unreachable where the rate limit allows).
    Unallocated,
    /// Lost on purpose: the peer's emulated network conditions ask for this loss rate.
    EmulatedLoss,
    /// The peer's emulated delay line held as much as it may.
    EmulationFull,
}

impl DropReason {
    /// Every reason, in the order metrics list them.
    pub const ALL: [DropReason; 18] = [
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::Unauthenticated,
        DropReason::Replay,
        DropReason::SourceNotAllowed,
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::NoKey,
        DropReason::BufferTooSmall,
        DropReason::Protocol,
        DropReason::RateLimited,
        DropReason::OtherTenant,
        DropReason::PeerIsolated,
        DropReason::HostAddress,
        DropReason::PrivateNetwork,
        DropReason::Unallocated,
        DropReason::EmulatedLoss,
        DropReason::EmulationFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::Unauthenticated => "unauthenticated",
            DropReason::Replay => "replay",
            DropReason::SourceNotAllowed => "source",
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::NoKey => "no_key",
            DropReason::BufferTooSmall => "buffer_too_small",
            DropReason::Protocol => "protocol",
            DropReason::RateLimited => "rate_limited",
            DropReason::OtherTenant => "tenant",
            DropReason::PeerIsolated => "isolated",
            DropReason::HostAddress => "host",
            DropReason::PrivateNetwork => "private",
            DropReason::Unallocated => "unallocated",
            DropReason::EmulatedLoss => "netem_loss",
            DropReason::EmulationFull => "netem_full",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// The device's own counters (per-peer ones live on the peer).
#[derive(Default)]
pub(crate) struct Counters {
    drops: [AtomicU64; DropReason::ALL.len()],
    /// When each drop reason was last logged (ns on the device clock + 1, 0 = never),
    /// so floods of drops log at a bounded rate.
    logged: [AtomicU64; DropReason::ALL.len()],
    pub(crate) cookie_replies: AtomicU64,
    pub(crate) unreachable_sent: AtomicU64,
}

impl Counters {
    pub(crate) fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.slot()].load(Ordering::Relaxed)
    }

    /// Counts a drop; returns the reason for the caller to hand on.
    pub(crate) fn count(&self, reason: DropReason) -> DropReason {
        self.drops[reason.slot()].fetch_add(1, Ordering::Relaxed);
        reason
    }

    /// Counts a drop the policy decided, and logs it unless this reason was logged
    /// within the last second.
    pub(crate) fn policy_drop(
        &self,
        reason: DropReason,
        packet: &PacketInfo,
        now_ns: u64,
    ) -> DropReason {
        let total = self.drops[reason.slot()].fetch_add(1, Ordering::Relaxed) + 1;
        let stamp = now_ns.saturating_add(1);
        let last = &self.logged[reason.slot()];
        let before = last.load(Ordering::Relaxed);
        if (before == 0 || stamp.saturating_sub(before) >= DROP_LOG_INTERVAL_NS)
            && last
                .compare_exchange(before, stamp, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(
                reason = reason.as_str(),
                src = %packet.src,
                dst = %packet.dst,
                total,
                "policy dropped a packet (logged at most once a second per reason)"
            );
        }
        reason
    }
}

impl Device {
    /// Count of drops for one reason, across all peers.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.counters.dropped(reason)
    }

    /// Device and per-peer counters in Prometheus text format; `now` and `wall` are
    /// the same moment on the monotonic and the wall clock (for handshake times).
    pub fn write_metrics(&self, now: Instant, wall: SystemTime, out: &mut String) {
        let peers = self.peers(now, wall);
        write_scalar(
            out,
            "sidecar_peers",
            "gauge",
            "Configured WireGuard peers.",
            peers.len() as u64,
        );
        let _ = writeln!(
            out,
            "# HELP sidecar_dropped_total Packets and datagrams dropped, by reason."
        );
        let _ = writeln!(out, "# TYPE sidecar_dropped_total counter");
        for reason in DropReason::ALL {
            let _ = writeln!(
                out,
                "sidecar_dropped_total{{reason=\"{}\"}} {}",
                reason.as_str(),
                self.dropped(reason)
            );
        }
        write_scalar(
            out,
            "sidecar_cookie_replies_total",
            "counter",
            "Cookie replies sent to handshakes under load.",
            self.counters.cookie_replies.load(Ordering::Relaxed),
        );
        write_scalar(
            out,
            "sidecar_unreachable_sent_total",
            "counter",
            "Destination unreachable errors sent for unallocated addresses.",
            self.counters.unreachable_sent.load(Ordering::Relaxed),
        );
        type PeerMetric = (
            &'static str,
            &'static str,
            &'static str,
            fn(&PeerInfo) -> u64,
        );
        let per_peer: [PeerMetric; 3] = [
            (
                "sidecar_peer_rx_bytes_total",
                "counter",
                "WireGuard bytes received from the peer.",
                |p| p.rx_bytes,
            ),
            (
                "sidecar_peer_tx_bytes_total",
                "counter",
                "WireGuard bytes sent to the peer.",
                |p| p.tx_bytes,
            ),
            (
                "sidecar_peer_last_handshake_seconds",
                "gauge",
                "Unix time of the latest handshake (0 = never).",
                |p| {
                    p.last_handshake
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_secs())
                },
            ),
        ];
        for (name, kind, help, value) in per_peer {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for p in &peers {
                let _ = writeln!(
                    out,
                    "{name}{{peer=\"{}\"}} {}",
                    p.config.public_key,
                    value(p)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP sidecar_peer_rx_dropped_total Decrypted packets from the peer dropped, by reason."
        );
        let _ = writeln!(out, "# TYPE sidecar_peer_rx_dropped_total counter");
        for p in &peers {
            let _ = writeln!(
                out,
                "sidecar_peer_rx_dropped_total{{peer=\"{}\",reason=\"source\"}} {}",
                p.config.public_key, p.rx_dropped_source
            );
        }
    }
}

/// One metric without labels, with its HELP and TYPE lines.
fn write_scalar(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}
