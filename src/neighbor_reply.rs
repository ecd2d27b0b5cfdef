//! Answering neighbour discovery on the uplink for addresses the relay hands out.
//!
//! The relay gives WireGuard peers addresses from the uplink's on-link IPv6 /64 (and
//! optionally an on-link IPv4 pool). Those addresses live behind a TUN device, not on
//! the uplink, so the kernel never answers the upstream router's Neighbor
//! Solicitations or ARP requests for them. Instead of relying on `proxy_ndp` and
//! per-address proxy entries, the relay answers them itself: these functions take one
//! Ethernet frame as read from an `AF_PACKET` socket and, when it asks for an address
//! we own, write the complete reply frame to send back on the same socket.
//!
//! Everything here is sans-IO and treats its input as untrusted: malformed,
//! truncated or unexpected frames yield `None`, never a panic.

use std::net::{Ipv4Addr, Ipv6Addr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags,
    NdiscRepr, RawHardwareAddress,
};

/// RFC 4861 §7.1.1: a hop limit of 255 proves the solicitation was not forwarded by a
/// router, i.e. it really comes from this link. Replies carry 255 for the same reason.
const NDP_HOP_LIMIT: u8 = 255;

/// The Ethernet minimum frame size without FCS. Kernels pad short frames in the
/// driver, but not every driver does so for frames injected through `AF_PACKET`,
/// and a runt ARP reply may be dropped by the switch; padding ourselves costs nothing.
const ETHERNET_MIN_FRAME_LEN: usize = 60;

/// ff02::1, where an advertisement defending an address against DAD goes.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// `33:33:00:00:00:01`, the Ethernet mapping of ff02::1 (RFC 2464 §7).
const ALL_NODES_MAC: EthernetAddress = EthernetAddress([0x33, 0x33, 0, 0, 0, 1]);

/// What the receiving kernel says about a frame's ICMPv6 checksum.
///
/// A sender on the same host (the far end of a veth, a VM's virtio device, a packet
/// socket with vnet headers) may hand the kernel a frame whose checksum the NIC is to
/// fill in (`CHECKSUM_PARTIAL`). Such a frame can reach a receiver without ever
/// meeting a NIC: its checksum field then holds only the pseudo-header sum, and the
/// kernel accepts it as is, since nothing between the sender and us could have
/// corrupted it. An `AF_PACKET` socket with `PACKET_AUXDATA` reports this as
/// `TP_STATUS_CSUMNOTREADY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RxChecksum {
    /// The checksum is in the frame and must verify: every frame from a wire, and
    /// whatever the kernel did not say otherwise about.
    #[default]
    Computed,
    /// The kernel says the checksum was left for a NIC to compute
    /// (`TP_STATUS_CSUMNOTREADY`): there is nothing to verify.
    NotReady,
}

/// A reply written by [`neighbor_advertisement`] or [`arp_reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer<A> {
    /// Length of the reply frame at the start of `out`.
    pub len: usize,
    /// The address that was asked for (one of ours).
    pub target: A,
    /// Who asked: the solicitation's IPv6 source (`::` during duplicate address
    /// detection) or the ARP sender address (`0.0.0.0` for an RFC 5227 probe).
    pub requester: A,
    /// The Ethernet destination of the reply.
    pub to_mac: [u8; 6],
}

/// Answers an ICMPv6 Neighbor Solicitation for an address we own.
///
/// `frame` is a whole Ethernet frame. If it carries a valid Neighbor Solicitation
/// (RFC 4861 §7.1.1: hop limit 255, correct checksum, code 0, non-multicast target)
/// whose target satisfies `is_ours`, the Neighbor Advertisement answering it is written
/// to `out` as a complete Ethernet frame from `our_mac`, and its length is returned.
/// See [`neighbor_advertisement`] for the exact reply.
pub fn answer_neighbor_solicitation(
    frame: &[u8],
    our_mac: [u8; 6],
    is_ours: impl Fn(Ipv6Addr) -> bool,
    out: &mut [u8],
) -> Option<usize> {
    neighbor_advertisement(frame, our_mac, is_ours, out).map(|answer| answer.len)
}

/// Answers an ARP request for an IPv4 address we own.
///
/// `frame` is a whole Ethernet frame. If it is an Ethernet/IPv4 ARP request whose
/// target satisfies `is_ours`, the ARP reply (from `our_mac`) is written to `out` as a
/// complete Ethernet frame and its length is returned. Replies and gratuitous ARP are
/// ignored. See [`arp_reply`] for details.
pub fn answer_arp_request(
    frame: &[u8],
    our_mac: [u8; 6],
    is_ours: impl Fn(Ipv4Addr) -> bool,
    out: &mut [u8],
) -> Option<usize> {
    arp_reply(frame, our_mac, is_ours, out).map(|answer| answer.len)
}

