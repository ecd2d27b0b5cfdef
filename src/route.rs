//! Kernel routes over rtnetlink.
//!
//! Requests go over a short-lived `NETLINK_ROUTE` socket, built by hand with `libc`
//! so the engine needs no netlink crate. A netlink socket is bound to the network
//! namespace of the thread that creates it, and every call here creates its own
//! socket. So these functions act on the calling thread's namespace: from a thread
//! that has done `setns(fd, CLONE_NEWNET)` (or `unshare(CLONE_NEWNET)`) they change
//! that namespace, not the process's original one. Do the `setns` on a dedicated
//! `std::thread`, never on a tokio worker thread.

use std::ffi::CString;
use std::io;
use std::mem;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::prefix::IpPrefix;

/// Adds a device route for `prefix` (host bits cleared) through interface `ifindex`
/// to the main table, the way `ip route add PREFIX dev DEV [metric M]` does.
///
/// Returns an error of kind [`io::ErrorKind::AlreadyExists`] if the same route is
/// already there, so callers can tell "nothing to do" apart from real failures.
/// `metric: None` leaves the kernel default (0 for IPv4, 1024 for IPv6).
/// Bring the link up first ([`set_link_up`]): the kernel refuses a route through
/// a down device (`ENETDOWN`, for IPv4 and IPv6 alike).
pub fn add_route(prefix: IpPrefix, ifindex: u32, metric: Option<u32>) -> io::Result<()> {
    add_route_in_table(prefix, ifindex, metric, MAIN_TABLE)
}

/// The kernel's main routing table.
pub const MAIN_TABLE: u32 = libc::RT_TABLE_MAIN as u32;

/// As [`add_route`], into routing table `table` (used with [`add_rule`] for policy
/// routing).
pub fn add_route_in_table(
    prefix: IpPrefix,
    ifindex: u32,
    metric: Option<u32>,
    table: u32,
) -> io::Result<()> {
    let seq = next_seq();
    request(
        &route_message(RouteOp::Add, prefix, ifindex, metric, table, seq)?,
        seq,
    )
}

/// A policy rule sending the packets it matches to a routing table, as
/// `ip rule add [from SOURCE] [to DESTINATION] lookup TABLE [suppress_prefixlength N]
/// priority PRIORITY` makes one. Rules are per family: one of IPv4 never sees IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub ipv6: bool,
    /// `from`; `None` matches every source, the unchosen one of an unbound socket too.
    pub source: Option<IpPrefix>,
    /// `to`; `None` matches every destination.
    pub destination: Option<IpPrefix>,
    pub table: u32,
    pub priority: u32,
    /// Ignore the table's routes of this prefix length or shorter, so that with 0 a
    /// table's specific routes apply but not its default route.
    pub suppress_prefixlength: Option<u32>,
}

impl Rule {
    /// `from SOURCE lookup TABLE`: replies from an address leave the way it came.
    pub fn from_source(source: IpPrefix, table: u32, priority: u32) -> Rule {
        Rule {
            source: Some(source),
            ..Rule::all(!source.is_ipv4(), table, priority)
        }
    }

    /// `to DESTINATION lookup TABLE`.
    pub fn to_destination(destination: IpPrefix, table: u32, priority: u32) -> Rule {
        Rule {
            destination: Some(destination),
            ..Rule::all(!destination.is_ipv4(), table, priority)
        }
    }

    /// `lookup TABLE` for every packet of the family.
    pub fn all(ipv6: bool, table: u32, priority: u32) -> Rule {
        Rule {
            ipv6,
            source: None,
            destination: None,
            table,
            priority,
            suppress_prefixlength: None,
        }
    }
}

/// Adds `rule`. Returns an error of kind [`io::ErrorKind::AlreadyExists`] if the same
/// rule is already there.
pub fn add_rule(rule: &Rule) -> io::Result<()> {
    let seq = next_seq();
    request(&rule_message(RouteOp::Add, rule, seq)?, seq)
}

