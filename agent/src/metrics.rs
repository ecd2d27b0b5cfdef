//! The agent's Prometheus text: per container its state, mode, handshake age, bytes
//! and drops by reason, and the agent's own registrations, re-registrations and
//! errors.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use sidecar::wg::DropReason;

use crate::shared::{unix_now, Shared};

/// Drop reasons an agent's device can meet (the others are the relay's policy).
const DROPS: [DropReason; 12] = [
    DropReason::Malformed,
    DropReason::UnknownPeer,
    DropReason::Unauthenticated,
    DropReason::Replay,
    DropReason::SourceNotAllowed,
    DropReason::NoRoute,
    DropReason::NoEndpoint,
    DropReason::BufferTooSmall,
    DropReason::Protocol,
    DropReason::RateLimited,
    DropReason::EmulatedLoss,
    DropReason::EmulationFull,
];

const STATES: [&str; 3] = ["active", "error", "stopped"];

pub fn render(shared: &Shared) -> String {
    let mut out = String::new();
    let rows = shared.snapshot();
    let now = unix_now();
    let c = &shared.counters;
    for (name, help, value) in [
        (
            "sidecar_agent_registrations_total",
            "Registrations with the relay that succeeded, first ones and repeats.",
            c.registrations.load(Ordering::Relaxed),
        ),
        (
            "sidecar_agent_reregistrations_total",
            "Registrations made again because the relay no longer had them.",
            c.reregistrations.load(Ordering::Relaxed),
        ),
        (
            "sidecar_agent_errors_total",
            "Failed container setups, registration checks and deregistrations.",
            c.errors.load(Ordering::Relaxed),
        ),
    ] {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    header(
        &mut out,
        "sidecar_agent_containers",
        "gauge",
        "Labeled containers the agent knows, by state.",
    );
    for state in STATES {
        let n = rows.iter().filter(|(r, _)| r.state == state).count();
        let _ = writeln!(out, "sidecar_agent_containers{{state=\"{state}\"}} {n}");
    }

    header(
        &mut out,
        "sidecar_agent_container_info",
        "gauge",
        "One per container: its state and mode (always 1).",
    );
    for (r, _) in &rows {
        let _ = writeln!(
            out,
            "sidecar_agent_container_info{{{},state=\"{}\",mode=\"{}\"}} 1",
            ids(&r.container, &r.name),
            escape(&r.state),
            escape(r.mode.as_deref().unwrap_or("")),
        );
    }
    type Gauge = (&'static str, &'static str, &'static str);
    let per_container: [Gauge; 5] = [
        (
            "sidecar_agent_container_handshake_age_seconds",
            "gauge",
            "Seconds since the tunnel's latest handshake (absent: none yet).",
        ),
        (
            "sidecar_agent_container_rx_bytes_total",
            "counter",
            "Bytes received through the container's tunnel.",
        ),
        (
            "sidecar_agent_container_tx_bytes_total",
            "counter",
            "Bytes sent through the container's tunnel.",
        ),
        (
            "sidecar_agent_container_up",
            "gauge",
            "The relay saw a handshake within 180 s, at the last check (1 or 0).",
        ),
        (
            "sidecar_agent_container_externally_reachable",
            "gauge",
            "The relay reached the address through its data path, at the last check.",
        ),
    ];
    for (i, (name, kind, help)) in per_container.iter().enumerate() {
        header(&mut out, name, kind, help);
        for (r, _) in &rows {
            let value = match i {
                0 => r.latest_handshake.map(|t| now.saturating_sub(t)),
                1 => Some(r.rx_bytes),
                2 => Some(r.tx_bytes),
                3 => r.up.map(u64::from),
                _ => r.externally_reachable.map(u64::from),
            };
            if let Some(v) = value {
                let _ = writeln!(out, "{name}{{{}}} {v}", ids(&r.container, &r.name));
            }
        }
    }
    header(
        &mut out,
        "sidecar_agent_container_dropped_total",
        "counter",
        "Packets and datagrams the container's tunnel dropped, by reason.",
    );
    for (r, live) in &rows {
        let Some((device, _)) = live else { continue };
        for reason in DROPS {
            let _ = writeln!(
                out,
                "sidecar_agent_container_dropped_total{{{},reason=\"{}\"}} {}",
                ids(&r.container, &r.name),
                reason.as_str(),
                device.dropped(reason)
            );
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn ids(container: &str, name: &str) -> String {
    format!(
        "container=\"{}\",name=\"{}\"",
        escape(crate::shared::short(container)),
        escape(name)
    )
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }
}
