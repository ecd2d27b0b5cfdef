//! The relay: hands out public addresses to WireGuard peers, forwards and shapes
//! their traffic, and serves the control API.

pub mod api;
pub mod canary;
pub mod config;
pub mod dataplane;
pub mod device;
pub mod discovery;
pub mod histogram;
pub mod install;
pub mod limits;
pub mod machine;
pub mod metrics;
pub mod neighbor;
pub mod policy;
pub mod pq;
pub mod probe;
pub mod service;
pub mod store;
pub mod tls;
pub mod ui;
