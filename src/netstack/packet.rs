//! Looking at inbound packets before smoltcp does, and building the replies smoltcp
//! does not: UDP (handled outside smoltcp, see the driver) and echo replies (smoltcp's
//! `auto-icmp-echo-reply` feature is not enabled in this build).

use std::ops::Range;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv4Repr, Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpAddress,
    IpEndpoint, IpProtocol, IpRepr, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpPacket, TcpRepr,
    UdpPacket, UdpRepr, IPV4_HEADER_LEN, IPV6_HEADER_LEN, UDP_HEADER_LEN,
};

/// Hop limit of the packets we originate (Linux's default).
const HOP_LIMIT: u8 = 64;

/// The packet fails to parse or its checksum is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

impl From<smoltcp::wire::Error> for Malformed {
    fn from(_: smoltcp::wire::Error) -> Malformed {
        Malformed
    }
}

/// The parts of a TCP segment the driver acts on before smoltcp sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSegment {
    pub local: IpEndpoint,
    pub remote: IpEndpoint,
    /// A connection request: SYN without ACK or RST, checksum verified.
    pub opens: bool,
    pub rst: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Tcp(TcpSegment),
    Udp {
        local: IpEndpoint,
        remote: IpEndpoint,
        /// Where the datagram's payload sits in the packet.
        payload: Range<usize>,
    },
    /// An echo request, with the complete reply packet.
    Echo(Vec<u8>),
    /// Well-formed but not for us to handle.
    Unsupported,
}

/// Parses the IP and transport headers of a packet from the tunnel.
pub fn classify(packet: &[u8], is_ours: impl Fn(&IpAddress) -> bool) -> Result<Inbound, Malformed> {
    let caps = ChecksumCapabilities::default();
    let (ip, offset) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let p = Ipv4Packet::new_checked(packet)?;
            // Without reassembly a fragment is of no use; smoltcp drops them too.
            if p.more_frags() || p.frag_offset() != 0 {
                return Ok(Inbound::Unsupported);
            }
            (
                IpRepr::Ipv4(Ipv4Repr::parse(&p, &caps)?),
                usize::from(p.header_len()),
            )
        }
        Some(6) => {
            let p = Ipv6Packet::new_checked(packet)?;
            (IpRepr::Ipv6(Ipv6Repr::parse(&p)?), IPV6_HEADER_LEN)
        }
        _ => return Err(Malformed),
    };
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    if !is_ours(&dst) {
        return Ok(Inbound::Unsupported);
    }
    // Nothing we send may go to a broadcast, multicast or unspecified address.
    if !src.is_unicast() {
        return Err(Malformed);
    }
    let end = offset + ip.payload_len();
    let payload = packet.get(offset..end).ok_or(Malformed)?;

    let protocol = ip.next_header();
    match (ip, protocol) {
        (_, IpProtocol::Tcp) => {
            let tcp = TcpPacket::new_checked(payload)?;
            let opens = tcp.syn() && !tcp.ack() && !tcp.rst();
            if opens {
                // A new connection costs a socket and an upstream connect: check the
                // whole segment first, not just its flags.
                TcpRepr::parse(&tcp, &src, &dst, &caps)?;
                if tcp.src_port() == 0 || tcp.dst_port() == 0 {
                    return Err(Malformed);
                }
            }
            Ok(Inbound::Tcp(TcpSegment {
                local: IpEndpoint::new(dst, tcp.dst_port()),
                remote: IpEndpoint::new(src, tcp.src_port()),
                opens,
                rst: tcp.rst(),
            }))
        }
        (_, IpProtocol::Udp) => {
            let udp = UdpPacket::new_checked(payload)?;
            let repr = UdpRepr::parse(&udp, &src, &dst, &caps)?;
            if repr.src_port == 0 {
                // Nowhere to send a reply.
                return Ok(Inbound::Unsupported);
            }
            let start = offset + UDP_HEADER_LEN;
            Ok(Inbound::Udp {
                local: IpEndpoint::new(dst, repr.dst_port),
                remote: IpEndpoint::new(src, repr.src_port),
                payload: start..offset + usize::from(udp.len()),
            })
        }
        (IpRepr::Ipv4(ip), IpProtocol::Icmp) => echo_v4(&ip, payload, &caps),
        (IpRepr::Ipv6(ip), IpProtocol::Icmpv6) => echo_v6(&ip, payload, &caps),
        _ => Ok(Inbound::Unsupported),
    }
}

