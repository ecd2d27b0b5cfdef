//! Sidecar agent library: configuration parsing and helpers used by the `sidecar-agent` binary.

pub mod resolve;
pub mod wgquick;
