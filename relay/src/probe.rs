//! Whether the relay itself can reach a peer's address through its data path: an
//! ICMPv6 echo request from the relay's own probe address, sent into the kernel
//! like any packet from the internet (so it takes the peer's route into the TUN
//! device, the tenant policy and the tunnel), and the reply caught on its way out of
//! the tunnel before it would reach the kernel.
//!
//! The probe address is `::fe` of the peers' prefix, one of the addresses the plan
//! reserves for the relay, so no peer is ever given it. Everything addressed to it
//! coming out of the tunnel is taken here and never forwarded: a peer cannot use
//! it to reach anything.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sidecar::driver::Link;
use sidecar::tun::{TunDevice, TunReader, TunWriter};
use sidecar::IpPrefix;
use tokio::sync::oneshot;

/// How long a probe's answer is reused, so polling by-container does not flood peers.
pub const CACHE_FOR: Duration = Duration::from_secs(5);
/// Echo requests per probe, and how long each waits for its reply.
const ATTEMPTS: usize = 3;
const WAIT: Duration = Duration::from_millis(300);
/// Probes waiting for a reply at once, at most (the API is rate limited already;
/// this bounds what a burst can hold).
const MAX_WAITING: usize = 1024;
const CACHE_MAX: usize = 65_536;

/// The low bits of the probe address within the prefix.
const PROBE_HOST: u128 = 0xfe;

/// Sends echo requests and matches their replies.
pub struct Prober {
    socket: OwnedFd,
    replies: Replies,
    seq: AtomicU16,
    cache: Mutex<HashMap<Ipv6Addr, (Instant, bool)>>,
}

/// The probes waiting for replies, and how a reply is recognised.
struct Replies {
    source: Ipv6Addr,
    ident: u16,
    waiting: Mutex<HashMap<u16, oneshot::Sender<()>>>,
}

