//! The device's configuration and state as seen from outside: what a control
//! surface (the userspace API socket, a config file) reads and changes.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use crate::key::Key;
use crate::prefix::IpPrefix;

/// Which implementation of the Noise protocol a device runs: every peer of the
/// device uses the same one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NoiseBackend {
    /// Our own sans-IO implementation ([`crate::wg::noise`]).
    #[default]
    Sidecar,
    /// boringtun's `Tunn`.
    Boringtun,
}

impl std::str::FromStr for NoiseBackend {
    type Err = UpdateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "sidecar" | "" => Ok(NoiseBackend::Sidecar),
            "boringtun" => Ok(NoiseBackend::Boringtun),
            other => Err(UpdateError::Invalid(format!(
                "noise backend {other:?} (expected sidecar or boringtun)"
            ))),
        }
    }
}

/// How a device is made.
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig {
    pub private_key: Option<Key>,
    pub noise_backend: NoiseBackend,
    /// One moment on the wall clock and on the monotonic clock, read once by the
    /// caller: handshake timestamps (TAI64N) count on from it with the `now` the
    /// device is fed, so they keep growing across restarts.
    pub wall: SystemTime,
    pub anchor: Instant,
}

impl DeviceConfig {
    /// Our backend, `private_key`, and the clocks as read now (at the caller's edge).
    pub fn new(private_key: Key) -> DeviceConfig {
        DeviceConfig {
            private_key: Some(private_key),
            noise_backend: NoiseBackend::default(),
            wall: SystemTime::now(),
            anchor: Instant::now(),
        }
    }
}

/// A peer's complete configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; `None` means off.
    pub persistent_keepalive: Option<u16>,
    pub allowed_ips: Vec<IpPrefix>,
}

impl PeerConfig {
    pub fn new(public_key: Key) -> PeerConfig {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: Vec::new(),
        }
    }
}

/// One peer's part of a change, with the semantics of the WireGuard userspace API:
/// only the fields that are set are changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerUpdate {
    pub public_key: Key,
    /// Remove this peer.
    pub remove: bool,
    /// Change the peer only if it exists; never create it.
    pub update_only: bool,
    /// `Some(zero key)` clears the preshared key.
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)` turns persistent keepalive off.
    pub persistent_keepalive: Option<u16>,
    /// Drop the existing allowed IPs before adding `allowed_ips`.
    pub replace_allowed_ips: bool,
    /// Allowed IPs to add.
    pub allowed_ips: Vec<IpPrefix>,
}

impl PeerUpdate {
    pub fn new(public_key: Key) -> PeerUpdate {
        PeerUpdate {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }

    /// The update that makes a peer exactly `config`.
    pub fn replace_with(config: &PeerConfig) -> PeerUpdate {
        PeerUpdate {
            public_key: config.public_key,
            remove: false,
            update_only: false,
            preshared_key: Some(config.preshared_key.unwrap_or(Key([0; 32]))),
            endpoint: config.endpoint,
            persistent_keepalive: Some(config.persistent_keepalive.unwrap_or(0)),
            replace_allowed_ips: true,
            allowed_ips: config.allowed_ips.clone(),
        }
    }
}

/// A change to the device, applied as one unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceUpdate {
    /// `Some(zero key)` removes the private key.
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    /// Remove all peers before applying `peers`.
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

/// A peer's configuration and live state.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerInfo {
    pub config: PeerConfig,
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from and sent to this peer on the wire (WireGuard datagrams).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Decrypted packets dropped because their source address is not one of the peer's allowed IPs.
    pub rx_dropped_source: u64,
}

/// The device's configuration and live state.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerInfo>,
}

/// Why a change was refused; each maps onto the errno the userspace API reports.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpdateError {
    #[error("invalid value: {0}")]
    Invalid(String),
    #[error("could not bind listen port {port}: {reason}")]
    Port { port: u16, reason: String },
}

impl UpdateError {
    /// The errno reported by the userspace API, following wireguard-go.
    pub fn errno(&self) -> i32 {
        match self {
            UpdateError::Invalid(_) => libc::EINVAL,
            UpdateError::Port { .. } => libc::EADDRINUSE,
        }
    }
}

/// What a control surface needs from a running device.
pub trait DeviceControl: Send + Sync {
    fn info(&self) -> DeviceInfo;
    fn update(&self, update: DeviceUpdate) -> Result<(), UpdateError>;
    /// Counters in Prometheus text exposition format.
    fn metrics(&self) -> String;
}