fn echo_v4(
    ip: &Ipv4Repr,
    payload: &[u8],
    caps: &ChecksumCapabilities,
) -> Result<Inbound, Malformed> {
    let icmp = Icmpv4Packet::new_checked(payload)?;
    if icmp.msg_type() != Icmpv4Message::EchoRequest {
        return Ok(Inbound::Unsupported);
    }
    let Icmpv4Repr::EchoRequest {
        ident,
        seq_no,
        data,
    } = Icmpv4Repr::parse(&icmp, caps)?
    else {
        return Err(Malformed);
    };
    let reply = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    let reply_ip = Ipv4Repr {
        src_addr: ip.dst_addr,
        dst_addr: ip.src_addr,
        next_header: IpProtocol::Icmp,
        payload_len: reply.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let mut out = vec![0; IPV4_HEADER_LEN + reply.buffer_len()];
    reply_ip.emit(&mut Ipv4Packet::new_unchecked(&mut out[..]), caps);
    reply.emit(
        &mut Icmpv4Packet::new_unchecked(&mut out[IPV4_HEADER_LEN..]),
        caps,
    );
    Ok(Inbound::Echo(out))
}

fn echo_v6(
    ip: &Ipv6Repr,
    payload: &[u8],
    caps: &ChecksumCapabilities,
) -> Result<Inbound, Malformed> {
    let icmp = Icmpv6Packet::new_checked(payload)?;
    if icmp.msg_type() != Icmpv6Message::EchoRequest {
        return Ok(Inbound::Unsupported);
    }
    let Icmpv6Repr::EchoRequest {
        ident,
        seq_no,
        data,
    } = Icmpv6Repr::parse(&ip.src_addr, &ip.dst_addr, &icmp, caps)?
    else {
        return Err(Malformed);
    };
    let reply = Icmpv6Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    let reply_ip = Ipv6Repr {
        src_addr: ip.dst_addr,
        dst_addr: ip.src_addr,
        next_header: IpProtocol::Icmpv6,
        payload_len: reply.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let mut out = vec![0; IPV6_HEADER_LEN + reply.buffer_len()];
    reply_ip.emit(&mut Ipv6Packet::new_unchecked(&mut out[..]));
    reply.emit(
        &reply_ip.src_addr,
        &reply_ip.dst_addr,
        &mut Icmpv6Packet::new_unchecked(&mut out[IPV6_HEADER_LEN..]),
        caps,
    );
    Ok(Inbound::Echo(out))
}

/// Bytes of IP and UDP header in front of a datagram from `addr`'s family.
pub(super) fn udp_header_len(addr: &IpAddress) -> usize {
    let ip = match addr {
        IpAddress::Ipv4(_) => IPV4_HEADER_LEN,
        IpAddress::Ipv6(_) => IPV6_HEADER_LEN,
    };
    ip + UDP_HEADER_LEN
}

/// Completes a UDP packet from `local` to `remote` whose payload already sits at
/// `packet[udp_header_len(..)..]`, so the datagram is received straight into place.
pub(super) fn emit_udp_headers(packet: &mut [u8], local: IpEndpoint, remote: IpEndpoint) {
    let caps = ChecksumCapabilities::default();
    let header_len = udp_header_len(&local.addr);
    let payload_len = packet.len() - header_len;
    let ip = IpRepr::new(
        local.addr,
        remote.addr,
        IpProtocol::Udp,
        UDP_HEADER_LEN + payload_len,
        HOP_LIMIT,
    );
    let ip_len = ip.header_len();
    ip.emit(&mut *packet, &caps);
    let udp = UdpRepr {
        src_port: local.port,
        dst_port: remote.port,
    };
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut packet[ip_len..]),
        &local.addr,
        &remote.addr,
        payload_len,
        |_| {},
        &caps,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Ipv4Address, Ipv6Address};

    const OURS_V4: Ipv4Address = Ipv4Address::new(192, 0, 2, 10);
    const PEER_V4: Ipv4Address = Ipv4Address::new(192, 0, 2, 2);
    const OURS_V6: Ipv6Address = Ipv6Address::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x10);
    const PEER_V6: Ipv6Address = Ipv6Address::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 2);

    fn ours(a: &IpAddress) -> bool {
        *a == IpAddress::Ipv4(OURS_V4) || *a == IpAddress::Ipv6(OURS_V6)
    }

    fn udp_packet(src: IpEndpoint, dst: IpEndpoint, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0; udp_header_len(&src.addr) + payload.len()];
        p[udp_header_len(&src.addr)..].copy_from_slice(payload);
        emit_udp_headers(&mut p, src, dst);
        p
    }

    #[test]
    fn udp_round_trips_both_families() {
        for (peer, us) in [
            (IpAddress::Ipv4(PEER_V4), IpAddress::Ipv4(OURS_V4)),
            (IpAddress::Ipv6(PEER_V6), IpAddress::Ipv6(OURS_V6)),
        ] {
            let (remote, local) = (IpEndpoint::new(peer, 4000), IpEndpoint::new(us, 53));
            let p = udp_packet(remote, local, b"hello");
            let Ok(Inbound::Udp {
                local: l,
                remote: r,
                payload,
            }) = classify(&p, ours)
            else {
                panic!("not UDP");
            };
            assert_eq!((l, r), (local, remote));
            assert_eq!(&p[payload], b"hello");
        }
    }

    #[test]
    fn echo_request_gets_reply_v4_and_v6() {
        let caps = ChecksumCapabilities::default();
        let req = Icmpv4Repr::EchoRequest {
            ident: 7,
            seq_no: 9,
            data: b"ping",
        };
        let ip = Ipv4Repr {
            src_addr: PEER_V4,
            dst_addr: OURS_V4,
            next_header: IpProtocol::Icmp,
            payload_len: req.buffer_len(),
            hop_limit: 64,
        };
        let mut p = vec![0; 20 + req.buffer_len()];
        ip.emit(&mut Ipv4Packet::new_unchecked(&mut p[..]), &caps);
        req.emit(&mut Icmpv4Packet::new_unchecked(&mut p[20..]), &caps);
        let Ok(Inbound::Echo(reply)) = classify(&p, ours) else {
            panic!("no echo reply");
        };
        let rp = Ipv4Packet::new_checked(&reply[..]).unwrap();
        assert_eq!((rp.src_addr(), rp.dst_addr()), (OURS_V4, PEER_V4));
        let icmp = Icmpv4Packet::new_checked(rp.payload()).unwrap();
        assert_eq!(
            Icmpv4Repr::parse(&icmp, &caps).unwrap(),
            Icmpv4Repr::EchoReply {
                ident: 7,
                seq_no: 9,
                data: b"ping"
            }
        );

        let req = Icmpv6Repr::EchoRequest {
            ident: 1,
            seq_no: 2,
            data: b"ping6",
        };
        let ip = Ipv6Repr {
            src_addr: PEER_V6,
            dst_addr: OURS_V6,
            next_header: IpProtocol::Icmpv6,
            payload_len: req.buffer_len(),
            hop_limit: 64,
        };
        let mut p = vec![0; 40 + req.buffer_len()];
        ip.emit(&mut Ipv6Packet::new_unchecked(&mut p[..]));
        req.emit(
            &PEER_V6,
            &OURS_V6,
            &mut Icmpv6Packet::new_unchecked(&mut p[40..]),
            &caps,
        );
        let Ok(Inbound::Echo(reply)) = classify(&p, ours) else {
            panic!("no echo reply");
        };
        let rp = Ipv6Packet::new_checked(&reply[..]).unwrap();
        let icmp = Icmpv6Packet::new_checked(rp.payload()).unwrap();
        assert_eq!(
            Icmpv6Repr::parse(&OURS_V6, &PEER_V6, &icmp, &caps).unwrap(),
            Icmpv6Repr::EchoReply {
                ident: 1,
                seq_no: 2,
                data: b"ping6"
            }
        );
    }

    #[test]
    fn rejects_bad_checksums_and_foreign_addresses() {
        let remote = IpEndpoint::new(IpAddress::Ipv6(PEER_V6), 4000);
        let local = IpEndpoint::new(IpAddress::Ipv6(OURS_V6), 53);
        let mut p = udp_packet(remote, local, b"hello");
        let last = p.len() - 1;
        p[last] ^= 1;
        assert_eq!(classify(&p, ours), Err(Malformed));

        let elsewhere = IpEndpoint::new(IpAddress::Ipv6(PEER_V6), 53);
        let p = udp_packet(remote, elsewhere, b"hello");
        assert_eq!(classify(&p, ours), Ok(Inbound::Unsupported));
    }

    #[test]
    fn truncations_never_panic() {
        let remote = IpEndpoint::new(IpAddress::Ipv4(PEER_V4), 4000);
        let local = IpEndpoint::new(IpAddress::Ipv4(OURS_V4), 53);
        let p = udp_packet(remote, local, &[0xab; 64]);
        for n in 0..p.len() {
            let _ = classify(&p[..n], ours);
        }
    }
}
