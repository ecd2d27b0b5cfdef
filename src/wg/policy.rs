//! What the data path may carry between peers and the link (TUN device or userspace
//! stack), decided per packet by the program that embeds the engine (the relay:
//! tenant isolation).
//!
//! The device asks its [`Policy`] about every decrypted packet before it goes to the
//! link, and about every packet read from the link before it is encrypted for a
//! peer. The engine itself knows nothing of tenants or interfaces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::DropReason;

/// The facts a policy decides on, read from the packet's IP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// An ICMP or ICMPv6 error message (destination unreachable, packet too big,
    /// time exceeded, parameter problem). Hosts must be able to send these even
    /// where other traffic from them is refused, or path MTU discovery breaks.
    pub icmp_error: bool,
}

impl PacketInfo {
    /// Only the destination, for routing: the cheapest read of the header.
    pub fn destination(packet: &[u8]) -> Option<IpAddr> {
        match packet.first()? >> 4 {
            4 => <[u8; 4]>::try_from(packet.get(16..20)?)
                .ok()
                .map(|a| IpAddr::from(Ipv4Addr::from(a))),
            6 => <[u8; 16]>::try_from(packet.get(24..40)?)
                .ok()
                .map(|a| IpAddr::from(Ipv6Addr::from(a))),
            _ => None,
        }
    }

    /// Reads the header of an IPv4 or IPv6 packet; `None` if it is too short for one.
    pub fn parse(packet: &[u8]) -> Option<PacketInfo> {
        match packet.first()? >> 4 {
            4 if packet.len() >= 20 => {
                let src = Ipv4Addr::from(<[u8; 4]>::try_from(&packet[12..16]).ok()?);
                let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&packet[16..20]).ok()?);
                let header = usize::from(packet[0] & 0x0f) * 4;
                let first_fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff == 0;
                let icmp_error = packet[9] == 1
                    && first_fragment
                    && packet
                        .get(header)
                        .is_some_and(|t| matches!(t, 3 | 4 | 11 | 12));
                Some(PacketInfo {
                    src: src.into(),
                    dst: dst.into(),
                    icmp_error,
                })
            }
            6 if packet.len() >= 40 => {
                let src = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[8..24]).ok()?);
                let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[24..40]).ok()?);
                // Errors a host generates carry no extension headers: only the
                // ICMPv6 header right after the fixed one counts.
                let icmp_error = packet[6] == 58 && packet.get(40).is_some_and(|t| *t < 128);
                Some(PacketInfo {
                    src: src.into(),
                    dst: dst.into(),
                    icmp_error,
                })
            }
            _ => None,
        }
    }
}

/// A policy's answer about one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Drop it and count it under this reason.
    Drop(DropReason),
}

/// Decides per packet, in both directions. Called on the data path for every packet:
/// keep it to lookups (no allocation, no blocking beyond a read lock), and never call
/// back into the [`Device`](super::Device) from it.
pub trait Policy: Send + Sync {
    /// A decrypted packet from a peer, its source already checked against that peer's
    /// allowed IPs, before it is written to the link.
    fn check_from_peer(&self, packet: &PacketInfo) -> Verdict;

    /// A packet read from the link, before it is encrypted for the peer whose
    /// allowed IPs hold its destination.
    fn check_to_peer(&self, packet: &PacketInfo) -> Verdict;

    /// A packet read from the link for an address no peer holds: whether to
    /// answer it with a destination unreachable error (rate limited) written back to
    /// the link, rather than dropping it silently. Either way it is dropped
    /// and counted ([`DropReason::Unallocated`] when answered, else
    /// [`DropReason::NoRoute`]).
    fn answers_unrouted(&self, dst: IpAddr) -> bool {
        let _ = dst;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_addresses_and_icmp_errors() {
        let mut v4 = vec![0u8; 28];
        v4[0] = 0x45;
        v4[9] = 1;
        v4[12..16].copy_from_slice(&[192, 0, 2, 1]);
        v4[16..20].copy_from_slice(&[198, 51, 100, 2]);
        v4[20] = 3;
        let info = PacketInfo::parse(&v4).unwrap();
        assert_eq!(info.src, "192.0.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(info.dst, "198.51.100.2".parse::<IpAddr>().unwrap());
        assert!(info.icmp_error);
        v4[20] = 8; // echo request
        assert!(!PacketInfo::parse(&v4).unwrap().icmp_error);
        v4[20] = 3;
        v4[7] = 1; // a later fragment: byte 20 is not an ICMP header
        assert!(!PacketInfo::parse(&v4).unwrap().icmp_error);

        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = 58;
        v6[23] = 1;
        v6[39] = 2;
        v6[40] = 2; // packet too big
        let info = PacketInfo::parse(&v6).unwrap();
        assert_eq!(info.src, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(info.dst, "::2".parse::<IpAddr>().unwrap());
        assert!(info.icmp_error);
        v6[40] = 128;
        assert!(!PacketInfo::parse(&v6).unwrap().icmp_error);

        assert_eq!(PacketInfo::parse(&v6[..39]), None);
        assert_eq!(PacketInfo::parse(&[]), None);
        assert_eq!(PacketInfo::parse(&[0x50; 60]), None);
    }
}
