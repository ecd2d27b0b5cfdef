//! The Docker labels a container opts in with.

use std::collections::HashMap;

use sidecar::netem::Conditions;
use sidecar::netstack::ProxyProtocol;

use crate::conditions;
use crate::container_net::Egress;

pub const ENABLE: &str = "sidecar.enable";
pub const IPV4: &str = "sidecar.ipv4";
pub const RELAY: &str = "sidecar.relay";
pub const BANDWIDTH: &str = "sidecar.bandwidth";
pub const PROXY_PROTOCOL: &str = "sidecar.proxy_protocol";
pub const EGRESS: &str = "sidecar.egress";
pub const LATENCY: &str = "sidecar.latency";
pub const JITTER: &str = "sidecar.jitter";
pub const LOSS: &str = "sidecar.loss";
pub const API: &str = "sidecar.api";

/// Highest per-container rate a label may ask for, in Mbit/s.
const MAX_BANDWIDTH_MBPS: u32 = 100_000;

/// What a container asked for.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Labels {
    pub enable: bool,
    pub ipv4: bool,
    /// The relay this container must use (its URL or host), if pinned.
    pub relay: Option<String>,
    /// Per-direction cap in Mbit/s of the container's own IP packets (the inner,
    /// decrypted bytes, which is what a user's iperf3 measures), not of the larger
    /// WireGuard datagrams that carry them.
    pub bandwidth_mbps: Option<u32>,
    /// In netstack mode, start each forwarded TCP connection with this PROXY
    /// protocol header (`v1` or `v2`; `off` or absent for none).
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Where the container's own outgoing IPv4 leaves when it has a public /32.
    pub egress: Egress,
    /// Emulated latency and jitter (each direction) and loss; `None` when the
    /// labels ask for none.
    pub conditions: Option<Conditions>,
    /// Serve the container's own endpoint inside it (`crate::container_api`).
    pub api: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("label {label}={value:?}: {reason}")]
pub struct LabelError {
    pub label: &'static str,
    pub value: String,
    pub reason: String,
}

fn boolean(label: &'static str, value: &str) -> Result<bool, LabelError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" | "" => Ok(false),
        _ => Err(LabelError {
            label,
            value: value.to_string(),
            reason: "expected true or false".into(),
        }),
    }
}

