//! `relay.toml`: what the relay serves and where it keeps its state.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sidecar::{Endpoint, IpPrefix};

/// How a prefix reaches the relay from its upstream router.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixMode {
    /// The prefix is on the uplink's link: the router asks for each address with
    /// Neighbor Solicitations (IPv6) or ARP (IPv4), and the relay answers them.
    OnLink,
    /// The router sends the whole prefix to the relay: no neighbor answers needed.
    Routed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Keys, certificate and the peer store live here.
    pub data_dir: PathBuf,
    pub wireguard: WireguardSection,
    pub network: NetworkSection,
    pub api: ApiSection,
    /// Bounds on what one caller of the API may cost; every field has a default.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Post-quantum preshared keys. A file without this section (a relay from
    /// before it existed) does not require them, so its agents keep working.
    #[serde(default)]
    pub pq: PqSection,
    /// Prometheus `/metrics`, on its own plain-HTTP address (loopback by default).
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Device login (RFC 8628): timing, bounds and what an approved token gets.
    #[serde(default)]
    pub device_login: DeviceLoginSection,
}

/// `[device_login]`: clients ask for a token at `/v1/device/authorize` and an
/// operator approves it; what is not set at approval comes from here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceLoginSection {
    /// false: the device routes answer 404.
    pub enabled: bool,
    /// Seconds a login may wait for the operator.
    pub expires_in_secs: u64,
    /// Seconds clients wait between polls.
    pub interval_secs: u64,
    /// Logins waiting at once, in total and from one source address (an IPv6 /64).
    pub max_pending: u32,
    pub max_pending_per_source: u32,
    /// The approved token's limits unless the approval sets them.
    pub max_peers: u32,
    pub max_ipv4: u32,
    /// Per-peer Mbit/s; 0: unlimited.
    pub bandwidth_mbps: u32,
    pub isolate_peers: bool,
    pub bind_machine: bool,
}

impl Default for DeviceLoginSection {
    fn default() -> DeviceLoginSection {
        let timing = crate::device::DeviceSettings::default();
        DeviceLoginSection {
            enabled: true,
            expires_in_secs: timing.expires_in.as_secs(),
            interval_secs: timing.interval.as_secs(),
            max_pending: timing.max_pending as u32,
            max_pending_per_source: timing.max_pending_per_source as u32,
            max_peers: 10,
            max_ipv4: 0,
            bandwidth_mbps: 0,
            isolate_peers: false,
            bind_machine: true,
        }
    }
}

impl DeviceLoginSection {
    pub fn settings(&self) -> crate::device::DeviceSettings {
        crate::device::DeviceSettings {
            expires_in: std::time::Duration::from_secs(self.expires_in_secs),
            interval: std::time::Duration::from_secs(self.interval_secs),
            max_pending: self.max_pending as usize,
            max_pending_per_source: self.max_pending_per_source as usize,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("expires_in_secs", self.expires_in_secs),
            ("interval_secs", self.interval_secs),
            ("max_pending", u64::from(self.max_pending)),
            (
                "max_pending_per_source",
                u64::from(self.max_pending_per_source),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "device_login.{name} must be at least 1"
                )));
            }
        }
        // A login is meant to be approved while someone waits for it; a bound also
        // keeps expiry times far from the clock's limits.
        if self.expires_in_secs > 86_400 {
            return Err(ConfigError::Invalid(format!(
                "device_login.expires_in_secs {} is over a day (86400)",
                self.expires_in_secs
            )));
        }
        if self.interval_secs >= self.expires_in_secs {
            return Err(ConfigError::Invalid(format!(
                "device_login.interval_secs {} must be shorter than expires_in_secs {}",
                self.interval_secs, self.expires_in_secs
            )));
        }
        Ok(())
    }

    fn write_commented(&self, s: &mut String) {
        s.push_str("[device_login]\n");
        s.push_str(
            "# `sidecar-agent login` (RFC 8628): a client asks for a token, an admin approves\n",
        );
        s.push_str(
            "# it (POST /v1/admin/device/CODE/approve). false: the device routes answer 404.\n",
        );
        s.push_str(&format!("enabled = {}\n", self.enabled));
        s.push_str("# Seconds a login waits for approval, and between the client's polls.\n");
        s.push_str(&format!("expires_in_secs = {}\n", self.expires_in_secs));
        s.push_str(&format!("interval_secs = {}\n", self.interval_secs));
        s.push_str(
            "# Logins waiting at once, in total (503 beyond) and per source address (429).\n",
        );
        s.push_str(&format!("max_pending = {}\n", self.max_pending));
        s.push_str(&format!(
            "max_pending_per_source = {}\n",
            self.max_pending_per_source
        ));
        s.push_str(
            "# An approved token's limits, unless the approval sets them (bandwidth 0: none).\n",
        );
        s.push_str(&format!("max_peers = {}\n", self.max_peers));
        s.push_str(&format!("max_ipv4 = {}\n", self.max_ipv4));
        s.push_str(&format!("bandwidth_mbps = {}\n", self.bandwidth_mbps));
        s.push_str(&format!("isolate_peers = {}\n", self.isolate_peers));
        s.push_str("# Bind the token to the machine of its first registration.\n");
        s.push_str(&format!("bind_machine = {}\n", self.bind_machine));
    }
}

