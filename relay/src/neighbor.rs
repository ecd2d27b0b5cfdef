//! Answers the upstream router's neighbour discovery for the addresses handed to peers.
//!
//! When peer addresses come from the uplink's on-link IPv6 /64 (or an on-link IPv4
//! pool), the router resolves each of them with a Neighbor Solicitation (or an ARP
//! request) on the uplink before it delivers a packet. Those addresses are routed
//! into the TUN device, not configured on the uplink, so the kernel stays silent.
//! [`NeighborResponder`] answers instead, with the uplink's MAC, for every address
//! [`OwnedAddresses`] claims at that moment: allocation changes need no
//! reconfiguration, and no `proxy_ndp` sysctl or per-address proxy entries are
//! involved. With a routed prefix there is nothing to answer and the responder is
//! simply not started.
//!
//! # Sockets
//!
//! One `AF_PACKET`/`SOCK_RAW` socket per family, bound to the uplink and to one
//! ethertype (`ETH_P_IPV6`, `ETH_P_ARP`). Binding to an ethertype rather than
//! `ETH_P_ALL` keeps the sockets off the device's "tap everything" list: an
//! `ETH_P_ALL` socket is offered every frame, including every transmitted one (which
//! the kernel clones for it), whereas these are only offered received IPv6 and ARP
//! frames. A classic BPF filter (`ipv6_filter`, `arp_filter` below) then drops, in
//! the kernel and before any copy, everything except Neighbor Solicitations and ARP
//! requests, so a busy uplink costs a few BPF instructions per IPv6 frame and no
//! wake-ups. Answers are sent on the same socket, which transmits on the bound
//! interface.
//!
//! # Multicast
//!
//! A router resolves an address with a solicitation to its solicited-node group
//! ff02::1:ffXX:XXXX, i.e. to Ethernet `33:33:ff:XX:XX:XX`. A packet socket sees only
//! frames the NIC accepted, and the NIC's multicast filter holds just the groups the
//! kernel joined for the uplink's own addresses. Joining one group per allocated
//! address would mean tracking allocations here, and NIC filters hold a few dozen
//! entries before degrading to all-multicast anyway. So the IPv6 socket asks for
//! all-multicast reception (`PACKET_MR_ALLMULTI`). The membership belongs to the
//! socket: the kernel drops it when the socket closes, so not even a crash leaves
//! the uplink in all-multicast mode. Unsolicited multicast costs little: the IPv6
//! stack discards groups it did not join right away, and the filter keeps it from us.
//!
//! # Checksums
//!
//! A solicitation from a sender on the same host (the far end of a veth, a VM's
//! virtio device) may arrive with its ICMPv6 checksum still left for a NIC to fill
//! in; the kernel accepts it as is. The IPv6 socket asks for `PACKET_AUXDATA`, whose
//! `TP_STATUS_CSUMNOTREADY` tells such frames apart, and only for them is the
//! checksum not verified ([`RxChecksum`]). Without that word from the kernel every
//! checksum must verify.
//!
//! # Namespaces
//!
//! The sockets and the interface lookups act in the network namespace of the thread
//! calling [`NeighborResponder::start`].

use std::ffi::c_int;
use std::fmt;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sidecar::neighbor_reply::{arp_reply, neighbor_advertisement_with_checksum, RxChecksum};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The set of addresses the relay currently hands out, asked once per solicitation.
/// Implementations are called from the responder's task, so keep them fast and
/// non-blocking (a lock-free or briefly locked lookup).
pub trait OwnedAddresses: Send + Sync {
    /// Whether `addr` is allocated to a peer and reached through the relay.
    fn owns_v6(&self, addr: Ipv6Addr) -> bool;
    /// Whether `addr` is allocated to a peer and reached through the relay.
    fn owns_v4(&self, addr: Ipv4Addr) -> bool;
}

/// Counters since [`NeighborResponder::start`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NeighborStats {
    /// Neighbor Solicitations received (for any target).
    pub solicitations: u64,
    /// Neighbor Advertisements sent.
    pub answered: u64,
    /// ARP requests received (for any target).
    pub arp_requests: u64,
    /// ARP replies sent.
    pub arp_answered: u64,
    /// Replies the kernel refused to send (full queue, link down).
    pub send_errors: u64,
}

#[derive(Default)]
struct Counters {
    solicitations: AtomicU64,
    answered: AtomicU64,
    arp_requests: AtomicU64,
    arp_answered: AtomicU64,
    send_errors: AtomicU64,
}