impl Replies {
    fn new(source: Ipv6Addr, ident: u16) -> Replies {
        Replies {
            source,
            ident,
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// See [`Prober::intercept`].
    fn intercept(&self, packet: &[u8]) -> bool {
        if packet.len() < 40 || packet[0] >> 4 != 6 || packet[24..40] != self.source.octets() {
            return false;
        }
        // An echo reply right after the fixed header, with our identifier.
        if packet.len() >= 48
            && packet[6] == 58
            && packet[40] == 129
            && u16::from_be_bytes([packet[44], packet[45]]) == self.ident
        {
            let seq = u16::from_be_bytes([packet[46], packet[47]]);
            if let Some(tx) = self.waiting.lock().remove(&seq) {
                let _ = tx.send(());
            }
        }
        true
    }
}

impl Prober {
    /// A prober sending from `::fe` of `prefix`. Needs CAP_NET_RAW.
    pub fn new(prefix: IpPrefix) -> io::Result<Arc<Prober>> {
        let IpAddr::V6(base) = prefix.network().addr() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the probe needs an IPv6 prefix",
            ));
        };
        let source = Ipv6Addr::from(u128::from(base) | PROBE_HOST);
        // IPPROTO_RAW: the packet carries its own IPv6 header, so its source can be
        // the probe address, which no interface holds.
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET6,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ident = [0u8; 2];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut ident);
        Ok(Arc::new(Prober {
            socket,
            replies: Replies::new(source, u16::from_be_bytes(ident)),
            seq: AtomicU16::new(0),
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// The address echo requests come from.
    pub fn source(&self) -> Ipv6Addr {
        self.replies.source
    }

    /// Whether `dst` answers an echo request through the tunnel (a cached answer
    /// when one is younger than [`CACHE_FOR`]).
    pub async fn reachable(&self, dst: Ipv6Addr) -> bool {
        if let Some((at, ok)) = self.cache.lock().get(&dst).copied() {
            if at.elapsed() < CACHE_FOR {
                return ok;
            }
        }
        let mut ok = false;
        for _ in 0..ATTEMPTS {
            if self.echo(dst).await {
                ok = true;
                break;
            }
        }
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
        }
        cache.insert(dst, (Instant::now(), ok));
        ok
    }

    async fn echo(&self, dst: Ipv6Addr) -> bool {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.replies.waiting.lock();
            if waiting.len() >= MAX_WAITING {
                return false;
            }
            waiting.insert(seq, tx);
        }
        let packet = echo_request(self.replies.source, dst, self.replies.ident, seq);
        let sent = self.send(dst, &packet);
        let ok = match sent {
            Ok(()) => tokio::time::timeout(WAIT, rx)
                .await
                .is_ok_and(|r| r.is_ok()),
            Err(e) => {
                tracing::debug!(%dst, error = %e, "cannot send the echo probe");
                false
            }
        };
        self.replies.waiting.lock().remove(&seq);
        ok
    }

    fn send(&self, dst: Ipv6Addr, packet: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_in6 is valid; the fields set below make it
        // the destination.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = dst.octets();
        // SAFETY: buffer and address are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sa as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Looks at a packet leaving the tunnel towards the kernel; `true` when it is
    /// addressed to the probe address (then it is ours, and must not be written).
    pub fn intercept(&self, packet: &[u8]) -> bool {
        self.replies.intercept(packet)
    }
}

/// An IPv6 packet holding an ICMPv6 echo request, checksum filled in.
fn echo_request(src: Ipv6Addr, dst: Ipv6Addr, ident: u16, seq: u16) -> Vec<u8> {
    const PAYLOAD: &[u8] = b"sidecar-relay-probe";
    let icmp_len = 8 + PAYLOAD.len();
    let mut p = vec![0u8; 40 + icmp_len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    p[6] = 58; // ICMPv6
    p[7] = 64; // hop limit
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40] = 128; // echo request
    p[44..46].copy_from_slice(&ident.to_be_bytes());
    p[46..48].copy_from_slice(&seq.to_be_bytes());
    p[48..].copy_from_slice(PAYLOAD);
    let sum = icmpv6_checksum(&src, &dst, &p[40..]);
    p[42..44].copy_from_slice(&sum.to_be_bytes());
    p
}

fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The relay's TUN device with the probe's replies taken out of what is written to
/// it. Reads pass through untouched.
pub struct ProbeLink {
    tun: TunDevice,
    prober: Arc<Prober>,
}

impl ProbeLink {
    pub fn new(tun: TunDevice, prober: Arc<Prober>) -> ProbeLink {
        ProbeLink { tun, prober }
    }
}

impl Link for ProbeLink {
    type Reader = TunReader;
    type Writer = TunWriter;

    fn name(&self) -> &str {
        Link::name(&self.tun)
    }

    fn mtu(&self) -> u16 {
        Link::mtu(&self.tun)
    }

    fn offload(&self) -> bool {
        Link::offload(&self.tun)
    }

    fn reader(&self) -> TunReader {
        Link::reader(&self.tun)
    }

    fn writer(&self) -> TunWriter {
        Link::writer(&self.tun)
    }

    async fn read(&self, reader: &mut TunReader) -> io::Result<usize> {
        Link::read(&self.tun, reader).await
    }

    fn packet(reader: &TunReader, i: usize) -> &[u8] {
        <TunDevice as Link>::packet(reader, i)
    }

    fn slot(writer: &mut TunWriter, len: usize) -> &mut [u8] {
        <TunDevice as Link>::slot(writer, len)
    }

    async fn commit(&self, writer: &mut TunWriter, start: usize, len: usize) -> io::Result<()> {
        if self.prober.intercept(writer.uncommitted(start, len)) {
            // Not committed: the slot is reused by the next packet.
            return Ok(());
        }
        Link::commit(&self.tun, writer, start, len).await
    }

    async fn flush(&self, writer: &mut TunWriter) -> io::Result<()> {
        Link::flush(&self.tun, writer).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let src: Ipv6Addr = "2001:db8::fe".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::1234".parse().unwrap();
        let p = echo_request(src, dst, 0x1234, 7);
        // Summing a packet with its checksum in place gives all ones (0 after !).
        assert_eq!(icmpv6_checksum(&src, &dst, &p[40..]), 0);
        assert_eq!(p[40], 128);
        assert_eq!(&p[44..48], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn only_packets_to_the_probe_address_are_taken() {
        let source: Ipv6Addr = "2001:db8:1::fe".parse().unwrap();
        let replies = Replies::new(source, 0x4242);
        let peer: Ipv6Addr = "2001:db8:1::99".parse().unwrap();
        let mut reply = echo_request(peer, source, 0x4242, 3);
        reply[40] = 129;
        let (tx, mut rx) = oneshot::channel();
        replies.waiting.lock().insert(3, tx);
        assert!(replies.intercept(&reply));
        assert!(rx.try_recv().is_ok(), "the waiting probe is told");
        let mut stranger = reply.clone();
        stranger[44] = 0;
        assert!(
            replies.intercept(&stranger),
            "anything to the probe address is kept from the kernel"
        );
        let elsewhere = echo_request(source, peer, 1, 1);
        assert!(!replies.intercept(&elsewhere), "traffic to a peer passes");
        assert!(!replies.intercept(&[0x45; 20]), "IPv4 passes");
    }
}