/// `[metrics]`: where Prometheus text is served. Plain HTTP without authentication,
/// so loopback by default: the families name token ids. Never the API's port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// false serves no `/metrics` at all.
    pub enabled: bool,
    pub listen: SocketAddr,
}

/// The default metrics address: loopback, next to the agent's 9531.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9532";

impl Default for MetricsSection {
    fn default() -> MetricsSection {
        MetricsSection {
            enabled: true,
            listen: DEFAULT_METRICS_LISTEN
                .parse()
                .expect("the default metrics address parses"),
        }
    }
}

impl MetricsSection {
    /// The address to serve on, or `None` when turned off.
    pub fn listen(&self) -> Option<SocketAddr> {
        self.enabled.then_some(self.listen)
    }

    fn write_commented(&self, s: &mut String) {
        s.push_str("[metrics]\n");
        s.push_str("# Prometheus /metrics over plain HTTP, without authentication: keep it on\n");
        s.push_str("# loopback or a private network. false serves none.\n");
        s.push_str(&format!("enabled = {}\n", self.enabled));
        s.push_str(&format!("listen = \"{}\"\n", self.listen));
    }
}

/// `[pq]`: post-quantum preshared keys from an X-Wing encapsulation per peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PqSection {
    /// Refuse peers that register without an X-Wing ciphertext. `init` and the
    /// embedded defaults write true.
    pub require_pq: bool,
    /// Seconds between the re-encapsulations peers are asked for.
    pub rotate_secs: u64,
}

impl Default for PqSection {
    fn default() -> PqSection {
        PqSection {
            require_pq: false,
            rotate_secs: crate::pq::DEFAULT_ROTATE.as_secs(),
        }
    }
}

impl PqSection {
    /// What a new relay gets: post-quantum keys required.
    pub fn for_new_relay() -> PqSection {
        PqSection {
            require_pq: true,
            ..PqSection::default()
        }
    }