/// Answers Neighbor Solicitations and ARP requests on the uplink for owned addresses.
///
/// Runs as tokio tasks until [`stop`](Self::stop) or drop.
pub struct NeighborResponder {
    uplink: String,
    mac: [u8; 6],
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
}

/// How much of a frame the kernel copies to us. A solicitation or ARP request is well
/// under 200 bytes; a longer frame is cut, fails to parse, and is ignored.
const SNAPLEN: usize = 1024;

/// The reply frames are 86 (NA) and 60 (ARP) bytes.
const REPLY_LEN: usize = 128;

/// Pause after an unexpected receive error so that a persistent one cannot spin.
const ERROR_BACKOFF: Duration = Duration::from_millis(250);

impl NeighborResponder {
    /// Starts answering on `uplink`: IPv6 Neighbor Solicitations if `v6`, ARP
    /// requests if `v4`, for the addresses `owned` claims.
    ///
    /// Must be called inside a tokio runtime with IO enabled. The sockets are opened
    /// in the calling thread's network namespace. Needs `CAP_NET_RAW`. Fails if the
    /// uplink does not exist or is not an Ethernet device, or if neither family is
    /// requested.
    pub fn start(
        uplink: &str,
        owned: Arc<dyn OwnedAddresses>,
        v6: bool,
        v4: bool,
    ) -> io::Result<NeighborResponder> {
        if !v6 && !v4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neighbour responder started with neither IPv6 nor IPv4",
            ));
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let ifindex = sidecar::route::interface_index(uplink)?;

        // Open everything before spawning anything, so a failure leaves nothing behind.
        let mut sockets = Vec::new();
        if v6 {
            let fd = packet_socket(ifindex, libc::ETH_P_IPV6, &ipv6_filter())?;
            join_all_multicast(&fd, ifindex)?;
            // See "Checksums" in the module documentation. ARP has no checksum.
            set_option(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &(1 as c_int))?;
            sockets.push((Family::V6, fd));
        }
        if v4 {
            let fd = packet_socket(ifindex, libc::ETH_P_ARP, &arp_filter())?;
            sockets.push((Family::V4, fd));
        }
        let mac = hardware_address(&sockets[0].1, uplink)?;
        let sockets = sockets
            .into_iter()
            .map(|(family, fd)| Ok((family, register(fd)?)))
            .collect::<io::Result<Vec<_>>>()?;

        let counters = Arc::new(Counters::default());
        let tasks = sockets
            .into_iter()
            .map(|(family, fd)| {
                runtime.spawn(serve(
                    fd,
                    family,
                    mac,
                    Arc::clone(&owned),
                    Arc::clone(&counters),
                ))
            })
            .collect();
        info!(
            uplink,
            ifindex,
            mac = %Mac(mac),
            ipv6 = v6,
            ipv4 = v4,
            "answering neighbour discovery for allocated addresses"
        );
        Ok(NeighborResponder {
            uplink: uplink.to_owned(),
            mac,
            counters,
            tasks,
        })
    }

    /// The uplink's name, as given to [`start`](Self::start).
    pub fn uplink(&self) -> &str {
        &self.uplink
    }

    /// The uplink's MAC address, which every answer advertises.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// All counters at once.
    pub fn stats(&self) -> NeighborStats {
        let c = &self.counters;
        NeighborStats {
            solicitations: c.solicitations.load(Ordering::Relaxed),
            answered: c.answered.load(Ordering::Relaxed),
            arp_requests: c.arp_requests.load(Ordering::Relaxed),
            arp_answered: c.arp_answered.load(Ordering::Relaxed),
            send_errors: c.send_errors.load(Ordering::Relaxed),
        }
    }

    /// Neighbor Solicitations received, for any target.
    pub fn solicitations(&self) -> u64 {
        self.counters.solicitations.load(Ordering::Relaxed)
    }

    /// Neighbor Advertisements sent.
    pub fn answered(&self) -> u64 {
        self.counters.answered.load(Ordering::Relaxed)
    }

    /// ARP requests received, for any target.
    pub fn arp_requests(&self) -> u64 {
        self.counters.arp_requests.load(Ordering::Relaxed)
    }

    /// ARP replies sent.
    pub fn arp_answered(&self) -> u64 {
        self.counters.arp_answered.load(Ordering::Relaxed)
    }

    /// Stops answering and waits until the sockets are closed (and with them the
    /// all-multicast membership). Dropping the responder also stops it, but the
    /// sockets then close whenever the runtime next gets to the aborted tasks.
    pub async fn stop(mut self) {
        for task in mem::take(&mut self.tasks) {
            task.abort();
            // The only possible error is the cancellation we just asked for.
            let _ = task.await;
        }
    }
}