/// Removes a rule added with [`add_rule`].
pub fn delete_rule(rule: &Rule) -> io::Result<()> {
    let seq = next_seq();
    request(&rule_message(RouteOp::Delete, rule, seq)?, seq)
}

/// Deletes the device route for `prefix` (host bits cleared) through `ifindex` from
/// the main table, whatever its metric and protocol.
pub fn delete_route(prefix: IpPrefix, ifindex: u32) -> io::Result<()> {
    let seq = next_seq();
    request(
        &route_message(RouteOp::Delete, prefix, ifindex, None, MAIN_TABLE, seq)?,
        seq,
    )
}

/// The index of the interface called `name` in the calling thread's namespace.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let c_name = CString::new(name).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name contains a NUL byte",
        )
    })?;
    // SAFETY: c_name is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

/// Sets `IFF_UP` on interface `ifindex`, like `ip link set DEV up`. Setting it on a
/// device that is already up succeeds.
pub fn set_link_up(ifindex: u32) -> io::Result<()> {
    let seq = next_seq();
    request(&link_up_message(ifindex, seq)?, seq)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RouteOp {
    Add,
    Delete,
}

const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;
const IFINFOMSG_LEN: usize = 16;
const RTA_HDRLEN: usize = 4;
/// How long to wait for the kernel's acknowledgement. The kernel answers at once;
/// the limit only keeps a wedged socket from hanging the caller forever.
const ACK_TIMEOUT_SECS: libc::time_t = 5;

/// Netlink pads every message and attribute to 4 bytes (NLMSG_ALIGN / RTA_ALIGN).
const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Distinguishes our acknowledgement from anything else queued on the socket.
/// Uniqueness across concurrent callers comes from the separate sockets; the
/// counter only has to differ between requests on one socket.
fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A netlink message under construction. Netlink uses host byte order for its
/// headers, so everything is written with `to_ne_bytes`.
struct MessageBuilder {
    buf: Vec<u8>,
}

impl MessageBuilder {
    fn new(msg_type: u16, flags: u16, seq: u32) -> MessageBuilder {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        MessageBuilder { buf }
    }

    /// Appends a fixed family header (rtmsg, ifinfomsg), padded to alignment.
    fn push_header(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.pad();
    }

    fn push_attr(&mut self, attr_type: u16, payload: &[u8]) {
        let len = RTA_HDRLEN + payload.len();
        // Attributes here are at most 20 bytes, far below u16::MAX.
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn finish(mut self) -> Vec<u8> {
        // The messages built here are a few dozen bytes.
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn route_message(
    op: RouteOp,
    prefix: IpPrefix,
    ifindex: u32,
    metric: Option<u32>,
    table: u32,
    seq: u32,
) -> io::Result<Vec<u8>> {
    if ifindex == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface index 0 names no device",
        ));
    }
    let prefix = prefix.network();
    let (family, addr_bytes): (u8, Vec<u8>) = match prefix.addr() {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let request = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let (msg_type, flags, protocol, scope) = match op {
        RouteOp::Add => (
            libc::RTM_NEWROUTE,
            request | (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
            libc::RTPROT_BOOT,
            // No gateway: the destination is directly on the link.
            libc::RT_SCOPE_LINK,
        ),
        RouteOp::Delete => (
            libc::RTM_DELROUTE,
            request,
            // Protocol 0 and scope NOWHERE are the kernel's wildcards, so the route
            // is deleted however it was added (as `ip route del` does).
            0,
            libc::RT_SCOPE_NOWHERE,
        ),
    };
    let rtmsg = [
        family,
        prefix.len(),
        0, // src_len
        0, // tos
        table_byte(table),
        protocol,
        scope,
        libc::RTN_UNICAST,
        0, // rtm_flags (u32)
        0,
        0,
        0,
    ];
    debug_assert_eq!(rtmsg.len(), RTMSG_LEN);

    let mut msg = MessageBuilder::new(msg_type, flags, seq);
    msg.push_header(&rtmsg);
    // A default route has no destination attribute, as iproute2 sends it.
    if prefix.len() > 0 {
        msg.push_attr(libc::RTA_DST, &addr_bytes);
    }
    msg.push_attr(libc::RTA_OIF, &ifindex.to_ne_bytes());
    if let Some(metric) = metric {
        msg.push_attr(libc::RTA_PRIORITY, &metric.to_ne_bytes());
    }
    if table != MAIN_TABLE {
        msg.push_attr(libc::RTA_TABLE, &table.to_ne_bytes());
    }
    Ok(msg.finish())
}

/// The one-byte table field of the headers; tables past 255 travel in an attribute.
fn table_byte(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(libc::RT_TABLE_UNSPEC)
}

fn rule_message(op: RouteOp, rule: &Rule, seq: u32) -> io::Result<Vec<u8>> {
    let family = if rule.ipv6 {
        libc::AF_INET6
    } else {
        libc::AF_INET
    } as u8;
    let mut selectors = [(FRA_SRC, rule.source), (FRA_DST, rule.destination)]
        .into_iter()
        .filter_map(|(attr, prefix)| Some((attr, prefix?.network())));
    if selectors
        .clone()
        .any(|(_, prefix)| prefix.is_ipv4() == rule.ipv6)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a rule's addresses must be of its own family",
        ));
    }
    let prefix_len = |attr| {
        selectors
            .clone()
            .find(|&(a, _)| a == attr)
            .map_or(0, |(_, p)| p.len())
    };
    let request = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let (msg_type, flags) = match op {
        RouteOp::Add => (
            libc::RTM_NEWRULE,
            request | (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16,
        ),
        RouteOp::Delete => (libc::RTM_DELRULE, request),
    };
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags.
    let header = [
        family,
        prefix_len(FRA_DST),
        prefix_len(FRA_SRC),
        0,
        table_byte(rule.table),
        0,
        0,
        FR_ACT_TO_TBL,
        0,
        0,
        0,
        0,
    ];
    let mut msg = MessageBuilder::new(msg_type, flags, seq);
    msg.push_header(&header);
    for (attr, prefix) in selectors.by_ref() {
        let bytes = match prefix.addr() {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        msg.push_attr(attr, &bytes);
    }
    msg.push_attr(FRA_TABLE, &rule.table.to_ne_bytes());
    msg.push_attr(FRA_PRIORITY, &rule.priority.to_ne_bytes());
    if let Some(len) = rule.suppress_prefixlength {
        msg.push_attr(FRA_SUPPRESS_PREFIXLEN, &len.to_ne_bytes());
    }
    Ok(msg.finish())
}

/// From linux/fib_rules.h (not all of them are in the libc crate).
const FR_ACT_TO_TBL: u8 = 1;
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FRA_SUPPRESS_PREFIXLEN: u16 = 14;

fn link_up_message(ifindex: u32, seq: u32) -> io::Result<Vec<u8>> {
    let index = i32::try_from(ifindex)
        .ok()
        .filter(|&i| i > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid interface index {ifindex}"),
            )
        })?;
    let up = libc::IFF_UP as u32;
    let mut ifinfo = Vec::with_capacity(IFINFOMSG_LEN);
    ifinfo.push(libc::AF_UNSPEC as u8);
    ifinfo.push(0); // padding
    ifinfo.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    ifinfo.extend_from_slice(&index.to_ne_bytes());
    ifinfo.extend_from_slice(&up.to_ne_bytes()); // ifi_flags
    ifinfo.extend_from_slice(&up.to_ne_bytes()); // ifi_change: touch only IFF_UP
    debug_assert_eq!(ifinfo.len(), IFINFOMSG_LEN);

    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let mut msg = MessageBuilder::new(libc::RTM_NEWLINK, flags, seq);
    msg.push_header(&ifinfo);
    Ok(msg.finish())
}

