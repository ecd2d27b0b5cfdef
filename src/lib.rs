//! Sidecar's engine: userspace WireGuard with many peers behind one UDP socket,
//! cryptokey routing, and batched TUN/UDP data paths.
//!
//! The protocol state lives in sans-IO types ([`wg`]) that take bytes in and give
//! bytes and actions out; thin tokio drivers own sockets and devices.

pub mod driver;
pub mod endpoint;
pub mod icmp;
pub mod key;
pub mod neighbor_reply;
pub mod netem;
pub mod netstack;
pub mod prefix;
pub mod route;
pub mod shape;
pub mod tun;
pub mod uapi;
pub mod udp;
pub mod wg;
pub mod wgquick;

pub use endpoint::Endpoint;
pub use key::Key;
pub use prefix::IpPrefix;