impl Drop for NeighborResponder {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl fmt::Debug for NeighborResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NeighborResponder")
            .field("uplink", &self.uplink)
            .field("mac", &Mac(self.mac))
            .field("stats", &self.stats())
            .finish()
    }
}

#[derive(Clone, Copy, Debug)]
enum Family {
    V6,
    V4,
}

async fn serve(
    fd: AsyncFd<OwnedFd>,
    family: Family,
    mac: [u8; 6],
    owned: Arc<dyn OwnedAddresses>,
    counters: Arc<Counters>,
) {
    let mut frame = [0u8; SNAPLEN];
    let mut reply = [0u8; REPLY_LEN];
    loop {
        let (len, checksum) = match fd
            .async_io(Interest::READABLE, |sock| recv(sock, &mut frame))
            .await
        {
            Ok(received) => received,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                // Typically ENETDOWN, reported once when the uplink goes down; the
                // socket keeps working when it comes back.
                warn!(?family, error = %err, "neighbour responder: receive failed");
                tokio::time::sleep(ERROR_BACKOFF).await;
                continue;
            }
        };
        let frame = &frame[..len];

        // The kernel filter only lets solicitations (resp. ARP requests) through, so
        // every frame received counts as one.
        match family {
            Family::V6 => {
                counters.solicitations.fetch_add(1, Ordering::Relaxed);
                let Some(answer) = neighbor_advertisement_with_checksum(
                    frame,
                    checksum,
                    mac,
                    |a| owned.owns_v6(a),
                    &mut reply,
                ) else {
                    continue;
                };
                if transmit(fd.get_ref(), &reply[..answer.len], &counters) {
                    counters.answered.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        target_addr = %answer.target,
                        requester = %answer.requester,
                        to = %Mac(answer.to_mac),
                        "answered neighbor solicitation"
                    );
                }
            }
            Family::V4 => {
                counters.arp_requests.fetch_add(1, Ordering::Relaxed);
                let Some(answer) = arp_reply(frame, mac, |a| owned.owns_v4(a), &mut reply) else {
                    continue;
                };
                if transmit(fd.get_ref(), &reply[..answer.len], &counters) {
                    counters.arp_answered.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        target_addr = %answer.target,
                        requester = %answer.requester,
                        to = %Mac(answer.to_mac),
                        "answered ARP request"
                    );
                }
            }
        }
    }
}

fn register(sock: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd holds an open descriptor and moves into the AsyncFd, which
    // owns it until dropped; its as_raw_fd never changes.
    Ok(unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }?)
}

/// Sends one reply without waiting. A full transmit queue drops it instead of
/// stalling the receive loop: the router retransmits its solicitation within a
/// second, and by then the queue has drained.
fn transmit(sock: &OwnedFd, frame: &[u8], counters: &Counters) -> bool {
    // SAFETY: frame is valid for reads of frame.len() bytes for the whole call.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if n < 0 {
        let err = io::Error::last_os_error();
        counters.send_errors.fetch_add(1, Ordering::Relaxed);
        debug!(error = %err, "neighbour responder: send failed");
        return false;
    }
    true
}

/// Room for one `PACKET_AUXDATA` control message, the only one our sockets enable,
/// as a `u64` array so that it is aligned for `cmsghdr`.
const CONTROL_WORDS: usize = 8;

/// Receives one frame, with what the kernel says about its checksum (always
/// [`RxChecksum::Computed`] on a socket without `PACKET_AUXDATA`).
fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, RxChecksum)> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data, for which all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: msg points to one iovec covering buf and to the control buffer, all
    // valid for writes of the lengths given for the whole call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recvmsg succeeded, so msg describes control messages the kernel wrote
    // within the control buffer (msg_controllen was updated to their length).
    let status = unsafe { auxdata_status(&msg) };
    let checksum = match status {
        Some(status) if status & libc::TP_STATUS_CSUMNOTREADY != 0 => RxChecksum::NotReady,
        _ => RxChecksum::Computed,
    };
    // n is non-negative and at most buf.len().
    Ok((n as usize, checksum))
}

