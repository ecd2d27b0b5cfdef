//! The WireGuard userspace API (cross-platform configuration protocol).
//!
//! This is the `key=value` protocol that `wg(8)` and wireguard-go speak over
//! `/var/run/wireguard/NAME.sock`, so the stock `wg show`/`wg set`/`wg setconf`
//! manage a sidecar device exactly as they manage wireguard-go. [`protocol`] is the
//! sans-IO text format; [`server`] serves it to a [`DeviceControl`](crate::wg::DeviceControl)
//! and has a small client, [`query`].
//!
//! One extension: `metrics=1` followed by an empty line asks for the device's
//! Prometheus counters (see [`server`] for how that reply is framed).

pub mod protocol;
pub mod server;

pub use protocol::{
    format_errno, format_get, format_set, parse_request, split_reply, Operation, ProtocolError,
    Request,
};
pub use server::{
    query, socket_path, validate_interface_name, InterfaceNameError, UapiLimits, UapiServer,
    SOCKET_DIR,
};