/// Like [`answer_neighbor_solicitation`], but tells what was answered.
///
/// The advertisement goes from `our_mac` to the solicitation's source link-layer
/// address option (or, without one, the frame's source MAC), from the target address
/// to the solicitation's source, with hop limit 255, the Solicited and Override flags
/// set (Router clear) and a target link-layer address option carrying `our_mac`.
/// Override is set because the address really is ours to route, so the router should
/// replace whatever it cached (for example after an address moved between relays).
///
/// A solicitation from `::` is duplicate address detection by someone else: we defend
/// the address as RFC 4861 §7.2.4 requires, with an unsolicited advertisement
/// (Solicited clear) multicast to ff02::1 (`33:33:00:00:00:01`).
///
/// Beyond RFC 4861 §7.1.1 the solicitation must be addressed either to the target
/// itself (unicast reachability probe) or to the target's solicited-node group, and
/// frames from `our_mac` are ignored: they are our own transmissions looping back.
///
/// The checksum must verify; see [`neighbor_advertisement_with_checksum`] for frames
/// the kernel says have none yet.
pub fn neighbor_advertisement(
    frame: &[u8],
    our_mac: [u8; 6],
    is_ours: impl Fn(Ipv6Addr) -> bool,
    out: &mut [u8],
) -> Option<Answer<Ipv6Addr>> {
    neighbor_advertisement_with_checksum(frame, RxChecksum::Computed, our_mac, is_ours, out)
}

/// Like [`neighbor_advertisement`], for a frame whose checksum state the receiving
/// kernel reported: with [`RxChecksum::NotReady`] the ICMPv6 checksum is not checked,
/// everything else is.
pub fn neighbor_advertisement_with_checksum(
    frame: &[u8],
    checksum: RxChecksum,
    our_mac: [u8; 6],
    is_ours: impl Fn(Ipv6Addr) -> bool,
    out: &mut [u8],
) -> Option<Answer<Ipv6Addr>> {
    let our_mac = EthernetAddress(our_mac);
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv6
        || !is_usable_unicast(our_mac)
        || eth.src_addr() == our_mac
        || !(eth.dst_addr() == our_mac || eth.dst_addr().is_multicast())
    {
        return None;
    }

    let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
    let ip_repr = Ipv6Repr::parse(&ip).ok()?;
    // A solicitation behind extension headers is legal but never sent in practice;
    // following the header chain is not worth the attack surface.
    if ip_repr.next_header != IpProtocol::Icmpv6 || ip_repr.hop_limit != NDP_HOP_LIMIT {
        return None;
    }
    let (src, dst) = (ip_repr.src_addr, ip_repr.dst_addr);

    let icmp = Icmpv6Packet::new_checked(ip.payload()).ok()?;
    // The default capabilities verify the checksum; `parse` also insists on code 0
    // and a complete NS header, and rejects zero-length options, with or without it.
    let caps = match checksum {
        RxChecksum::Computed => ChecksumCapabilities::default(),
        RxChecksum::NotReady => ChecksumCapabilities::ignored(),
    };
    let repr = Icmpv6Repr::parse(&src, &dst, &icmp, &caps).ok()?;
    let Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr,
    }) = repr
    else {
        return None;
    };

    if target.is_multicast() || target.is_unspecified() || src.is_multicast() {
        return None;
    }
    let dad = src.is_unspecified();
    let to_group = dst == solicited_node(target);
    if !(to_group || (dst == target && !dad)) {
        return None;
    }
    // RFC 4861 §7.1.1: a DAD probe must not carry a source link-layer address.
    if dad && lladdr.is_some() {
        return None;
    }
    if !is_ours(target) {
        return None;
    }

    let (dst_addr, dst_mac, flags) = if dad {
        (ALL_NODES, ALL_NODES_MAC, NdiscNeighborFlags::OVERRIDE)
    } else {
        let mac = match lladdr {
            Some(ll) => ethernet_address(ll)?,
            None => eth.src_addr(),
        };
        if !is_usable_unicast(mac) {
            return None;
        }
        (
            src,
            mac,
            NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE,
        )
    };

    let icmp_repr = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags,
        target_addr: target,
        lladdr: Some(RawHardwareAddress::from_bytes(our_mac.as_bytes())),
    });
    let ip_repr = Ipv6Repr {
        src_addr: target,
        dst_addr,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp_repr.buffer_len(),
        hop_limit: NDP_HOP_LIMIT,
    };
    let eth_repr = EthernetRepr {
        src_addr: our_mac,
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv6,
    };
    let len = eth_repr.buffer_len() + ip_repr.buffer_len() + icmp_repr.buffer_len();
    let out = out.get_mut(..len)?;

    let mut eth_out = EthernetFrame::new_unchecked(out);
    eth_repr.emit(&mut eth_out);
    let mut ip_out = Ipv6Packet::new_unchecked(eth_out.payload_mut());
    ip_repr.emit(&mut ip_out);
    icmp_repr.emit(
        &target,
        &dst_addr,
        &mut Icmpv6Packet::new_unchecked(ip_out.payload_mut()),
        &ChecksumCapabilities::default(),
    );

    Some(Answer {
        len,
        target,
        requester: src,
        to_mac: dst_mac.0,
    })
}

