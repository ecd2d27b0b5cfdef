//! The WireGuard peer table and its protocol state.

mod allowed_ips;
pub mod config;
mod device;
pub mod noise;
mod peer;
pub mod policy;

pub use allowed_ips::AllowedIps;
pub use config::{
    DeviceControl, DeviceInfo, DeviceUpdate, PeerConfig, PeerInfo, PeerUpdate, UpdateError,
};
pub use device::{Action, Device, DropReason, Released, DATA_OVERHEAD, MIN_OUT_BUF};
pub use peer::{Peer, PeerRef};
pub use policy::{PacketInfo, Policy, Verdict};

#[cfg(test)]
mod tests;