/// Sends one request on a fresh socket and waits for its acknowledgement.
fn request(msg: &[u8], seq: u32) -> io::Result<()> {
    let sock = open_socket()?;
    send_all(&sock, msg)?;
    wait_for_ack(&sock, seq)
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: ACK_TIMEOUT_SECS,
        tv_usec: 0,
    };
    // SAFETY: timeout is a valid timeval and the length matches it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn send_all(sock: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    loop {
        // No destination address: an unconnected netlink socket sends to the
        // kernel (port 0), and the first send binds us to an automatic port id.
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // Netlink datagrams are sent whole or not at all.
        if n as usize != msg.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write on netlink socket",
            ));
        }
        return Ok(());
    }
}

fn wait_for_ack(sock: &OwnedFd, seq: u32) -> io::Result<()> {
    let mut buf = vec![0u8; 8192];
    loop {
        let n = recv_from_kernel(sock, &mut buf).map_err(|err| {
            if err.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no acknowledgement from the kernel over rtnetlink",
                )
            } else {
                err
            }
        })?;
        if let Some(result) = find_ack(&buf[..n], seq) {
            return result;
        }
    }
}

/// Looks through one datagram for the acknowledgement of request `seq`.
/// `None` means it is not in this datagram.
fn find_ack(mut data: &[u8], seq: u32) -> Option<io::Result<()>> {
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed rtnetlink reply",
            )));
        }
        let msg_type = u16::from_ne_bytes(data[4..6].try_into().ok()?);
        let msg_seq = u32::from_ne_bytes(data[8..12].try_into().ok()?);
        if msg_seq == seq && i32::from(msg_type) == libc::NLMSG_ERROR {
            let errno = data
                .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_ne_bytes);
            return Some(match errno {
                Some(0) => Ok(()),
                // The kernel reports -errno; std maps EEXIST to AlreadyExists.
                Some(e) => Err(io::Error::from_raw_os_error(e.saturating_neg())),
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated rtnetlink error message",
                )),
            });
        }
        data = data.get(align4(len)..).unwrap_or(&[]);
    }
    None
}

