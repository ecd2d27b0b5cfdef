//! Sidecar agent library: what the `sidecar-agent` binary is made of.

pub mod conditions;
pub mod container;
pub mod container_api;
pub mod container_net;
pub mod control;
pub mod daemon;
pub mod fd_budget;
pub mod full_tunnel;
pub mod health;
pub mod interface;
pub mod labels;
pub mod login;
pub mod machine_id;
pub mod manager;
pub mod metrics;
pub mod netstack_link;
pub mod pq;
pub mod relay_client;
pub mod resolve;
pub mod secrets;
pub mod shared;
pub mod state;