impl Labels {
    /// Reads the `sidecar.*` labels; other labels are ignored. A bad value is an
    /// error naming the label, never a silent default.
    pub fn parse(labels: &HashMap<String, String>) -> Result<Labels, LabelError> {
        let mut out = Labels::default();
        if let Some(v) = labels.get(ENABLE) {
            out.enable = boolean(ENABLE, v)?;
        }
        if let Some(v) = labels.get(IPV4) {
            out.ipv4 = boolean(IPV4, v)?;
        }
        if let Some(v) = labels.get(API) {
            out.api = boolean(API, v)?;
        }
        if let Some(v) = labels.get(RELAY) {
            let v = v.trim();
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(LabelError {
                    label: RELAY,
                    value: v.to_string(),
                    reason: "expected a relay URL such as https://relay.example:8443".into(),
                });
            }
            out.relay = Some(v.trim_end_matches('/').to_string());
        }
        if let Some(v) = labels.get(BANDWIDTH) {
            let mbps: u32 = v.trim().parse().map_err(|_| LabelError {
                label: BANDWIDTH,
                value: v.to_string(),
                reason: "expected a whole number of Mbit/s".into(),
            })?;
            if mbps == 0 || mbps > MAX_BANDWIDTH_MBPS {
                return Err(LabelError {
                    label: BANDWIDTH,
                    value: v.to_string(),
                    reason: format!("expected 1..={MAX_BANDWIDTH_MBPS} Mbit/s"),
                });
            }
            out.bandwidth_mbps = Some(mbps);
        }
        if let Some(v) = labels.get(PROXY_PROTOCOL) {
            let v = v.trim().to_ascii_lowercase();
            out.proxy_protocol = match v.as_str() {
                "off" | "none" | "" => None,
                _ => Some(v.parse().map_err(|reason| LabelError {
                    label: PROXY_PROTOCOL,
                    value: v.clone(),
                    reason,
                })?),
            };
        }
        if let Some(v) = labels.get(EGRESS) {
            out.egress = match v.trim().to_ascii_lowercase().as_str() {
                "tunnel" | "" => Egress::Tunnel,
                "docker" => Egress::Docker,
                _ => {
                    return Err(LabelError {
                        label: EGRESS,
                        value: v.to_string(),
                        reason: "expected tunnel (the default) or docker".into(),
                    })
                }
            };
        }
        let read = |label: &'static str, parse: fn(&str) -> Result<_, String>| {
            labels
                .get(label)
                .map(|v| {
                    parse(v).map_err(|reason| LabelError {
                        label,
                        value: v.to_string(),
                        reason,
                    })
                })
                .transpose()
        };
        let latency = read(LATENCY, conditions::parse_delay)?;
        let jitter = read(JITTER, conditions::parse_delay)?;
        let loss = labels
            .get(LOSS)
            .map(|v| {
                conditions::parse_loss(v).map_err(|reason| LabelError {
                    label: LOSS,
                    value: v.to_string(),
                    reason,
                })
            })
            .transpose()?;
        out.conditions = conditions::build(latency, jitter, loss).map_err(|reason| LabelError {
            label: LATENCY,
            value: labels.get(LATENCY).cloned().unwrap_or_default(),
            reason,
        })?;
        Ok(out)
    }

    /// Whether `relay` (this agent's relay URL) is the one the container asked for.
    pub fn accepts_relay(&self, relay: &str) -> bool {
        match &self.relay {
            None => true,
            Some(want) => {
                let want = want.strip_prefix("https://").unwrap_or(want);
                let have = relay
                    .strip_prefix("https://")
                    .unwrap_or(relay)
                    .trim_end_matches('/');
                have == want || have.rsplit_once(':').is_some_and(|(host, _)| host == want)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_all_labels() {
        let l = Labels::parse(&map(&[
            ("sidecar.enable", "true"),
            ("sidecar.ipv4", "TRUE"),
            ("sidecar.relay", "https://relay.example:8443/"),
            ("sidecar.bandwidth", "50"),
            ("sidecar.proxy_protocol", "V2"),
            ("sidecar.egress", "Docker"),
            ("sidecar.latency", "50ms"),
            ("sidecar.jitter", "10ms"),
            ("sidecar.loss", "1%"),
            ("sidecar.api", "true"),
            ("com.example.other", "x"),
        ]))
        .unwrap();
        assert_eq!(
            l,
            Labels {
                enable: true,
                ipv4: true,
                relay: Some("https://relay.example:8443".into()),
                bandwidth_mbps: Some(50),
                proxy_protocol: Some(ProxyProtocol::V2),
                egress: Egress::Docker,
                conditions: Some(
                    Conditions::new(
                        std::time::Duration::from_millis(50),
                        std::time::Duration::from_millis(10),
                        sidecar::netem::Spread::Uniform,
                        0.01,
                    )
                    .unwrap()
                ),
                api: true,
            }
        );
        assert!(l.accepts_relay("https://relay.example:8443"));
        assert!(!l.accepts_relay("https://other.example:8443"));
        let by_host = Labels {
            relay: Some("relay.example".into()),
            ..Labels::default()
        };
        assert!(by_host.accepts_relay("https://relay.example:8443"));
    }

    #[test]
    fn bad_values_name_the_label() {
        let e = Labels::parse(&map(&[("sidecar.enable", "maybe")])).unwrap_err();
        assert_eq!(e.label, "sidecar.enable");
        assert!(e.to_string().contains("expected true or false"));
        for bad in ["fast", "0", "-3", "1000000"] {
            let e = Labels::parse(&map(&[("sidecar.bandwidth", bad)])).unwrap_err();
            assert_eq!(e.label, "sidecar.bandwidth", "{bad}");
        }
        assert!(Labels::parse(&map(&[("sidecar.relay", "two words")])).is_err());
        let e = Labels::parse(&map(&[("sidecar.proxy_protocol", "v3")])).unwrap_err();
        assert_eq!(e.label, "sidecar.proxy_protocol");
        assert!(e.to_string().contains("v1 or v2"), "{e}");
        let e = Labels::parse(&map(&[("sidecar.egress", "nat")])).unwrap_err();
        assert_eq!(e.label, "sidecar.egress");
        let off = Labels::parse(&map(&[("sidecar.proxy_protocol", "off")])).unwrap();
        assert_eq!(off.proxy_protocol, None);
        assert!(!Labels::parse(&map(&[])).unwrap().enable);
        for (label, bad) in [
            ("sidecar.latency", "50"),
            ("sidecar.latency", "fast"),
            ("sidecar.latency", "11s"),
            ("sidecar.jitter", "-1ms"),
            ("sidecar.loss", "1"),
            ("sidecar.loss", "150%"),
        ] {
            let e = Labels::parse(&map(&[(label, bad)])).unwrap_err();
            assert_eq!(e.label, label, "{bad}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        let zero = Labels::parse(&map(&[("sidecar.latency", "0ms"), ("sidecar.loss", "0%")]));
        assert_eq!(zero.unwrap().conditions, None, "zero conditions are none");
    }
}
