//! UDP flows, kept outside smoltcp.
//!
//! A smoltcp UDP socket must be bound to one port, and accepting every port would mean
//! a socket per port plus a second table mapping clients to upstream sockets. A flow
//! here is just that mapping: the client's endpoint and our public endpoint on one
//! side, a connected kernel socket on the other. Datagrams are parsed and built with
//! `smoltcp::wire`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::task::{Context, Poll};
use std::time::Instant;

use smoltcp::wire::IpEndpoint;
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;

use super::device::TxQueue;
use super::packet;
use super::wake::FlowWake;

/// Datagrams taken from one upstream socket per round, so a chatty flow cannot starve
/// the others.
const BATCH: usize = 64;

pub(super) struct UdpFlow {
    /// (our public endpoint, the client's endpoint)
    pub(super) key: (IpEndpoint, IpEndpoint),
    pub(super) wake: FlowWake,
    socket: UdpSocket,
    pub(super) last_active: Instant,
}

/// What happened to the datagrams of one service round.
#[derive(Debug, Default)]
pub(super) struct Delivery {
    pub(super) dropped: u64,
}

impl UdpFlow {
    pub(super) fn open(
        key: (IpEndpoint, IpEndpoint),
        target: SocketAddr,
        wake: FlowWake,
        now: Instant,
    ) -> io::Result<UdpFlow> {
        let any: SocketAddr = match target {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = std::net::UdpSocket::bind(any)?;
        // Connected, so the kernel filters out datagrams from anyone but the target.
        socket.connect(target)?;
        socket.set_nonblocking(true)?;
        Ok(UdpFlow {
            key,
            wake,
            socket: UdpSocket::from_std(socket)?,
            last_active: now,
        })
    }

    /// Forwards one datagram from the client; false when it had to be dropped.
    pub(super) fn send(&mut self, payload: &[u8], now: Instant) -> bool {
        self.last_active = now;
        // A plain send(2): tokio's `try_send` would refuse until the reactor has seen
        // the new socket become writable, dropping a flow's first datagrams.
        let socket = socket2::SockRef::from(&self.socket);
        match socket.send(payload) {
            Ok(_) => true,
            // An earlier datagram drew an ICMP error, which Linux reports once on the
            // next call; this datagram has not been sent yet.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => socket.send(payload).is_ok(),
            Err(_) => false,
        }
    }

    /// Turns the container's replies into packets from our public endpoint to the client.
    pub(super) fn service(&mut self, tx: &mut TxQueue, mtu: usize, now: Instant) -> Delivery {
        let mut delivery = Delivery::default();
        let (local, remote) = self.key;
        let header = packet::udp_header_len(&local.addr);
        let max_payload = mtu.saturating_sub(header);
        let mut cx = Context::from_waker(self.wake.waker());
        for _ in 0..BATCH {
            // One byte of slack tells a datagram that fits from one that was truncated.
            let mut packet = vec![0; header + max_payload + 1];
            let mut buf = ReadBuf::new(&mut packet[header..]);
            match self.socket.poll_recv(&mut cx, &mut buf) {
                Poll::Pending => return delivery,
                // ICMP errors for earlier datagrams; the next read may well succeed.
                Poll::Ready(Err(_)) => continue,
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    self.last_active = now;
                    if n > max_payload {
                        delivery.dropped += 1;
                        continue;
                    }
                    packet.truncate(header + n);
                    packet::emit_udp_headers(&mut packet, local, remote);
                    if !tx.push(packet) {
                        delivery.dropped += 1;
                    }
                }
            }
        }
        // More may be waiting: come back next round.
        self.wake.wake();
        delivery
    }
}