    pub fn rotate(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.rotate_secs)
    }

    fn write_commented(&self, s: &mut String) {
        s.push_str("[pq]\n");
        s.push_str("# Refuse peers that register without a post-quantum (X-Wing) preshared key.\n");
        s.push_str("# Plain WireGuard clients get one with `sidecar-agent psk`.\n");
        s.push_str(&format!("require_pq = {}\n", self.require_pq));
        s.push_str(
            "# Seconds between the new encapsulations (new preshared keys) peers are asked for.\n",
        );
        s.push_str(&format!("rotate_secs = {}\n", self.rotate_secs));
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireguardSection {
    #[serde(default = "default_listen_port")]
    pub listen_port: u16,
    /// `host:port` that agents send WireGuard to (what the API hands out).
    pub endpoint: Endpoint,
    #[serde(default = "default_interface")]
    pub interface: String,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Persistent keepalive the API tells agents to use (seconds); it keeps their NAT open.
    #[serde(default = "default_keepalive")]
    pub keepalive: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Peers get /128s from here.
    pub ipv6_prefix: IpPrefix,
    pub ipv6_mode: PrefixMode,
    /// Optional pool of IPv4 /32s for peers that ask and whose token allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_pool: Option<IpPrefix>,
    #[serde(default = "default_ipv4_mode")]
    pub ipv4_mode: PrefixMode,
    /// The interface towards the upstream router; needed for on-link prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// Addresses inside the prefix or pool that are never handed out (the router's,
    /// the relay's own).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reserved: Vec<IpAddr>,
    /// Hours a deleted peer's addresses stay reserved for its key before they are
    /// reclaimed and may go to others. 0 reclaims them at the next sweep.
    #[serde(default = "default_address_hold_hours")]
    pub address_hold_hours: u64,
    /// Seconds without a completed handshake after which a peer is expired: off the
    /// data plane and out of its token's quota, its addresses held as for a delete.
    /// 0 (the default) never expires peers.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub peer_ttl_secs: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl NetworkSection {
    /// How long a peer may go without a handshake before it is expired; `None`: never.
    pub fn peer_ttl(&self) -> Option<std::time::Duration> {
        (self.peer_ttl_secs > 0).then(|| std::time::Duration::from_secs(self.peer_ttl_secs))
    }

    pub fn address_hold(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.address_hold_hours.saturating_mul(3600))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
}

/// `[limits]`: request rates, connections and requests in flight for the API.
///
/// The defaults let one host start 100 containers at once (one token, one address,
/// a connection per request) without a single 429.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Requests a second one token may make, sustained.
    pub token_rate: u32,
    /// Requests one token may make at once before `token_rate` applies.
    pub token_burst: u32,
    /// Requests a second from one source (an IPv4 address or an IPv6 /64), sustained;
    /// checked before any token is looked up.
    pub source_rate: u32,
    pub source_burst: u32,
    /// TCP connections open at once, in total and from one source.
    pub max_connections: u32,
    pub max_connections_per_source: u32,
    /// Requests being handled at once; more wait briefly, then get a 503.
    pub max_requests_in_flight: u32,
}

impl Default for LimitsSection {
    fn default() -> LimitsSection {
        LimitsSection {
            token_rate: 100,
            token_burst: 500,
            source_rate: 200,
            source_burst: 1000,
            max_connections: 1024,
            max_connections_per_source: 256,
            max_requests_in_flight: 256,
        }
    }
}

impl LimitsSection {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("token_rate", self.token_rate),
            ("token_burst", self.token_burst),
            ("source_rate", self.source_rate),
            ("source_burst", self.source_burst),
            ("max_connections", self.max_connections),
            (
                "max_connections_per_source",
                self.max_connections_per_source,
            ),
            ("max_requests_in_flight", self.max_requests_in_flight),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be at least 1"
                )));
            }
        }
        if self.max_connections_per_source > self.max_connections {
            return Err(ConfigError::Invalid(format!(
                "limits.max_connections_per_source {} exceeds limits.max_connections {}",
                self.max_connections_per_source, self.max_connections
            )));
        }
        Ok(())
    }

    fn write_commented(&self, s: &mut String) {
        s.push_str("[limits]\n");
        s.push_str(
            "# API requests a second per token (sustained), and how many may come at once.\n",
        );
        s.push_str(&format!("token_rate = {}\n", self.token_rate));
        s.push_str(&format!("token_burst = {}\n", self.token_burst));
        s.push_str("# The same per source address (an IPv6 /64 counts as one), checked before the token.\n");
        s.push_str("# Over either limit the API answers 429 with Retry-After.\n");
        s.push_str(&format!("source_rate = {}\n", self.source_rate));
        s.push_str(&format!("source_burst = {}\n", self.source_burst));
        s.push_str(
            "# Open API connections, in total and per source; excess ones are closed before TLS.\n",
        );
        s.push_str(&format!("max_connections = {}\n", self.max_connections));
        s.push_str(&format!(
            "max_connections_per_source = {}\n",
            self.max_connections_per_source
        ));
        s.push_str("# Requests handled at once; more wait up to 2 s, then get 503.\n");
        s.push_str(&format!(
            "max_requests_in_flight = {}\n",
            self.max_requests_in_flight
        ));
    }
}

