//! Shared harness for the namespace-based integration tests and the side-by-side bench.
//!
//! Everything a test creates (namespaces, veth pairs, processes, scratch files) is owned by
//! a guard that removes it on drop, so a failing assertion never leaks state into the host
//! or into a parallel test. Names embed the test process id and a counter for the same reason.

// Each test binary (and the bench) uses a different subset of this module.
#![allow(dead_code, unused_imports)]

pub mod agent;
pub mod browser;
pub mod docker;
pub mod flood;
pub mod netns;
pub mod process;
pub mod proxy_header;
pub mod relay;
pub mod sidecar_wg;
pub mod traffic;
pub mod tunnel;
pub mod wg;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use agent::{Agent, AgentConfig};
pub use netns::{Netns, Pair};
pub use process::{ChildGuard, TempDir};
pub use traffic::{iperf3, ping, ping_with, Ping};
pub use tunnel::{Endpoints, Tunnel};
pub use wg::{KeyPair, Peer, WireguardGo};

/// Tools every namespace test shells out to.
pub const BASE_TOOLS: &[&str] = &["ip", "wg", "wireguard-go", "ping", "ss"];

/// Panics (never skips) when a required tool is absent, so a misconfigured machine shows up
/// as a red test rather than as a silently green one.
pub fn require_tools(tools: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        let found = std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool)));
        assert!(
            found,
            "required tool `{tool}` is not in PATH; tests/run.sh installs the test \
             prerequisites (wireguard-go, wireguard-tools, iperf3, iproute2, iputils-ping)"
        );
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and must run as root"
    );
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A name unique among all tests running on this machine right now: `prefix`, pid, counter.
/// Kept short because interface names are limited to 15 bytes.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id());
    assert!(name.len() <= 15, "name {name} is too long for an interface");
    name
}

/// Address family of the underlay (outer) or the tunnel (inner) addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    /// Prefix length of the documentation subnets used on links and tunnels.
    pub fn prefix_len(self) -> u8 {
        match self {
            Family::V4 => 24,
            Family::V6 => 64,
        }
    }

    /// Prefix length that selects a single host.
    pub fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn addr(self, v4: [u8; 3], v6: [u16; 4], host: u8) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::new(v4[0], v4[1], v4[2], host).into(),
            Family::V6 => Ipv6Addr::new(v6[0], v6[1], v6[2], v6[3], 0, 0, 0, host.into()).into(),
        }
    }
}

/// Underlay address of host `host` on the primary link: 192.0.2.0/24, 2001:db8:1::/64.
pub fn underlay(family: Family, host: u8) -> IpAddr {
    family.addr([192, 0, 2], [0x2001, 0xdb8, 1, 0], host)
}

/// Underlay address on the second link a host roams to: 203.0.113.0/24, 2001:db8:3::/64.
pub fn roaming(family: Family, host: u8) -> IpAddr {
    family.addr([203, 0, 113], [0x2001, 0xdb8, 3, 0], host)
}

/// Tunnel (inner) address: 198.51.100.0/24, 2001:db8:2::/64.
pub fn inner(family: Family, host: u8) -> IpAddr {
    family.addr([198, 51, 100], [0x2001, 0xdb8, 2, 0], host)
}

/// `addr/len` as the tools expect it.
pub fn cidr(addr: IpAddr, len: u8) -> String {
    format!("{addr}/{len}")
}

/// `ip:port` with brackets around IPv6, as in wg-quick's `Endpoint`.
pub fn endpoint(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}