/// What a route does with matching packets (the kernel's `rtm_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// Forwarded through an interface (or a gateway on one).
    Unicast,
    /// One of the host's own addresses (table `local`).
    Local,
    /// A broadcast address of one of the host's networks (table `local`).
    Broadcast,
    /// An anycast address the host answers (table `local`).
    Anycast,
    /// Blackhole, unreachable, prohibit, multicast and the rest.
    Other,
}

/// One route as a table dump reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub table: u32,
    pub kind: RouteKind,
    pub dst: IpPrefix,
    /// The output interface, or each next hop's for a multipath route; empty for
    /// routes without one (blackhole and the like).
    pub oifs: Vec<u32>,
    /// The next hop, for routes through a gateway (`None`: directly on the link).
    pub gateway: Option<IpAddr>,
    pub metric: u32,
}

/// Every IPv4 and IPv6 route of every table in the calling thread's namespace, as
/// `ip route show table all` lists them. Source-specific routes are left out.
pub fn dump_routes() -> io::Result<Vec<RouteEntry>> {
    let mut routes = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let seq = next_seq();
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        let mut msg = MessageBuilder::new(libc::RTM_GETROUTE, flags, seq);
        msg.push_header(&[family, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let sock = open_socket()?;
        send_all(&sock, &msg.finish())?;
        let mut buf = vec![0u8; 32 * 1024];
        'dump: loop {
            let n = recv_from_kernel(&sock, &mut buf)?;
            let mut data = &buf[..n];
            while let Some((msg_type, msg_seq, body, rest)) = next_message(data) {
                data = rest;
                if msg_seq != seq {
                    continue;
                }
                match i32::from(msg_type) {
                    libc::NLMSG_DONE => break 'dump,
                    libc::NLMSG_ERROR => {
                        let errno = body
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map_or(libc::EIO, |b| i32::from_ne_bytes(b).saturating_neg());
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    _ if msg_type == libc::RTM_NEWROUTE => routes.extend(parse_route(body)),
                    _ => {}
                }
            }
        }
    }
    Ok(routes)
}

/// Reads one route message's body (rtmsg and attributes).
fn parse_route(body: &[u8]) -> Option<RouteEntry> {
    let header = body.get(..RTMSG_LEN)?;
    let (family, dst_len, src_len, table_byte, rtm_type) =
        (header[0], header[1], header[2], header[4], header[7]);
    if src_len != 0 {
        return None;
    }
    let mut table = u32::from(table_byte);
    let mut dst = None;
    let mut oifs = Vec::new();
    let mut metric = 0;
    let mut gateway = None;
    for (kind, payload) in attributes(body.get(align4(RTMSG_LEN)..)?) {
        match kind {
            libc::RTA_DST => dst = Some(payload),
            libc::RTA_GATEWAY => gateway = ip_from(family, payload),
            libc::RTA_OIF => oifs.push(u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?)),
            libc::RTA_PRIORITY => metric = u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?),
            libc::RTA_TABLE => table = u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?),
            libc::RTA_MULTIPATH => {
                // struct rtnexthop { len: u16, flags: u8, hops: u8, ifindex: i32 }, attrs.
                let mut hops = payload;
                while hops.len() >= 8 {
                    let len = usize::from(u16::from_ne_bytes([hops[0], hops[1]]));
                    oifs.push(u32::from_ne_bytes(hops[4..8].try_into().ok()?));
                    if len < 8 {
                        break;
                    }
                    hops = hops.get(align4(len)..).unwrap_or(&[]);
                }
            }
            _ => {}
        }
    }
    let addr: IpAddr = match (i32::from(family), dst) {
        (_, Some(d)) => ip_from(family, d)?,
        (libc::AF_INET, None) => IpAddr::from([0u8; 4]),
        (libc::AF_INET6, None) => IpAddr::from([0u8; 16]),
        _ => return None,
    };
    let kind = match rtm_type {
        libc::RTN_UNICAST => RouteKind::Unicast,
        libc::RTN_LOCAL => RouteKind::Local,
        libc::RTN_BROADCAST => RouteKind::Broadcast,
        libc::RTN_ANYCAST => RouteKind::Anycast,
        _ => RouteKind::Other,
    };
    Some(RouteEntry {
        table,
        kind,
        dst: IpPrefix::new(addr, dst_len).ok()?.network(),
        oifs,
        gateway,
        metric,
    })
}