fn default_listen_port() -> u16 {
    51820
}
fn default_interface() -> String {
    "sidecar0".to_string()
}
fn default_mtu() -> u16 {
    1420
}
fn default_keepalive() -> u16 {
    25
}
/// Seven days: a peer deleted by mistake, or whose host is rebuilt, gets its
/// addresses back within a week.
pub fn default_address_hold_hours() -> u64 {
    7 * 24
}
fn default_ipv4_mode() -> PrefixMode {
    PrefixMode::Routed
}
fn default_api_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 8443)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl RelayConfig {
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: RelayConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types cannot: families, sizes, names.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.network;
        if n.ipv6_prefix.is_ipv4() {
            return Err(ConfigError::Invalid(format!(
                "network.ipv6_prefix {} is not an IPv6 prefix",
                n.ipv6_prefix
            )));
        }
        if n.ipv6_prefix.len() > 120 {
            return Err(ConfigError::Invalid(format!(
                "network.ipv6_prefix {} is too small: use a /120 or larger (a /64 is usual)",
                n.ipv6_prefix
            )));
        }
        if let Some(pool) = n.ipv4_pool {
            if !pool.is_ipv4() {
                return Err(ConfigError::Invalid(format!(
                    "network.ipv4_pool {pool} is not an IPv4 prefix"
                )));
            }
        }
        let on_link = n.ipv6_mode == PrefixMode::OnLink
            || (n.ipv4_pool.is_some() && n.ipv4_mode == PrefixMode::OnLink);
        if on_link && n.uplink.is_none() {
            return Err(ConfigError::Invalid(
                "network.uplink is required for an on-link prefix (the relay answers neighbor solicitations there)".into(),
            ));
        }
        sidecar::uapi::validate_interface_name(&self.wireguard.interface)
            .map_err(|e| ConfigError::Invalid(format!("wireguard.interface: {e}")))?;
        if !(1280..=9000).contains(&self.wireguard.mtu) {
            return Err(ConfigError::Invalid(format!(
                "wireguard.mtu {} is outside 1280..=9000 (IPv6 needs at least 1280)",
                self.wireguard.mtu
            )));
        }
        self.limits.validate()?;
        self.device_login.validate()?;
        if self.metrics.enabled && self.metrics.listen == self.api.listen {
            return Err(ConfigError::Invalid(format!(
                "metrics.listen {} is the API's address: give /metrics its own port",
                self.metrics.listen
            )));
        }
        if self.pq.rotate_secs == 0 {
            return Err(ConfigError::Invalid(
                "pq.rotate_secs must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The file `init` writes: every setting with a comment saying what it does.
    pub fn to_commented_toml(&self) -> String {
        let n = &self.network;
        let mode = |m: PrefixMode| match m {
            PrefixMode::OnLink => "on-link",
            PrefixMode::Routed => "routed",
        };
        let mut s = String::new();
        s.push_str(
            "# Sidecar relay configuration. `sidecar-relay run --config THIS_FILE` uses it.\n\n",
        );
        s.push_str("# Keys, TLS certificate and the peer store live here.\n");
        s.push_str(&format!(
            "data_dir = {:?}\n\n",
            self.data_dir.display().to_string()
        ));
        s.push_str("[wireguard]\n");
        s.push_str("# UDP port for WireGuard.\n");
        s.push_str(&format!("listen_port = {}\n", self.wireguard.listen_port));
        s.push_str("# host:port agents send WireGuard to: this relay's public address.\n");
        s.push_str(&format!("endpoint = \"{}\"\n", self.wireguard.endpoint));
        s.push_str("# The TUN interface the relay forwards through.\n");
        s.push_str(&format!("interface = {:?}\n", self.wireguard.interface));
        s.push_str("# Inner MTU handed to agents.\n");
        s.push_str(&format!("mtu = {}\n", self.wireguard.mtu));
        s.push_str("# Persistent keepalive (seconds) agents are told to use; keeps their NAT mapping open.\n");
        s.push_str(&format!("keepalive = {}\n\n", self.wireguard.keepalive));
        s.push_str("[network]\n");
        s.push_str("# Each peer gets one /128 from this prefix.\n");
        s.push_str(&format!("ipv6_prefix = \"{}\"\n", n.ipv6_prefix));
        s.push_str(
            "# on-link: the prefix is on the uplink's link and the relay answers the router's\n",
        );
        s.push_str(
            "#          Neighbor Solicitations itself. routed: the router routes it to us.\n",
        );
        s.push_str(&format!("ipv6_mode = \"{}\"\n", mode(n.ipv6_mode)));
        s.push_str("# Optional IPv4 /32s for peers that ask (and whose token allows it).\n");
        match n.ipv4_pool {
            Some(p) => s.push_str(&format!("ipv4_pool = \"{p}\"\n")),
            None => s.push_str("# ipv4_pool = \"203.0.113.16/28\"\n"),
        }
        s.push_str("# on-link: the relay answers ARP for pool addresses. routed: the router routes the pool to us.\n");
        s.push_str(&format!("ipv4_mode = \"{}\"\n", mode(n.ipv4_mode)));
        s.push_str("# Interface towards the upstream router (needed for on-link prefixes).\n");
        match &n.uplink {
            Some(u) => s.push_str(&format!("uplink = {u:?}\n")),
            None => s.push_str("# uplink = \"eth0\"\n"),
        }
        s.push_str("# Addresses never handed out (the router's, the relay's own).\n");
        let reserved: Vec<String> = n.reserved.iter().map(|a| format!("\"{a}\"")).collect();
        s.push_str(&format!("reserved = [{}]\n", reserved.join(", ")));
        s.push_str("# Hours a deleted peer's addresses stay reserved for its key (it gets them\n");
        s.push_str("# back if it registers again); then they are reclaimed for others.\n");
        s.push_str(&format!("address_hold_hours = {}\n", n.address_hold_hours));
        s.push_str("# Seconds without a handshake after which a peer is expired (its agent\n");
        s.push_str(
            "# registers again and gets the same addresses within the hold time); 0: never.\n",
        );
        s.push_str(&format!("peer_ttl_secs = {}\n\n", n.peer_ttl_secs));
        s.push_str("[api]\n");
        s.push_str("# HTTPS control API (TLS 1.3 only).\n");
        s.push_str(&format!("listen = \"{}\"\n\n", self.api.listen));
        self.limits.write_commented(&mut s);
        s.push('\n');
        self.pq.write_commented(&mut s);
        s.push('\n');
        self.metrics.write_commented(&mut s);
        s.push('\n');
        self.device_login.write_commented(&mut s);
        s
    }

    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }
    pub fn wireguard_key_path(&self) -> PathBuf {
        self.data_dir.join("wireguard.key")
    }
    pub fn tls_key_path(&self) -> PathBuf {
        self.data_dir.join("tls.key")
    }
    pub fn tls_cert_path(&self) -> PathBuf {
        self.data_dir.join("tls.crt")
    }
    /// The relay's X-Wing secret (the seed of its key pair).
    pub fn xwing_key_path(&self) -> PathBuf {
        self.data_dir.join("xwing.key")
    }
    /// The secret behind every token's machine key.
    pub fn machine_key_path(&self) -> PathBuf {
        self.data_dir.join("machine.key")
    }
    /// The Ed25519 seed the warrant canary is signed with.
    pub fn canary_key_path(&self) -> PathBuf {
        self.data_dir.join("canary.key")
    }
    /// The current signed canary, as `GET /v1/canary` serves it.
    pub fn canary_path(&self) -> PathBuf {
        self.data_dir.join("canary.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RelayConfig {
        RelayConfig {
            data_dir: "/var/lib/sidecar-relay".into(),
            wireguard: WireguardSection {
                listen_port: 51820,
                endpoint: "relay.example.net:51820".parse().unwrap(),
                interface: "sidecar0".into(),
                mtu: 1420,
                keepalive: 25,
            },
            network: NetworkSection {
                ipv6_prefix: "2001:db8:1::/64".parse().unwrap(),
                ipv6_mode: PrefixMode::OnLink,
                ipv4_pool: Some("203.0.113.16/28".parse().unwrap()),
                ipv4_mode: PrefixMode::Routed,
                uplink: Some("eth0".into()),
                reserved: vec!["2001:db8:1::1".parse().unwrap()],
                address_hold_hours: 24,
                peer_ttl_secs: 0,
            },
            api: ApiSection {
                listen: "[::]:8443".parse().unwrap(),
            },
            limits: LimitsSection {
                token_rate: 7,
                ..LimitsSection::default()
            },
            pq: PqSection {
                require_pq: true,
                rotate_secs: 90,
            },
            metrics: MetricsSection::default(),
            device_login: DeviceLoginSection {
                max_peers: 3,
                ..DeviceLoginSection::default()
            },
        }
    }

    #[test]
    fn the_example_file_parses_with_the_default_device_login() {
        let example: RelayConfig =
            toml::from_str(include_str!("../../config/relay.toml.example")).unwrap();
        example.validate().unwrap();
        assert_eq!(example.device_login, DeviceLoginSection::default());
        let settings = example.device_login.settings();
        assert_eq!(settings, crate::device::DeviceSettings::default());
    }

    #[test]
    fn device_login_timing_is_checked() {
        let mut config = sample();
        config.device_login.interval_secs = 0;
        assert!(config.validate().is_err());
        config.device_login.interval_secs = 1800;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("interval_secs"), "{err}");
        config.device_login.interval_secs = 5;
        config.device_login.expires_in_secs = u64::MAX;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("expires_in_secs"), "{err}");
    }

    #[test]
    fn a_file_without_a_pq_section_does_not_require_pq() {
        let text = sample().to_commented_toml();
        let cut = text.find("[pq]").expect("init writes a [pq] section");
        let c: RelayConfig = toml::from_str(&text[..cut]).unwrap();
        assert_eq!(c.pq, PqSection::default());
        assert!(!c.pq.require_pq);
        assert_eq!(c.pq.rotate_secs, 3600);
        assert!(PqSection::for_new_relay().require_pq);
        let mut zero = sample();
        zero.pq.rotate_secs = 0;
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rotate_secs"));
    }

    #[test]
    fn commented_file_round_trips() {
        let c = sample();
        let text = c.to_commented_toml();
        let back: RelayConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        back.validate().unwrap();
    }

    #[test]
    fn address_hold_defaults_to_a_week() {
        let text = sample()
            .to_commented_toml()
            .replace("address_hold_hours = 24\n", "");
        let c: RelayConfig = toml::from_str(&text).unwrap();
        assert_eq!(c.network.address_hold_hours, 168);
        assert_eq!(
            c.network.address_hold(),
            std::time::Duration::from_secs(7 * 24 * 3600)
        );
    }

    #[test]
    fn rejects_bad_settings() {
        let mut c = sample();
        c.network.uplink = None;
        assert!(c.validate().unwrap_err().to_string().contains("uplink"));
        let mut c = sample();
        c.network.ipv6_prefix = "192.0.2.0/24".parse().unwrap();
        assert!(c.validate().is_err());
        let mut c = sample();
        c.wireguard.mtu = 1000;
        assert!(c.validate().is_err());
        let text = sample()
            .to_commented_toml()
            .replace("[api]", "[api]\nbogus = 1");
        assert!(toml::from_str::<RelayConfig>(&text).is_err());
    }

    #[test]
    fn endpoint_is_read_typed_and_bad_ones_are_refused_with_the_reason() {
        let text = sample().to_commented_toml();
        for (endpoint, expected) in [
            ("[2001:db8::1]:51820", "[2001:db8::1]:51820"),
            ("192.0.2.1:4500", "192.0.2.1:4500"),
        ] {
            let c: RelayConfig =
                toml::from_str(&text.replace("relay.example.net:51820", endpoint)).unwrap();
            assert_eq!(c.wireguard.endpoint.to_string(), expected);
        }
        for (bad, reason) in [
            ("2001:db8::1:51820", "brackets"),
            ("relay.example.net", "host:port"),
            ("relay.example.net:0", "port 0"),
        ] {
            let err = toml::from_str::<RelayConfig>(&text.replace("relay.example.net:51820", bad))
                .unwrap_err()
                .to_string();
            assert!(err.contains(reason), "{bad}: {err}");
            assert!(err.contains("endpoint"), "{bad}: {err}");
        }
    }

    #[test]
    fn limits_default_when_absent_and_are_validated() {
        let text = sample().to_commented_toml();
        let start = text.find("[limits]").unwrap();
        let back: RelayConfig = toml::from_str(&text[..start]).unwrap();
        assert_eq!(back.limits, LimitsSection::default());
        let mut c = sample();
        c.limits.source_burst = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("source_burst"));
        let mut c = sample();
        c.limits.max_connections_per_source = c.limits.max_connections + 1;
        assert!(c.validate().is_err());
        let bogus = text.replace("[limits]", "[limits]\nbogus = 1");
        assert!(toml::from_str::<RelayConfig>(&bogus).is_err());
    }
}
