//! A TUN device inside a container's network namespace, carrying its public
//! addresses, with policy routing so that traffic from those addresses leaves
//! through the tunnel while the container's Docker networking keeps working.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use sidecar::route::{self, Rule};
use sidecar::IpPrefix;
use tun_rs::{DeviceBuilder, SyncDevice};

/// Routing table for traffic from the public addresses (the WireGuard port number,
/// a value nothing else in a container uses).
pub const TABLE: u32 = 51820;
/// Rule priority: before the main table (32766), after local (0).
const RULE_PRIORITY: u32 = 10_000;
/// The IPv4 egress rules come before that one, in this order: replies from Docker's
/// addresses, the main table's specific routes, private destinations, then the rest.
const EGRESS_PRIORITY: u32 = 9_000;

/// Destinations no public relay can reach, which stay with Docker's networking when
/// IPv4 leaves through the tunnel: RFC 1918, shared (CGNAT) and link-local space, so a
/// resolver or service on the host's own network still answers.
const PRIVATE_V4: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
];

/// Where a container with a public IPv4 /32 sends its own outgoing IPv4.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Egress {
    /// Through the tunnel from the /32, the address its PTR, SPF and reputation belong
    /// to; Docker's networks, replies on Docker's addresses and private destinations
    /// keep using Docker's routes.
    #[default]
    Tunnel,
    /// Through Docker's NAT from the host's address; only traffic from the /32 itself
    /// (replies to connections made to it) uses the tunnel.
    Docker,
}

/// A device created in another namespace. Its file descriptor works from any
/// namespace; name-based calls (MTU, addresses) only work inside its own.
pub struct ContainerTun {
    pub device: SyncDevice,
    pub offload: bool,
}

/// Creates `name` in the namespace `netns` (an open `/proc/PID/ns/net`), assigns
/// `addrs`, and routes: a default IPv6 route through it (containers rarely have
/// their own IPv6), for each address a rule sending its replies through it, and with
/// an IPv4 address and [`Egress::Tunnel`] the rules that make it the container's own.
///
/// Runs on a short-lived thread of its own: `setns` changes the calling thread's
/// namespace, and no tokio worker may ever be moved.
pub fn create_in_namespace(
    netns: &File,
    name: &str,
    mtu: u16,
    addrs: &[IpPrefix],
    egress: Egress,
) -> io::Result<ContainerTun> {
    let fd = netns.as_raw_fd();
    let name = name.to_string();
    let addrs = addrs.to_vec();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: fd is an open namespace file for the duration of the call,
                // and setns only affects this thread, which ends right after.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                setup(&name, mtu, &addrs, egress)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace setup thread panicked")))
    })
}

fn setup(name: &str, mtu: u16, addrs: &[IpPrefix], egress: Egress) -> io::Result<ContainerTun> {
    // Docker's own addresses, read before ours join them.
    let docker_v4: Vec<IpAddr> = interface_addresses()?
        .into_iter()
        .filter(|a| a.is_ipv4() && !a.is_loopback())
        .filter(|a| !addrs.iter().any(|ours| ours.addr() == *a))
        .collect();
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .mtu(mtu)
            .offload(offload)
            .build_sync()
    };
    let (device, offload) = match build(true) {
        Ok(d) => (d, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (build(false)?, false),
        Err(e) => return Err(e),
    };
    let offload = offload && device.tcp_gso();
    if addrs.iter().any(|a| !a.is_ipv4()) {
        // Docker turns IPv6 off in containers by default; adding the /128 fails
        // (EACCES) until it is on for this device.
        enable_ipv6(name)?;
    }
    for addr in addrs {
        match addr.addr() {
            IpAddr::V4(a) => device.add_address_v4(a, addr.len())?,
            IpAddr::V6(a) => device.add_address_v6(a, addr.len())?,
        }
    }
    let ifindex = device.if_index()?;
    route::set_link_up(ifindex)?;
    for addr in addrs {
        let any: IpPrefix = if addr.is_ipv4() { "0.0.0.0/0" } else { "::/0" }
            .parse()
            .expect("literal prefix");
        ignore_exists(route::add_route_in_table(any, ifindex, None, TABLE))?;
        add(&Rule::from_source(
            IpPrefix::host(addr.addr()),
            TABLE,
            RULE_PRIORITY,
        ))?;
        if !addr.is_ipv4() {
            // Outgoing IPv6 from the container uses the public address.
            ignore_exists(route::add_route(any, ifindex, None))?;
        } else if egress == Egress::Tunnel {
            for rule in ipv4_egress_rules(&docker_v4) {
                add(&rule)?;
            }
        }
    }
    Ok(ContainerTun { device, offload })
}