/// Like [`answer_arp_request`], but tells what was answered.
///
/// The reply goes from `our_mac` to the requester's sender hardware address (or the
/// frame's source MAC if that is not a usable unicast address), and says the target
/// address is at `our_mac`. Probes from `0.0.0.0` (RFC 5227) are answered too, as Linux
/// does for its own addresses, so a host about to take one of ours sees the conflict.
/// Requests must be broadcast or sent to `our_mac` (unicast refreshes); frames from
/// `our_mac` are our own transmissions looping back and are ignored.
pub fn arp_reply(
    frame: &[u8],
    our_mac: [u8; 6],
    is_ours: impl Fn(Ipv4Addr) -> bool,
    out: &mut [u8],
) -> Option<Answer<Ipv4Addr>> {
    let our_mac = EthernetAddress(our_mac);
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp
        || !is_usable_unicast(our_mac)
        || eth.src_addr() == our_mac
        || !(eth.dst_addr() == our_mac || eth.dst_addr().is_broadcast())
    {
        return None;
    }

    let arp = ArpPacket::new_checked(eth.payload()).ok()?;
    // `parse` only accepts Ethernet/IPv4 with 6- and 4-byte addresses.
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr: sender_mac,
        source_protocol_addr: sender_ip,
        target_protocol_addr: target,
        ..
    } = ArpRepr::parse(&arp).ok()?
    else {
        return None;
    };

    if operation != ArpOperation::Request
        // Gratuitous ARP announces the sender's own address; nobody waits for a reply.
        || sender_ip == target
        || !is_usable_ipv4(target)
        || !(sender_ip.is_unspecified() || is_usable_ipv4(sender_ip))
        || !is_ours(target)
    {
        return None;
    }

    let to_mac = if is_usable_unicast(sender_mac) {
        sender_mac
    } else if is_usable_unicast(eth.src_addr()) {
        eth.src_addr()
    } else {
        return None;
    };

    let arp_repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: our_mac,
        source_protocol_addr: target,
        target_hardware_addr: to_mac,
        target_protocol_addr: sender_ip,
    };
    let eth_repr = EthernetRepr {
        src_addr: our_mac,
        dst_addr: to_mac,
        ethertype: EthernetProtocol::Arp,
    };
    let len = ETHERNET_MIN_FRAME_LEN.max(eth_repr.buffer_len() + arp_repr.buffer_len());
    let out = out.get_mut(..len)?;
    out.fill(0);

    let mut eth_out = EthernetFrame::new_unchecked(out);
    eth_repr.emit(&mut eth_out);
    arp_repr.emit(&mut ArpPacket::new_unchecked(
        &mut eth_out.payload_mut()[..arp_repr.buffer_len()],
    ));

    Some(Answer {
        len,
        target,
        requester: sender_ip,
        to_mac: to_mac.0,
    })
}

/// The solicited-node multicast group of `addr`: ff02::1:ff00:0/104 plus its low 24
/// bits (RFC 4291 §2.7.1).
fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    const PREFIX: u128 = 0xff02_0000_0000_0000_0000_0001_ff00_0000;
    Ipv6Addr::from(PREFIX | (u128::from(addr) & 0x00ff_ffff))
}

/// A link-layer option is only usable as an Ethernet address if it has 6 bytes.
fn ethernet_address(raw: RawHardwareAddress) -> Option<EthernetAddress> {
    <[u8; 6]>::try_from(raw.as_bytes())
        .ok()
        .map(EthernetAddress)
}

/// Unicast and not all zeroes: something a reply can be addressed from or to.
fn is_usable_unicast(mac: EthernetAddress) -> bool {
    mac.is_unicast() && mac.0 != [0; 6]
}