fn ip_from(family: u8, bytes: &[u8]) -> Option<IpAddr> {
    match i32::from(family) {
        libc::AF_INET => Some(IpAddr::from(<[u8; 4]>::try_from(bytes.get(..4)?).ok()?)),
        libc::AF_INET6 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes.get(..16)?).ok()?)),
        _ => None,
    }
}

/// The (type, payload) pairs of a run of netlink attributes; stops at a malformed one.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < RTA_HDRLEN {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < RTA_HDRLEN || len > data.len() {
            return None;
        }
        let payload = &data[RTA_HDRLEN..len];
        data = data.get(align4(len)..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

/// Splits the first netlink message off `data`: (type, seq, body, rest).
fn next_message(data: &[u8]) -> Option<(u16, u32, &[u8], &[u8])> {
    if data.len() < NLMSG_HDRLEN {
        return None;
    }
    let len = u32::from_ne_bytes(data[0..4].try_into().ok()?) as usize;
    if len < NLMSG_HDRLEN || len > data.len() {
        return None;
    }
    let msg_type = u16::from_ne_bytes(data[4..6].try_into().ok()?);
    let seq = u32::from_ne_bytes(data[8..12].try_into().ok()?);
    Some((
        msg_type,
        seq,
        &data[NLMSG_HDRLEN..len],
        data.get(align4(len)..).unwrap_or(&[]),
    ))
}

/// One datagram from the kernel. Other processes can send unicast netlink messages
/// to our port; only the kernel's count, the others are skipped.
fn recv_from_kernel(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: sockaddr_nl is plain data, valid when zeroed.
        let mut from: libc::sockaddr_nl = unsafe { mem::zeroed() };
        let mut from_len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: buf and from are valid for writes of the lengths given.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if from.nl_pid == 0 {
            return Ok(n as usize);
        }
    }
}

/// Notifications of link, address and route changes in the calling thread's
/// namespace, so a view of the host's routes can follow them instead of polling.
pub struct RouteWatch {
    sock: OwnedFd,
}