/// `tp_status` of the `PACKET_AUXDATA` message in `msg`, if there is one.
///
/// # Safety
///
/// `msg` must be a header filled in by a successful `recvmsg`.
unsafe fn auxdata_status(msg: &libc::msghdr) -> Option<u32> {
    // SAFETY (for the cmsg walk): the caller guarantees msg_control/msg_controllen
    // describe complete control messages the kernel wrote; CMSG_NXTHDR stops at
    // their end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR is in bounds.
        let hdr = unsafe { &*cmsg };
        let data_len = (hdr.cmsg_len as usize).saturating_sub(
            // SAFETY: CMSG_LEN is pure arithmetic.
            unsafe { libc::CMSG_LEN(0) } as usize,
        );
        if hdr.cmsg_level == libc::SOL_PACKET
            && hdr.cmsg_type == libc::PACKET_AUXDATA
            && data_len >= mem::size_of::<libc::tpacket_auxdata>()
        {
            // SAFETY: the message carries a whole tpacket_auxdata; the read is
            // unaligned because nothing promises CMSG_DATA's alignment for it.
            let aux: libc::tpacket_auxdata =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
            return Some(aux.tp_status);
        }
        // SAFETY: cmsg is a valid header within msg's control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

/// A nonblocking packet socket on `ifindex` for frames of `ethertype` that pass
/// `filter`.
fn packet_socket(
    ifindex: u32,
    ethertype: c_int,
    filter: &[libc::sock_filter],
) -> io::Result<OwnedFd> {
    // Protocol 0: the socket receives nothing until bind() names a protocol, so no
    // unfiltered frame can be queued before the filter is attached.
    // SAFETY: plain system call with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    let prog = libc::sock_fprog {
        len: filter.len().try_into().map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "packet filter is too long")
        })?,
        // The kernel copies the program during setsockopt and never writes to it.
        filter: filter.as_ptr().cast_mut(),
    };
    set_option(&sock, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)?;

    let addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (ethertype as u16).to_be(),
        sll_ifindex: ifindex as c_int,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_ll and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// See "Multicast" in the module documentation for why all-multicast.
fn join_all_multicast(sock: &OwnedFd, ifindex: u32) -> io::Result<()> {
    let mreq = libc::packet_mreq {
        mr_ifindex: ifindex as c_int,
        mr_type: libc::PACKET_MR_ALLMULTI as u16,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    set_option(sock, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mreq)
}

fn set_option<T>(sock: &OwnedFd, level: c_int, name: c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T, and the length passed is exactly its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The uplink's MAC, by `SIOCGIFHWADDR` on one of our sockets. An ioctl rather than
/// `/sys/class/net/NAME/address` because sysfs shows the namespace it was mounted in,
/// not necessarily the calling thread's.
fn hardware_address(sock: &OwnedFd, name: &str) -> io::Result<[u8; 6]> {
    // SAFETY: ifreq is plain old data, for which all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    // Leave room for the terminating NUL the zeroed buffer already provides.
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq with a NUL-terminated name; SIOCGIFHWADDR writes
    // only within it.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR as _, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a successful SIOCGIFHWADDR initialised the ifru_hwaddr member.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != libc::ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{name} is not an Ethernet device (hardware type {})",
                hw.sa_family
            ),
        ));
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data) {
        *dst = src as u8;
    }
    Ok(mac)
}

// ---- The kernel-side filters ----
//
// Classic BPF runs on each frame offered to the socket, with the accumulator loaded
// from absolute offsets into the frame (starting at the Ethernet header) or from
// "ancillary" fields of the kernel's packet metadata. It returns how many bytes to
// deliver; 0 drops the frame before it is copied or queued, and before it wakes us.
//
// Both programs are a list of checks, each "load a value; drop unless it is as
// expected", followed by `ret SNAPLEN` (accept) and `ret 0` (drop).