/// Nothing answers ARP for these, and neither do we (as Linux' `arp_process`).
fn is_usable_ipv4(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() || addr.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{ArpHardware, NdiscNeighborFlags as Flags};

    const OUR_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x02];
    const ROUTER_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];
    const ROUTER_LL_OPT_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x99];
    const ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
    const OURS: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xabcd);
    const NOT_OURS: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xdead);
    const ROUTER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const OURS4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
    const NOT_OURS4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 78);

    fn ours(a: Ipv6Addr) -> bool {
        a == OURS
    }

    fn ours4(a: Ipv4Addr) -> bool {
        a == OURS4
    }

    /// Parameters of a test solicitation; `ns()` builds the frame with smoltcp.
    #[derive(Clone, Copy)]
    struct Ns {
        eth_src: [u8; 6],
        eth_dst: [u8; 6],
        src: Ipv6Addr,
        dst: Ipv6Addr,
        target: Ipv6Addr,
        lladdr: Option<[u8; 6]>,
        hop_limit: u8,
    }

    impl Default for Ns {
        fn default() -> Self {
            Ns {
                eth_src: ROUTER_MAC,
                eth_dst: [0x33, 0x33, 0xff, 0x00, 0xab, 0xcd],
                src: ROUTER,
                dst: solicited_node(OURS),
                target: OURS,
                lladdr: Some(ROUTER_LL_OPT_MAC),
                hop_limit: 255,
            }
        }
    }

    impl Ns {
        fn frame(self) -> Vec<u8> {
            let icmp = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                target_addr: self.target,
                lladdr: self.lladdr.map(|m| RawHardwareAddress::from_bytes(&m)),
            });
            let ip = Ipv6Repr {
                src_addr: self.src,
                dst_addr: self.dst,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.buffer_len(),
                hop_limit: self.hop_limit,
            };
            let eth = EthernetRepr {
                src_addr: EthernetAddress(self.eth_src),
                dst_addr: EthernetAddress(self.eth_dst),
                ethertype: EthernetProtocol::Ipv6,
            };
            let mut buf = vec![0; eth.buffer_len() + ip.buffer_len() + icmp.buffer_len()];
            let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
            eth.emit(&mut f);
            let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
            ip.emit(&mut p);
            icmp.emit(
                &self.src,
                &self.dst,
                &mut Icmpv6Packet::new_unchecked(p.payload_mut()),
                &ChecksumCapabilities::default(),
            );
            buf
        }
    }

    fn answer(frame: &[u8]) -> Option<Vec<u8>> {
        let mut out = [0u8; 256];
        answer_neighbor_solicitation(frame, OUR_MAC, ours, &mut out).map(|n| out[..n].to_vec())
    }

    /// Re-parses a reply with checksum verification and returns its pieces.
    fn parse_na(
        frame: &[u8],
    ) -> (
        EthernetRepr,
        Ipv6Repr,
        NdiscNeighborFlags,
        Ipv6Addr,
        Vec<u8>,
    ) {
        let eth = EthernetFrame::new_checked(frame).expect("ethernet");
        let eth_repr = EthernetRepr::parse(&eth).expect("ethernet repr");
        let ip = Ipv6Packet::new_checked(eth.payload()).expect("ipv6");
        let ip_repr = Ipv6Repr::parse(&ip).expect("ipv6 repr");
        assert_eq!(ip.payload().len(), ip_repr.payload_len);
        let icmp = Icmpv6Packet::new_checked(ip.payload()).expect("icmpv6");
        assert!(icmp.verify_checksum(&ip_repr.src_addr, &ip_repr.dst_addr));
        let repr = Icmpv6Repr::parse(
            &ip_repr.src_addr,
            &ip_repr.dst_addr,
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .expect("checksum and format must verify");
        let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags,
            target_addr,
            lladdr,
        }) = repr
        else {
            panic!("not a neighbor advertisement: {repr:?}");
        };
        let lladdr = lladdr
            .expect("target link-layer option")
            .as_bytes()
            .to_vec();
        (eth_repr, ip_repr, flags, target_addr, lladdr)
    }

    #[test]
    fn answers_multicast_solicitation_with_full_advertisement() {
        let reply = answer(&Ns::default().frame()).expect("must answer");
        assert_eq!(reply.len(), 14 + 40 + 32);

        let (eth, ip, flags, target, lladdr) = parse_na(&reply);
        // The option's address wins over the frame's source.
        assert_eq!(eth.dst_addr, EthernetAddress(ROUTER_LL_OPT_MAC));
        assert_eq!(eth.src_addr, EthernetAddress(OUR_MAC));
        assert_eq!(eth.ethertype, EthernetProtocol::Ipv6);
        assert_eq!(ip.src_addr, OURS);
        assert_eq!(ip.dst_addr, ROUTER);
        assert_eq!(ip.hop_limit, 255);
        assert_eq!(ip.next_header, IpProtocol::Icmpv6);
        assert_eq!(flags, Flags::SOLICITED | Flags::OVERRIDE);
        assert_eq!(target, OURS);
        assert_eq!(lladdr, OUR_MAC);

        // Bit by bit, as RFC 4861 §4.4 lays it out.
        assert_eq!(&reply[0..6], &ROUTER_LL_OPT_MAC);
        assert_eq!(&reply[6..12], &OUR_MAC);
        assert_eq!(&reply[12..14], &[0x86, 0xdd]);
        assert_eq!(&reply[14..18], &[0x60, 0, 0, 0], "version 6, no class/flow");
        assert_eq!(&reply[18..20], &32u16.to_be_bytes(), "payload length");
        assert_eq!(reply[20], 58, "next header ICMPv6");
        assert_eq!(reply[21], 255, "hop limit");
        assert_eq!(&reply[22..38], &OURS.octets());
        assert_eq!(&reply[38..54], &ROUTER.octets());
        assert_eq!(reply[54], 136, "type NA");
        assert_eq!(reply[55], 0, "code");
        assert_eq!(
            &reply[58..62],
            &[0b0110_0000, 0, 0, 0],
            "R=0 S=1 O=1, reserved"
        );
        assert_eq!(&reply[62..78], &OURS.octets());
        assert_eq!(&reply[78..80], &[2, 1], "target link-layer option, 8 bytes");
        assert_eq!(&reply[80..86], &OUR_MAC);
    }

    #[test]
    fn unicast_probe_without_option_goes_to_frame_source() {
        let ns = Ns {
            eth_dst: OUR_MAC,
            dst: OURS,
            lladdr: None,
            ..Ns::default()
        };
        let mut out = [0u8; 128];
        let a = neighbor_advertisement(&ns.frame(), OUR_MAC, ours, &mut out).expect("answer");
        assert_eq!(
            a,
            Answer {
                len: 86,
                target: OURS,
                requester: ROUTER,
                to_mac: ROUTER_MAC,
            }
        );
        let (eth, ip, flags, _, _) = parse_na(&out[..a.len]);
        assert_eq!(eth.dst_addr, EthernetAddress(ROUTER_MAC));
        assert_eq!(ip.dst_addr, ROUTER);
        assert_eq!(flags, Flags::SOLICITED | Flags::OVERRIDE);
    }

    #[test]
    fn duplicate_address_detection_is_defended_by_multicast() {
        let ns = Ns {
            src: Ipv6Addr::UNSPECIFIED,
            lladdr: None,
            ..Ns::default()
        };
        let reply = answer(&ns.frame()).expect("must defend");
        let (eth, ip, flags, target, lladdr) = parse_na(&reply);
        assert_eq!(eth.dst_addr, EthernetAddress([0x33, 0x33, 0, 0, 0, 1]));
        assert_eq!(eth.src_addr, EthernetAddress(OUR_MAC));
        assert_eq!(ip.src_addr, OURS);
        assert_eq!(ip.dst_addr, "ff02::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ip.hop_limit, 255);
        assert_eq!(flags, Flags::OVERRIDE, "Solicited must be clear");
        assert_eq!(target, OURS);
        assert_eq!(lladdr, OUR_MAC);
        assert_eq!(reply[58], 0b0010_0000);
    }

    #[test]
    fn invalid_dad_probes_are_ignored() {
        // RFC 4861 §7.1.1: no source link-layer option from ::, and only to the group.
        let with_option = Ns {
            src: Ipv6Addr::UNSPECIFIED,
            ..Ns::default()
        };
        assert!(answer(&with_option.frame()).is_none());
        let unicast = Ns {
            src: Ipv6Addr::UNSPECIFIED,
            lladdr: None,
            eth_dst: OUR_MAC,
            dst: OURS,
            ..Ns::default()
        };
        assert!(answer(&unicast.frame()).is_none());
    }

    #[test]
    fn not_ours_is_ignored() {
        let ns = Ns {
            target: NOT_OURS,
            dst: solicited_node(NOT_OURS),
            ..Ns::default()
        };
        assert!(answer(&ns.frame()).is_none());
        // The predicate is consulted with the target, not some other address.
        let mut out = [0u8; 128];
        assert!(
            answer_neighbor_solicitation(&ns.frame(), OUR_MAC, |a| a == NOT_OURS, &mut out)
                .is_some()
        );
    }

    #[test]
    fn multicast_or_unspecified_target_is_ignored() {
        for target in [
            "ff02::1".parse().unwrap(),
            "ff02::1:ff00:abcd".parse().unwrap(),
            Ipv6Addr::UNSPECIFIED,
        ] {
            let ns = Ns {
                target,
                dst: solicited_node(target),
                ..Ns::default()
            };
            let mut out = [0u8; 128];
            assert!(
                answer_neighbor_solicitation(&ns.frame(), OUR_MAC, |_| true, &mut out).is_none(),
                "{target}"
            );
        }
    }

    #[test]
    fn wrong_hop_limit_is_ignored() {
        for hop_limit in [0, 1, 64, 254] {
            let ns = Ns {
                hop_limit,
                ..Ns::default()
            };
            assert!(answer(&ns.frame()).is_none(), "hop limit {hop_limit}");
        }
    }

    #[test]
    fn bad_checksum_and_nonzero_code_are_ignored() {
        let good = Ns::default().frame();
        let mut bad_sum = good.clone();
        bad_sum[56] ^= 0x01;
        assert!(answer(&bad_sum).is_none());

        // A non-zero code with a fixed-up checksum must still be refused.
        let mut code = good.clone();
        code[55] = 1;
        let (src, dst) = (ROUTER, solicited_node(OURS));
        Icmpv6Packet::new_unchecked(&mut code[54..]).fill_checksum(&src, &dst);
        assert!(answer(&code).is_none());
        assert!(answer(&good).is_some());
    }

    /// The solicitation as a local sender with checksum offload hands it over: the
    /// checksum field holds the folded pseudo-header sum, left for a NIC to finish.
    fn checksum_not_ready(ns: Ns) -> Vec<u8> {
        let mut frame = ns.frame();
        let len = (frame.len() - 54) as u32;
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ns.src.octets());
        pseudo.extend_from_slice(&ns.dst.octets());
        pseudo.extend_from_slice(&len.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        let mut sum: u32 = pseudo
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        frame[56..58].copy_from_slice(&(sum as u16).to_be_bytes());
        frame
    }

    fn answer_with(frame: &[u8], checksum: RxChecksum) -> Option<Vec<u8>> {
        let mut out = [0u8; 256];
        neighbor_advertisement_with_checksum(frame, checksum, OUR_MAC, ours, &mut out)
            .map(|a| out[..a.len].to_vec())
    }

    #[test]
    fn checksum_left_to_the_nic_is_trusted_only_when_the_kernel_says_so() {
        let partial = checksum_not_ready(Ns::default());
        assert!(answer(&partial).is_none(), "unverifiable by default");
        assert!(answer_with(&partial, RxChecksum::Computed).is_none());
        // The same answer as to the finished frame: nothing depends on the field.
        let reply = answer_with(&partial, RxChecksum::NotReady).expect("must answer");
        assert_eq!(Some(reply.clone()), answer(&Ns::default().frame()));
        parse_na(&reply);

        // Only the checksum is excused, every other check still applies.
        let forwarded = checksum_not_ready(Ns {
            hop_limit: 254,
            ..Ns::default()
        });
        assert!(answer_with(&forwarded, RxChecksum::NotReady).is_none());
        let other = checksum_not_ready(Ns {
            target: NOT_OURS,
            dst: solicited_node(NOT_OURS),
            ..Ns::default()
        });
        assert!(answer_with(&other, RxChecksum::NotReady).is_none());
        let mut code = partial.clone();
        code[55] = 1;
        assert!(answer_with(&code, RxChecksum::NotReady).is_none());
        for len in 0..partial.len() {
            assert!(answer_with(&partial[..len], RxChecksum::NotReady).is_none());
        }
    }

    #[test]
    fn wrong_destination_is_ignored() {
        // Solicited-node group of a different address, and some unrelated unicast.
        for dst in [solicited_node(NOT_OURS), ROUTER, "ff02::1".parse().unwrap()] {
            let ns = Ns {
                dst,
                ..Ns::default()
            };
            assert!(answer(&ns.frame()).is_none(), "{dst}");
        }
    }

    #[test]
    fn frames_we_should_not_see_are_ignored() {
        // Our own solicitation looping back.
        let own = Ns {
            eth_src: OUR_MAC,
            ..Ns::default()
        };
        assert!(answer(&own.frame()).is_none());
        // Unicast to some other host (e.g. the uplink is promiscuous).
        let other = Ns {
            eth_dst: [0x02, 0, 0, 0, 0, 0x42],
            dst: OURS,
            ..Ns::default()
        };
        assert!(answer(&other.frame()).is_none());
        // A multicast solicitation source cannot be answered.
        let mcast_src = Ns {
            src: "ff02::2".parse().unwrap(),
            ..Ns::default()
        };
        assert!(answer(&mcast_src.frame()).is_none());
        // Nor a multicast link-layer source when no option names one.
        let mcast_mac = Ns {
            eth_src: [0x33, 0x33, 0, 0, 0, 2],
            lladdr: None,
            ..Ns::default()
        };
        assert!(answer(&mcast_mac.frame()).is_none());
    }

    #[test]
    fn other_icmpv6_and_ethertypes_are_ignored() {
        let mut frame = Ns::default().frame();
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        assert!(answer(&frame).is_none());

        // A Neighbor Advertisement for our target must not be answered.
        let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: Flags::SOLICITED,
            target_addr: OURS,
            lladdr: None,
        });
        let mut frame = Ns::default().frame();
        frame.truncate(14 + 40 + na.buffer_len());
        frame[18..20].copy_from_slice(&(na.buffer_len() as u16).to_be_bytes());
        let (src, dst) = (ROUTER, solicited_node(OURS));
        na.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(&mut frame[54..]),
            &ChecksumCapabilities::default(),
        );
        assert!(answer(&frame).is_none());
    }

    #[test]
    fn ethernet_padding_is_tolerated() {
        let mut frame = Ns::default().frame();
        frame.extend_from_slice(&[0; 18]);
        assert!(answer(&frame).is_some());
    }

    #[test]
    fn too_small_output_buffer_yields_none() {
        let frame = Ns::default().frame();
        let mut out = [0u8; 85];
        assert!(answer_neighbor_solicitation(&frame, OUR_MAC, ours, &mut out).is_none());
        let mut out = [0u8; 59];
        assert!(answer_arp_request(&arp(Arp::default()), OUR_MAC, ours4, &mut out).is_none());
    }

    #[test]
    fn unusable_own_mac_is_refused() {
        let mut out = [0u8; 128];
        let frame = Ns::default().frame();
        for mac in [[0; 6], [0xff; 6], [0x33, 0x33, 0, 0, 0, 1]] {
            assert!(answer_neighbor_solicitation(&frame, mac, ours, &mut out).is_none());
            assert!(answer_arp_request(&arp(Arp::default()), mac, ours4, &mut out).is_none());
        }
    }

    #[test]
    fn every_truncation_of_a_valid_solicitation_is_refused_without_panic() {
        let frame = Ns::default().frame();
        for len in 0..frame.len() {
            assert!(answer(&frame[..len]).is_none(), "length {len}");
        }
        assert!(answer(&frame).is_some());
    }

    /// xorshift64*, enough to shake parsers without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut out = [0u8; 256];
        for _ in 0..20_000 {
            let len = rng.below(200);
            let mut frame: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Steer half the inputs past the ethertype check.
            if len >= 14 && rng.next() & 1 == 0 {
                let ethertype: [u8; 2] = if rng.next() & 1 == 0 {
                    [0x86, 0xdd]
                } else {
                    [0x08, 0x06]
                };
                frame[12..14].copy_from_slice(&ethertype);
            }
            let _ = answer_neighbor_solicitation(&frame, OUR_MAC, |_| true, &mut out);
            let _ = neighbor_advertisement_with_checksum(
                &frame,
                RxChecksum::NotReady,
                OUR_MAC,
                |_| true,
                &mut out,
            );
            let _ = answer_arp_request(&frame, OUR_MAC, |_| true, &mut out);
        }
    }

    #[test]
    fn mutated_solicitations_never_panic_and_answers_stay_valid() {
        // Mutate a valid NS, then repair the checksum so the mutation reaches the
        // option parser instead of dying at the checksum check.
        let base = Ns::default().frame();
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let mut out = [0u8; 256];
        let mut answered = 0;
        for _ in 0..20_000 {
            let mut frame = base.clone();
            // Append a random tail (extra options) sometimes.
            if rng.next() & 3 == 0 {
                let extra = rng.below(40);
                frame.extend((0..extra).map(|_| rng.next() as u8));
                let plen = (frame.len() - 54) as u16;
                frame[18..20].copy_from_slice(&plen.to_be_bytes());
            }
            for _ in 0..=rng.below(3) {
                // Leave the Ethernet addresses and the IPv6 source alone half the time
                // so that answers happen and get checked.
                let start = if rng.next() & 1 == 0 { 54 } else { 0 };
                let i = start + rng.below(frame.len() - start);
                frame[i] = rng.next() as u8;
            }
            let ip = Ipv6Packet::new_unchecked(&frame[14..]);
            if ip.check_len().is_ok() && ip.payload().len() >= 4 {
                let (src, dst) = (ip.src_addr(), ip.dst_addr());
                let end = 14 + ip.total_len();
                Icmpv6Packet::new_unchecked(&mut frame[54..end]).fill_checksum(&src, &dst);
            }
            if let Some(n) = answer_neighbor_solicitation(&frame, OUR_MAC, |_| true, &mut out) {
                answered += 1;
                let (eth, ip, _, target, lladdr) = parse_na(&out[..n]);
                assert_eq!(eth.src_addr, EthernetAddress(OUR_MAC));
                assert_eq!(ip.hop_limit, 255);
                assert_eq!(ip.src_addr, target);
                assert_eq!(lladdr, OUR_MAC);
            }
        }
        assert!(
            answered > 100,
            "only {answered} mutated frames were answered"
        );
    }

    // ---- ARP ----

    #[derive(Clone, Copy)]
    struct Arp {
        eth_src: [u8; 6],
        eth_dst: [u8; 6],
        op: ArpOperation,
        sender_mac: [u8; 6],
        sender_ip: Ipv4Addr,
        target_ip: Ipv4Addr,
    }

    impl Default for Arp {
        fn default() -> Self {
            Arp {
                eth_src: ROUTER_MAC,
                eth_dst: [0xff; 6],
                op: ArpOperation::Request,
                sender_mac: ROUTER_MAC,
                sender_ip: ROUTER4,
                target_ip: OURS4,
            }
        }
    }

    fn arp(a: Arp) -> Vec<u8> {
        let repr = ArpRepr::EthernetIpv4 {
            operation: a.op,
            source_hardware_addr: EthernetAddress(a.sender_mac),
            source_protocol_addr: a.sender_ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: a.target_ip,
        };
        let eth = EthernetRepr {
            src_addr: EthernetAddress(a.eth_src),
            dst_addr: EthernetAddress(a.eth_dst),
            ethertype: EthernetProtocol::Arp,
        };
        let mut buf = vec![0; eth.buffer_len() + repr.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        eth.emit(&mut f);
        repr.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        buf
    }

    fn answer4(frame: &[u8]) -> Option<Vec<u8>> {
        let mut out = [0u8; 128];
        answer_arp_request(frame, OUR_MAC, ours4, &mut out).map(|n| out[..n].to_vec())
    }

    #[test]
    fn answers_arp_request_for_owned_address() {
        let reply = answer4(&arp(Arp::default())).expect("must answer");
        assert_eq!(reply.len(), 60, "padded to the Ethernet minimum");

        let eth = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress(ROUTER_MAC));
        assert_eq!(eth.src_addr(), EthernetAddress(OUR_MAC));
        assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
        let pkt = ArpPacket::new_checked(eth.payload()).unwrap();
        assert_eq!(pkt.hardware_type(), ArpHardware::Ethernet);
        assert_eq!(
            ArpRepr::parse(&pkt).unwrap(),
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(OUR_MAC),
                source_protocol_addr: OURS4,
                target_hardware_addr: EthernetAddress(ROUTER_MAC),
                target_protocol_addr: ROUTER4,
            }
        );
        // RFC 826 layout, byte by byte.
        assert_eq!(&reply[12..14], &[0x08, 0x06]);
        assert_eq!(&reply[14..22], &[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
        assert_eq!(&reply[22..28], &OUR_MAC);
        assert_eq!(&reply[28..32], &OURS4.octets());
        assert_eq!(&reply[32..38], &ROUTER_MAC);
        assert_eq!(&reply[38..42], &ROUTER4.octets());
        assert!(reply[42..].iter().all(|&b| b == 0), "zero padding");
    }

    #[test]
    fn arp_reply_goes_to_sender_hardware_address() {
        let req = Arp {
            sender_mac: ROUTER_LL_OPT_MAC,
            eth_dst: OUR_MAC,
            ..Arp::default()
        };
        let mut out = [0u8; 64];
        let a = arp_reply(&arp(req), OUR_MAC, ours4, &mut out).expect("unicast refresh");
        assert_eq!(
            a,
            Answer {
                len: 60,
                target: OURS4,
                requester: ROUTER4,
                to_mac: ROUTER_LL_OPT_MAC,
            }
        );
        assert_eq!(&out[0..6], &ROUTER_LL_OPT_MAC);
        assert_eq!(&out[32..38], &ROUTER_LL_OPT_MAC);

        // With a bogus sender hardware address, fall back to the frame's source.
        let req = Arp {
            sender_mac: [0; 6],
            ..Arp::default()
        };
        let a = arp_reply(&arp(req), OUR_MAC, ours4, &mut out).expect("answer");
        assert_eq!(a.to_mac, ROUTER_MAC);
    }

    #[test]
    fn arp_probe_is_answered() {
        let probe = Arp {
            sender_ip: Ipv4Addr::UNSPECIFIED,
            ..Arp::default()
        };
        let reply = answer4(&arp(probe)).expect("defend against a probe");
        assert_eq!(&reply[38..42], &[0, 0, 0, 0]);
        assert_eq!(&reply[28..32], &OURS4.octets());
    }

    #[test]
    fn arp_requests_to_ignore() {
        let cases = [
            (
                "not ours",
                Arp {
                    target_ip: NOT_OURS4,
                    ..Arp::default()
                },
            ),
            (
                "reply",
                Arp {
                    op: ArpOperation::Reply,
                    ..Arp::default()
                },
            ),
            (
                "gratuitous",
                Arp {
                    sender_ip: OURS4,
                    ..Arp::default()
                },
            ),
            (
                "own frame",
                Arp {
                    eth_src: OUR_MAC,
                    ..Arp::default()
                },
            ),
            (
                "unicast to someone else",
                Arp {
                    eth_dst: ROUTER_LL_OPT_MAC,
                    ..Arp::default()
                },
            ),
            (
                "multicast sender ip",
                Arp {
                    sender_ip: Ipv4Addr::new(224, 0, 0, 1),
                    ..Arp::default()
                },
            ),
            (
                "no usable reply address",
                Arp {
                    sender_mac: [0xff; 6],
                    eth_src: [0x01, 0, 0x5e, 0, 0, 1],
                    ..Arp::default()
                },
            ),
        ];
        for (what, req) in cases {
            assert!(answer4(&arp(req)).is_none(), "{what}");
        }
        // A broadcast target is never answered, whatever the predicate says.
        let req = Arp {
            target_ip: Ipv4Addr::BROADCAST,
            ..Arp::default()
        };
        let mut out = [0u8; 64];
        assert!(answer_arp_request(&arp(req), OUR_MAC, |_| true, &mut out).is_none());
    }

    #[test]
    fn non_ethernet_ipv4_arp_is_ignored() {
        let mut frame = arp(Arp::default());
        frame[14 + 4] = 8; // hardware address length
        assert!(answer4(&frame).is_none());
        let mut frame = arp(Arp::default());
        frame[14 + 2..14 + 4].copy_from_slice(&[0x86, 0xdd]); // protocol type
        assert!(answer4(&frame).is_none());
    }

    #[test]
    fn every_truncation_of_a_valid_arp_request_is_refused_without_panic() {
        let mut frame = arp(Arp::default());
        frame.extend_from_slice(&[0; 18]); // the padding a real request carries
        for len in 0..14 + 28 {
            assert!(answer4(&frame[..len]).is_none(), "length {len}");
        }
        for len in 14 + 28..=frame.len() {
            assert!(answer4(&frame[..len]).is_some(), "length {len}");
        }
    }

    #[test]
    fn mutated_arp_requests_never_panic() {
        let base = arp(Arp::default());
        let mut rng = Rng(42);
        let mut out = [0u8; 128];
        for _ in 0..20_000 {
            let mut frame = base.clone();
            for _ in 0..=rng.below(3) {
                let i = rng.below(frame.len());
                frame[i] = rng.next() as u8;
            }
            if let Some(n) = answer_arp_request(&frame, OUR_MAC, |_| true, &mut out) {
                let eth = EthernetFrame::new_checked(&out[..n]).unwrap();
                let pkt = ArpPacket::new_checked(eth.payload()).unwrap();
                let ArpRepr::EthernetIpv4 {
                    operation,
                    source_hardware_addr,
                    ..
                } = ArpRepr::parse(&pkt).unwrap()
                else {
                    unreachable!()
                };
                assert_eq!(operation, ArpOperation::Reply);
                assert_eq!(source_hardware_addr, EthernetAddress(OUR_MAC));
            }
        }
    }

    #[test]
    fn solicited_node_group() {
        assert_eq!(
            solicited_node(OURS),
            "ff02::1:ff00:abcd".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            solicited_node("fe80::1234:5678:9abc:def0".parse().unwrap()),
            "ff02::1:ffbc:def0".parse::<Ipv6Addr>().unwrap()
        );
    }
}
