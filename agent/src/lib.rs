//! Sidecar agent library: what the `sidecar-agent` binary is made of.

pub mod container_net;
pub mod daemon;
pub mod full_tunnel;
pub mod interface;
pub mod labels;
pub mod manager;
pub mod netstack_link;
pub mod relay_client;
pub mod resolve;
pub mod state;