impl RouteWatch {
    pub fn new() -> io::Result<RouteWatch> {
        let sock = open_socket()?;
        // SAFETY: sockaddr_nl is plain data, valid when zeroed.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_LINK
            | libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV6_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV6_ROUTE) as u32;
        // SAFETY: addr is a valid sockaddr_nl and the length matches it.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RouteWatch { sock })
    }

    /// Waits up to `timeout` for notifications and reads all that are queued.
    /// Returns whether any change was seen other than a route through `ignore_oif`
    /// (the caller's own per-peer routes). A lost notification (the socket's buffer
    /// overflowed) counts as a change, since the view must then be read again.
    pub fn wait(&self, timeout: std::time::Duration, ignore_oif: u32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: pfd is one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            };
        }
        if rc == 0 {
            return Ok(false);
        }
        let mut changed = false;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            // SAFETY: buf is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(changed),
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => changed = true,
                    _ => return Err(err),
                }
                continue;
            }
            let mut data = &buf[..n as usize];
            while let Some((msg_type, _, body, rest)) = next_message(data) {
                data = rest;
                let own = (msg_type == libc::RTM_NEWROUTE || msg_type == libc::RTM_DELROUTE)
                    && parse_route(body).is_some_and(|r| r.oifs == [ignore_oif]);
                changed |= !own;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn attrs(msg: &[u8], family_header: usize) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = &msg[NLMSG_HDRLEN + family_header..];
        while !rest.is_empty() {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let ty = u16::from_ne_bytes([rest[2], rest[3]]);
            out.push((ty, rest[RTA_HDRLEN..len].to_vec()));
            rest = &rest[align4(len)..];
        }
        out
    }

    #[test]
    fn add_message_layout() {
        let prefix: IpPrefix = "192.0.2.77/24".parse().unwrap();
        let msg = route_message(RouteOp::Add, prefix, 7, Some(50), MAIN_TABLE, 42).unwrap();
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), libc::RTM_NEWROUTE);
        let flags = u16::from_ne_bytes([msg[6], msg[7]]);
        let want = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        assert_eq!(flags, want as u16);
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 42);
        let rt = &msg[NLMSG_HDRLEN..NLMSG_HDRLEN + RTMSG_LEN];
        assert_eq!(rt[0], libc::AF_INET as u8);
        assert_eq!(rt[1], 24);
        assert_eq!(rt[4], libc::RT_TABLE_MAIN);
        assert_eq!(rt[5], libc::RTPROT_BOOT);
        assert_eq!(rt[6], libc::RT_SCOPE_LINK);
        assert_eq!(rt[7], libc::RTN_UNICAST);
        assert_eq!(
            attrs(&msg, RTMSG_LEN),
            vec![
                (libc::RTA_DST, vec![192, 0, 2, 0]), // host bits cleared
                (libc::RTA_OIF, 7u32.to_ne_bytes().to_vec()),
                (libc::RTA_PRIORITY, 50u32.to_ne_bytes().to_vec()),
            ]
        );
    }

    #[test]
    fn delete_message_and_default_route() {
        let prefix: IpPrefix = "::/0".parse().unwrap();
        let msg = route_message(RouteOp::Delete, prefix, 3, None, MAIN_TABLE, 1).unwrap();
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), libc::RTM_DELROUTE);
        let rt = &msg[NLMSG_HDRLEN..NLMSG_HDRLEN + RTMSG_LEN];
        assert_eq!(rt[0], libc::AF_INET6 as u8);
        assert_eq!(rt[6], libc::RT_SCOPE_NOWHERE);
        assert_eq!(
            attrs(&msg, RTMSG_LEN),
            vec![(libc::RTA_OIF, 3u32.to_ne_bytes().to_vec())]
        );
        assert!(route_message(RouteOp::Add, prefix, 0, None, MAIN_TABLE, 1).is_err());
    }

    #[test]
    fn link_message_layout() {
        let msg = link_up_message(5, 9).unwrap();
        assert_eq!(msg.len(), NLMSG_HDRLEN + IFINFOMSG_LEN);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), libc::RTM_NEWLINK);
        let body = &msg[NLMSG_HDRLEN..];
        assert_eq!(i32::from_ne_bytes(body[4..8].try_into().unwrap()), 5);
        assert_eq!(u32::from_ne_bytes(body[8..12].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(body[12..16].try_into().unwrap()), 1);
        assert!(link_up_message(0, 1).is_err());
        assert!(link_up_message(u32::MAX, 1).is_err());
    }

    fn error_reply(seq: u32, errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&errno.to_ne_bytes());
        m.extend_from_slice(&[0u8; 16]); // the echoed request header
        m
    }

    #[test]
    fn parses_acks() {
        assert!(matches!(find_ack(&error_reply(5, 0), 5), Some(Ok(()))));
        let err = find_ack(&error_reply(5, -libc::EEXIST), 5)
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(find_ack(&error_reply(4, 0), 5).is_none());
        let mut two = error_reply(4, 0);
        two.extend(error_reply(5, -libc::EPERM));
        let err = find_ack(&two, 5).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // Garbage must not panic.
        assert!(find_ack(&[0xff; 3], 5).is_none());
        assert!(find_ack(&[0xff; 40], 5).unwrap().is_err());
    }

    #[test]
    fn interface_index_errors() {
        assert_eq!(
            interface_index("a\0b").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(interface_index("no-such-if0").is_err());
    }

    /// `ip ARGS`, run in the calling thread's namespace (a child starts in its parent
    /// thread's), which iproute2 prints the way users read it.
    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("iproute2's ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// Routes in the thread's namespace from /proc, as (destination, device).
    fn ipv4_routes() -> Vec<(IpPrefix, String, u32)> {
        let text = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
        text.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // The kernel prints the network-order address as a host integer.
                let dst = u32::from_str_radix(f[1], 16).unwrap().to_ne_bytes();
                let mask = u32::from_str_radix(f[7], 16).unwrap().to_ne_bytes();
                let len = u32::from_be_bytes(mask).count_ones() as u8;
                let prefix = IpPrefix::new(Ipv4Addr::from(dst).into(), len).unwrap();
                (prefix, f[0].to_string(), f[6].parse().unwrap())
            })
            .collect()
    }

    fn ipv6_routes() -> Vec<(IpPrefix, String, u32)> {
        let text = std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap();
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let dst = u128::from_str_radix(f[0], 16).unwrap();
                let len = u8::from_str_radix(f[1], 16).unwrap();
                let prefix = IpPrefix::new(Ipv6Addr::from(dst).into(), len).unwrap();
                let metric = u32::from_str_radix(f[5], 16).unwrap();
                (prefix, f[9].to_string(), metric)
            })
            .collect()
    }

    /// Needs root; runs in a private network namespace, so the machine's own
    /// interfaces and routes are never touched. Fails (never skips) without either.
    #[test]
    fn routes_in_private_namespace() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test changes routes and must run as root");
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread, which owns no fds that care.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            let lo = interface_index("lo").unwrap();
            set_link_up(lo).unwrap();
            set_link_up(lo).unwrap();

            let v4: IpPrefix = "192.0.2.9/24".parse().unwrap();
            let v6: IpPrefix = "2001:db8:1::/64".parse().unwrap();
            let v4_net = v4.network();
            add_route(v4, lo, Some(100)).unwrap();
            add_route(v6, lo, None).unwrap();
            assert!(ipv4_routes().contains(&(v4_net, "lo".into(), 100)));
            assert!(ipv6_routes().contains(&(v6, "lo".into(), 1024)));

            let dump = dump_routes().unwrap();
            let find = |dst: IpPrefix| dump.iter().find(|r| r.dst == dst).cloned();
            let r4 = find(v4_net).expect("the IPv4 route in the dump");
            assert_eq!(
                (r4.table, r4.kind, r4.oifs.clone(), r4.metric),
                (MAIN_TABLE, RouteKind::Unicast, vec![lo], 100)
            );
            assert_eq!(r4.gateway, None);
            add_route("0.0.0.0/0".parse().unwrap(), lo, None).unwrap();
            assert_eq!(
                dump_routes()
                    .unwrap()
                    .iter()
                    .find(|r| r.dst.len() == 0 && r.dst.is_ipv4())
                    .map(|r| r.oifs.clone()),
                Some(vec![lo])
            );
            assert_eq!(find(v6).map(|r| r.metric), Some(1024));
            let local = find("127.0.0.1/32".parse().unwrap()).expect("lo's own address");
            assert_eq!(
                (local.table, local.kind),
                (libc::RT_TABLE_LOCAL as u32, RouteKind::Local)
            );

            // Changes are seen, except routes through the interface the caller ignores.
            let watch = RouteWatch::new().unwrap();
            let quiet = std::time::Duration::from_millis(200);
            add_route("198.51.100.0/24".parse().unwrap(), lo, None).unwrap();
            assert!(!watch.wait(quiet, lo).unwrap());
            add_route_in_table("203.0.113.0/24".parse().unwrap(), lo, None, 7).unwrap();
            assert!(!watch.wait(quiet, lo).unwrap());
            let other = RouteWatch::new().unwrap();
            delete_route("198.51.100.0/24".parse().unwrap(), lo).unwrap();
            assert!(other.wait(quiet, 0).unwrap());
            assert!(!other.wait(std::time::Duration::ZERO, 0).unwrap());

            let again = add_route(v4, lo, Some(100)).unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
            let again = add_route(v6, lo, None).unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);

            delete_route(v4, lo).unwrap();
            delete_route(v6, lo).unwrap();
            assert!(!ipv4_routes().iter().any(|r| r.0 == v4_net));
            assert!(!ipv6_routes().iter().any(|r| r.0 == v6));
            assert!(delete_route(v4, lo).is_err());
            assert!(delete_route(v6, lo).is_err());

            // Policy routing by source: a rule into a table of its own.
            let any6: IpPrefix = "::/0".parse().unwrap();
            add_route_in_table(any6, lo, None, 51820).unwrap();
            let again = add_route_in_table(any6, lo, None, 51820).unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
            let src: IpPrefix = "2001:db8:1::7/128".parse().unwrap();
            let by_source = Rule::from_source(src, 51820, 100);
            add_rule(&by_source).unwrap();
            let again = add_rule(&by_source).unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
            let src4: IpPrefix = "192.0.2.7/32".parse().unwrap();
            let by_source4 = Rule::from_source(src4, 51820, 100);
            let private = Rule::to_destination("10.0.0.0/8".parse().unwrap(), MAIN_TABLE, 101);
            let specific = Rule {
                suppress_prefixlength: Some(0),
                ..Rule::all(false, MAIN_TABLE, 102)
            };
            let rest = Rule::all(false, 51820, 103);
            let rules = [by_source4, private, specific, rest];
            for rule in &rules {
                add_rule(rule).unwrap();
            }
            let shown = ip(&["-4", "rule", "show"]);
            for line in [
                "100:\tfrom 192.0.2.7 lookup 51820",
                "101:\tfrom all to 10.0.0.0/8 lookup main",
                "102:\tfrom all lookup main suppress_prefixlength 0",
                "103:\tfrom all lookup 51820",
            ] {
                assert!(shown.contains(line), "{line:?} not in:\n{shown}");
            }
            for rule in &rules {
                delete_rule(rule).unwrap();
            }
            delete_rule(&by_source).unwrap();
            assert!(delete_rule(&by_source).is_err());
            let rest6 = Rule::all(true, 51820, 104);
            add_rule(&rest6).unwrap();
            assert!(ip(&["-6", "rule", "show"]).contains("104:\tfrom all lookup 51820"));
            delete_rule(&rest6).unwrap();
            let mixed = Rule {
                destination: Some("10.0.0.0/8".parse().unwrap()),
                ..Rule::all(true, 51820, 105)
            };
            assert_eq!(
                add_rule(&mixed).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        })
        .join()
        .unwrap();
    }
}
