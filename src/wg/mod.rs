//! The WireGuard peer table and its protocol state, as a sans-IO state machine:
//! fed packets, datagrams and time, drained by polls (see [`Device`]).
//!
//! One concern per file: `device` (the table and its configuration), `send` and
//! `receive` (the two directions of the data path), `timers`, `outbox` (what the
//! polls drain), `shaping` (the device's shaping queues), `emulation` (its delay lines), `peer`, `allowed_ips`,
//! `metrics`, `clock` (time as fed), `states` (making and installing peers' noise
//! states), `session`, the seam to the noise protocols, and `noise`, our own.

mod allowed_ips;
mod clock;
pub mod config;
mod device;
mod emulation;
mod metrics;
pub mod noise;
mod outbox;
mod peer;
pub mod policy;
mod receive;
mod send;
mod session;
mod shaping;
mod states;
mod timers;

pub use allowed_ips::AllowedIps;
pub use clock::FedClock;
pub use config::{
    DeviceConfig, DeviceControl, DeviceInfo, DeviceUpdate, NoiseBackend, PeerConfig, PeerInfo,
    PeerUpdate, UpdateError,
};
pub use device::{Device, Output, Transmit, DATA_OVERHEAD, MIN_OUT_BUF};
pub use metrics::DropReason;
pub use peer::{Peer, PeerRef};
pub use policy::{PacketInfo, Policy, Verdict};

#[cfg(test)]
mod tests;