/// `skb->pkt_type`, read through the ancillary-data area.
const LOAD_PKTTYPE: (u16, u32) = (
    (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
    (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32,
);
const fn load_u8(offset: u32) -> (u16, u32) {
    ((libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16, offset)
}
const fn load_u16(offset: u32) -> (u16, u32) {
    ((libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16, offset)
}

/// Packet types we may answer: PACKET_HOST (0), PACKET_BROADCAST (1) and
/// PACKET_MULTICAST (2). Above that are PACKET_OTHERHOST (unicast to another MAC,
/// seen when something put the uplink in promiscuous mode, or a foreign VLAN) and
/// PACKET_OUTGOING/PACKET_LOOPBACK (our own transmissions).
const MAX_PKTTYPE: u32 = 2;

/// Offsets into an untagged Ethernet frame.
const ETHERTYPE_AT: u32 = 12;
const IPV6_NEXT_HEADER_AT: u32 = 14 + 6;
const IPV6_HOP_LIMIT_AT: u32 = 14 + 7;
const ICMPV6_TYPE_AT: u32 = 14 + 40;
const ARP_OPERATION_AT: u32 = 14 + 6;

#[derive(Clone, Copy)]
enum Expect {
    Equal(u32),
    AtMost(u32),
}

/// The IPv6 socket's filter, 12 instructions:
///
/// ```text
///  0  ld   #pkttype          ; host, broadcast or multicast only
///  1  jgt  #2, drop
///  2  ldh  [12]              ; ethertype IPv6
///  3  jeq  #0x86dd, 4, drop
///  4  ldb  [20]              ; next header ICMPv6 (no extension headers)
///  5  jeq  #58, 6, drop
///  6  ldb  [21]              ; hop limit 255: on-link NDP only
///  7  jeq  #255, 8, drop
///  8  ldb  [54]              ; ICMPv6 type Neighbor Solicitation
///  9  jeq  #135, accept, drop
/// 10  accept: ret #SNAPLEN
/// 11  drop:   ret #0
/// ```
///
/// Checksum, code, target and options are validated in userspace
/// ([`sidecar::neighbor_reply`]); the filter only has to keep everything else away.
fn ipv6_filter() -> Vec<libc::sock_filter> {
    program(&[
        (LOAD_PKTTYPE, Expect::AtMost(MAX_PKTTYPE)),
        (
            load_u16(ETHERTYPE_AT),
            Expect::Equal(libc::ETH_P_IPV6 as u32),
        ),
        (load_u8(IPV6_NEXT_HEADER_AT), Expect::Equal(58)),
        (load_u8(IPV6_HOP_LIMIT_AT), Expect::Equal(255)),
        (load_u8(ICMPV6_TYPE_AT), Expect::Equal(135)),
    ])
}

/// The ARP socket's filter: host/broadcast/multicast, ethertype ARP, operation 1
/// (request); 8 instructions, laid out like `ipv6_filter`.
fn arp_filter() -> Vec<libc::sock_filter> {
    program(&[
        (LOAD_PKTTYPE, Expect::AtMost(MAX_PKTTYPE)),
        (
            load_u16(ETHERTYPE_AT),
            Expect::Equal(libc::ETH_P_ARP as u32),
        ),
        (load_u16(ARP_OPERATION_AT), Expect::Equal(1)),
    ])
}

fn program(checks: &[((u16, u32), Expect)]) -> Vec<libc::sock_filter> {
    let drop_at = 2 * checks.len() + 1;
    let mut prog = Vec::with_capacity(drop_at + 1);
    for &((code, k), expect) in checks {
        prog.push(insn(code, 0, 0, k));
        // Jump offsets count from the next instruction; the checks are few enough
        // that the distance to the final `ret #0` always fits in a u8.
        let to_drop = (drop_at - prog.len() - 1) as u8;
        prog.push(match expect {
            Expect::Equal(v) => insn(jump(libc::BPF_JEQ), 0, to_drop, v),
            Expect::AtMost(v) => insn(jump(libc::BPF_JGT), to_drop, 0, v),
        });
    }
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    prog.push(insn(ret, 0, 0, SNAPLEN as u32));
    prog.push(insn(ret, 0, 0, 0));
    prog
}

const fn jump(op: u32) -> u16 {
    (libc::BPF_JMP | op | libc::BPF_K) as u16
}

const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Formats a MAC the usual way for logs.
struct Mac([u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKET_HOST: u32 = 0;
    const PACKET_BROADCAST: u32 = 1;
    const PACKET_MULTICAST: u32 = 2;
    const PACKET_OTHERHOST: u32 = 3;
    const PACKET_OUTGOING: u32 = 4;

    /// A classic BPF interpreter for the instructions our programs use, with the
    /// kernel's semantics: a load beyond the frame drops it.
    fn run(prog: &[libc::sock_filter], frame: &[u8], pkttype: u32) -> u32 {
        let mut pc = 0;
        let mut acc: u32 = 0;
        loop {
            let i = prog[pc];
            pc += 1;
            let class = u32::from(i.code) & 0x07;
            match class {
                c if c == libc::BPF_LD => {
                    assert_eq!(
                        u32::from(i.code) & 0xe0,
                        libc::BPF_ABS,
                        "only absolute loads"
                    );
                    if i.k == (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32 {
                        acc = pkttype;
                        continue;
                    }
                    let size = match u32::from(i.code) & 0x18 {
                        s if s == libc::BPF_B => 1,
                        s if s == libc::BPF_H => 2,
                        s if s == libc::BPF_W => 4,
                        s => panic!("size {s}"),
                    };
                    let at = i.k as usize;
                    let Some(bytes) = frame.get(at..at + size) else {
                        return 0;
                    };
                    acc = bytes.iter().fold(0, |a, &b| a << 8 | u32::from(b));
                }
                c if c == libc::BPF_JMP => {
                    let taken = match u32::from(i.code) & 0xf0 {
                        o if o == libc::BPF_JEQ => acc == i.k,
                        o if o == libc::BPF_JGT => acc > i.k,
                        o => panic!("jump op {o}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c if c == libc::BPF_RET => return i.k,
                c => panic!("class {c}"),
            }
            assert!(pc < prog.len(), "ran off the end of the program");
        }
    }

    /// A Neighbor Solicitation Linux sent for 2001:db8:1::abcd (see the root crate's
    /// tests/neighbor_reply.rs).
    fn ns() -> Vec<u8> {
        hex(
            "3333ff00abcd02000000000186dd6000000000203aff20010db8000100000000000000000001\
             ff0200000000000000000001ff00abcd8700c48d0000000020010db800010000000000000000\
             abcd0101020000000001",
        )
    }

    fn arp_request() -> Vec<u8> {
        hex(
            "ffffffffffff02000000000108060001080006040001020000000001c0000201000000000000\
             c000024d",
        )
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn ipv6_filter_accepts_only_received_solicitations() {
        let prog = ipv6_filter();
        assert_eq!(prog.len(), 12);
        for pkttype in [PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST] {
            assert_eq!(run(&prog, &ns(), pkttype), SNAPLEN as u32);
        }
        for pkttype in [PACKET_OTHERHOST, PACKET_OUTGOING, 5] {
            assert_eq!(run(&prog, &ns(), pkttype), 0, "pkttype {pkttype}");
        }

        let mutations: [(&str, usize, u8); 5] = [
            ("advertisement", 54, 136),
            ("echo request", 54, 128),
            ("router solicitation", 54, 133),
            ("forwarded (hop limit 254)", 21, 254),
            ("hop-by-hop header first", 20, 0),
        ];
        for (what, at, value) in mutations {
            let mut frame = ns();
            frame[at] = value;
            assert_eq!(run(&prog, &frame, PACKET_MULTICAST), 0, "{what}");
        }
        let mut ipv4 = ns();
        ipv4[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(run(&prog, &ipv4, PACKET_HOST), 0, "ethertype");
        for len in 0..=54 {
            assert_eq!(
                run(&prog, &ns()[..len], PACKET_HOST),
                0,
                "truncated to {len}"
            );
        }
        assert_eq!(run(&prog, &arp_request(), PACKET_BROADCAST), 0);
    }

    #[test]
    fn arp_filter_accepts_only_received_requests() {
        let prog = arp_filter();
        assert_eq!(prog.len(), 8);
        for pkttype in [PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST] {
            assert_eq!(run(&prog, &arp_request(), pkttype), SNAPLEN as u32);
        }
        for pkttype in [PACKET_OTHERHOST, PACKET_OUTGOING] {
            assert_eq!(run(&prog, &arp_request(), pkttype), 0);
        }
        let mut reply = arp_request();
        reply[21] = 2;
        assert_eq!(run(&prog, &reply, PACKET_HOST), 0, "reply");
        assert_eq!(run(&prog, &ns(), PACKET_MULTICAST), 0, "not ARP");
        assert_eq!(run(&prog, &arp_request()[..21], PACKET_BROADCAST), 0);
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(
            Mac([0x02, 0, 0x5e, 0x10, 0xab, 0xff]).to_string(),
            "02:00:5e:10:ab:ff"
        );
    }
}
