//! The WireGuard peer table and its protocol state.

pub mod config;

pub use config::{
    DeviceControl, DeviceInfo, DeviceUpdate, PeerConfig, PeerInfo, PeerUpdate, UpdateError,
};