/// The rules that send the container's outgoing IPv4 through [`TABLE`], so it leaves
/// from the /32 (the source the kernel picks for that table's route through our
/// device), while Docker's networking keeps what it needs: replies from Docker's
/// addresses (published ports, whose clients reach the container there), the main
/// table's routes but its default (other containers on the bridge), private
/// destinations (the host's network, its resolvers). The rules live in the
/// container's namespace and go with it; without our device the table is empty and
/// lookups fall through to Docker's routes again.
fn ipv4_egress_rules(docker_v4: &[IpAddr]) -> Vec<Rule> {
    let mut rules: Vec<Rule> = docker_v4
        .iter()
        .map(|a| Rule::from_source(IpPrefix::host(*a), route::MAIN_TABLE, EGRESS_PRIORITY))
        .collect();
    rules.push(Rule {
        suppress_prefixlength: Some(0),
        ..Rule::all(false, route::MAIN_TABLE, EGRESS_PRIORITY + 1)
    });
    rules.extend(PRIVATE_V4.iter().map(|p| {
        let prefix = p.parse().expect("literal prefix");
        Rule::to_destination(prefix, route::MAIN_TABLE, EGRESS_PRIORITY + 2)
    }));
    rules.push(Rule::all(false, TABLE, EGRESS_PRIORITY + 3));
    rules
}

/// Adds `rule`; one left from an earlier start of the container is as good.
fn add(rule: &Rule) -> io::Result<()> {
    ignore_exists(route::add_rule(rule))
}

fn ignore_exists(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// `/proc/sys/net` follows the calling thread's namespace.
fn enable_ipv6(name: &str) -> io::Result<()> {
    for path in [
        format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"),
        "/proc/sys/net/ipv6/conf/lo/disable_ipv6".to_string(),
    ] {
        std::fs::write(&path, "0")?;
    }
    Ok(())
}

/// Why a TUN device made in `netns` would never be seen by the container, if so.
///
/// A sandboxed runtime such as gVisor's runsc (with its default `--network=sandbox`)
/// runs the container's network stack in user space: at start it takes over the
/// namespace's interfaces, removing their addresses from the kernel, and never looks
/// at devices added later. Docker still reports the container's address, but no
/// interface of the namespace carries it. (A runtime that leaves the kernel's stack
/// to the container, like runc or runsc with `--network=host`, keeps the address
/// there.) Returns `None` when any of `docker_addrs` is on an interface, or when
/// there is nothing to compare (no Docker address: a `none` or host network).
pub fn tun_unseen_reason(netns: &File, docker_addrs: &[IpAddr]) -> Option<String> {
    if docker_addrs.is_empty() {
        return None;
    }
    let fd = netns.as_raw_fd();
    let present = std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: as in `create_in_namespace`: fd is open, the thread ends here.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                interface_addresses()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace inspection thread panicked")))
    });
    match present {
        Ok(present) if !docker_addrs.iter().any(|a| present.contains(a)) => Some(format!(
            "the container's address {} is on no interface of its network namespace: \
             its network stack runs in a sandbox (such as gVisor), which never sees a TUN \
             device made there",
            docker_addrs[0]
        )),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list the addresses in the container's namespace");
            None
        }
    }
}

/// Every address on an interface of the calling thread's network namespace.
fn interface_addresses() -> io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list it stores in `list`; freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed; an
        // address's actual type is given by its family.
        unsafe {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
    }
    // SAFETY: the list came from getifaddrs and nothing points into it any more.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_egress_keeps_dockers_replies_and_networks_before_the_tunnel() {
        let docker: IpAddr = "172.17.0.2".parse().unwrap();
        let rules = ipv4_egress_rules(&[docker]);
        assert_eq!(
            rules.first(),
            Some(&Rule::from_source(
                "172.17.0.2/32".parse().unwrap(),
                route::MAIN_TABLE,
                EGRESS_PRIORITY
            ))
        );
        let last = rules.last().unwrap();
        assert_eq!(last, &Rule::all(false, TABLE, EGRESS_PRIORITY + 3));
        assert!(rules.iter().all(|r| !r.ipv6 && r.priority < RULE_PRIORITY));
        assert!(rules[..rules.len() - 1]
            .iter()
            .all(|r| r.table == route::MAIN_TABLE && r.priority < last.priority));
        assert!(rules
            .iter()
            .any(|r| r.destination == Some("192.168.0.0/16".parse().unwrap())));
    }

    #[test]
    fn a_namespace_holding_the_address_is_not_a_sandbox() {
        let own = File::open("/proc/self/ns/net").expect("own namespace");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(tun_unseen_reason(&own, &[lo]), None);
        assert_eq!(tun_unseen_reason(&own, &[]), None);
        let absent: IpAddr = "192.0.2.77".parse().unwrap();
        let reason = tun_unseen_reason(&own, &[absent]).expect("address absent");
        assert!(
            reason.contains("192.0.2.77") && reason.contains("sandbox"),
            "{reason}"
        );
    }
}
