//! Netstack mode: the container's public addresses end in a userspace TCP/IP stack
//! in the agent, which forwards every TCP and UDP port to the container's own
//! address, for hosts where no TUN device can be made inside the container.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use sidecar::netstack::{NetstackConfig, NetstackDevice, ProxyProtocol};
use sidecar::IpPrefix;

/// Starts the stack for `public` (the allocation), forwarding to the container's
/// `(IPv6, IPv4)` addresses, within the container's share of file descriptors,
/// each TCP connection headed by `proxy_protocol` if the container asked for it.
pub fn start(
    public: &[IpPrefix],
    (target_v6, target_v4): (Option<IpAddr>, Option<IpAddr>),
    mtu: u16,
    proxy_protocol: Option<ProxyProtocol>,
) -> io::Result<Arc<NetstackDevice>> {
    if target_v6.is_none() && target_v4.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the container has no address on any Docker network to forward to",
        ));
    }
    NetstackDevice::start_with_limits(
        NetstackConfig {
            public: public.iter().map(|p| p.addr()).collect(),
            target_v6,
            target_v4,
            mtu,
            proxy_protocol,
        },
        crate::fd_budget::netstack_limits(),
    )
}
