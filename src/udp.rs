//! The WireGuard UDP socket with batched I/O: `recvmmsg` with UDP GRO on receive and
//! UDP GSO on send where the kernel offers them (quinn-udp does the cmsg work), so
//! one system call moves a whole TCP window's worth of datagrams.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// How many datagrams one receive call can return (before GRO coalescing).
pub const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;

/// The largest datagram the kernel coalesces or segments in one go.
pub const MAX_GSO_BYTES: usize = 65_000;

/// Send buffer requested (the kernel caps it at net.core.wmem_max): room for several
/// GSO batches, so a batch never waits for the previous one to leave.
const SEND_BUFFER: usize = 4 << 20;

/// Receive buffer requested (the kernel doubles it for its own bookkeeping). Decrypting
/// is a little slower than the wire, so whatever this holds fills up under a bulk TCP
/// stream and every other packet, a ping or a handshake, waits behind it: 4 MiB here
/// held about 2.9 MB and added 15-60 ms to a ping under load. About a millisecond of
/// traffic at our decryption rate absorbs a burst of GSO batches and lets TCP see loss
/// early, as it does through the kernel's own default. Measured on a quiet machine:
/// loaded ping 3.5 -> 1.9 ms (p99 8.3 -> 5.7) for 17% less single-stream TCP.
const RECV_BUFFER: usize = 256 << 10;

pub struct UdpTransport {
    socket: UdpSocket,
    state: UdpSocketState,
    /// A dual-stack IPv6 socket wants IPv4 destinations in mapped form.
    dual_stack: bool,
    /// GSO and GRO are in use (see [`crate::tun::OFFLOAD_ENV`]).
    offload: bool,
    /// quinn-udp's GSO segment count as found at bind. Kept here because quinn-udp
    /// turns GSO off for good after any EINVAL, and the driver also gets EINVAL for
    /// causes of its own (a source address that went away, a segment larger than the
    /// path's MTU), which it handles without giving GSO up.
    gso_segments: usize,
}

impl UdpTransport {
    /// Binds `port` (0 = any) on all addresses: a dual-stack socket where IPv6 is
    /// available, an IPv4 one where it is not.
    pub fn bind(port: u16) -> io::Result<UdpTransport> {
        match Self::bind_addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)) {
            Ok(t) => Ok(t),
            Err(e) if is_no_ipv6(&e) => {
                tracing::info!("IPv6 is not available here; listening on IPv4 only");
                Self::bind_addr(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port))
            }
            Err(e) => Err(e),
        }
    }

    fn bind_addr(addr: SocketAddr) -> io::Result<UdpTransport> {
        let domain = socket2::Domain::for_address(addr);
        let sock =
            socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        let dual_stack = addr.is_ipv6();
        if dual_stack {
            sock.set_only_v6(false)?;
        }
        sock.set_nonblocking(true)?;
        sock.bind(&addr.into())?;
        // Best effort: the kernel may cap either.
        let _ = sock.set_recv_buffer_size(RECV_BUFFER);
        let _ = sock.set_send_buffer_size(SEND_BUFFER);
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        allow_fragmentation(&sock, dual_stack)?;
        let offload = crate::tun::offloads_allowed();
        if !offload {
            // quinn-udp turned GRO on where the kernel has it; receive one datagram
            // per buffer instead. (GSO is off by never asking for segments.)
            set_int_option(&sock, libc::SOL_UDP, libc::UDP_GRO, 0)?;
        }
        let socket = UdpSocket::from_std(sock.into())?;
        let gso_segments = state.max_gso_segments();
        Ok(UdpTransport {
            socket,
            state,
            dual_stack,
            offload,
            gso_segments,
        })
    }

    /// Marks every packet the socket sends with `mark` (`SO_MARK`; 0 clears it), for
    /// policy routing that keeps the tunnel's own traffic out of the tunnel.
    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.socket).set_mark(mark)
    }

    /// The socket's `SO_MARK`.
    pub fn fwmark(&self) -> io::Result<u32> {
        socket2::SockRef::from(&self.socket).mark()
    }

    pub fn local_port(&self) -> u16 {
        self.socket.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// How many datagrams one send may carry as a GSO batch (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        if self.offload {
            self.gso_segments
        } else {
            1
        }
    }

    /// How many datagrams one receive may coalesce with GRO (1 without GRO).
    pub fn gro_segments(&self) -> usize {
        if self.offload {
            self.state.gro_segments()
        } else {
            1
        }
    }

    /// Receives a batch. Each `meta[i]` describes `bufs[i]`: `len` bytes that are
    /// `stride`-sized datagrams back to back (GRO), all from `addr` to our `dst_ip`.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            self.socket.readable().await?;
            match self.socket.try_io(Interest::READABLE, || {
                self.state.recv(UdpSockRef::from(&self.socket), bufs, meta)
            }) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `contents` to `to`: one datagram, or with `segment_size` several of that
    /// size back to back (the last may be shorter), in one system call. `src` is the
    /// local address to send from (`IP_PKTINFO`/`IPV6_PKTINFO`), in the form
    /// [`UdpTransport::recv`] reported it; `None` lets the kernel choose. A source
    /// that is no longer ours fails with `EINVAL` or `EADDRNOTAVAIL`.
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
        src: Option<IpAddr>,
    ) -> io::Result<()> {
        let destination = self.map(to);
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size,
            src_ip: src,
        };
        loop {
            self.socket.writable().await?;
            match self.socket.try_io(Interest::WRITABLE, || {
                self.state
                    .try_send(UdpSockRef::from(&self.socket), &transmit)
            }) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn map(&self, to: SocketAddr) -> SocketAddr {
        match to {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        }
    }
}

/// Undoes quinn-udp's ban on fragmentation (it sets `IP_PMTUDISC_PROBE` and
/// `IPV6_DONTFRAG`, which QUIC wants): a WireGuard interface may have a larger MTU
/// than the path, and its datagrams must then leave in fragments as they do from
/// kernel WireGuard and wireguard-go, not fail with `EMSGSIZE`.
fn allow_fragmentation(sock: &socket2::Socket, ipv6: bool) -> io::Result<()> {
    set_int_option(
        sock,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    )?;
    if ipv6 {
        set_int_option(
            sock,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DONT,
        )?;
        set_int_option(sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)?;
    }
    Ok(())
}

fn is_no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL) | Some(libc::EPROTONOSUPPORT)
    )
}

fn set_int_option(
    sock: &socket2::Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
