//! Destination unreachable errors about packets nobody can take, built from the
//! packet itself so the sender learns at once instead of retrying into a void.
//!
//! Written by hand rather than through smoltcp's `Repr` types: those re-serialize the
//! quoted header (dropping IPv4 options), and the quote must be the offending bytes
//! as they arrived.

use std::net::{Ipv4Addr, Ipv6Addr};

/// IPv6 errors stay within the minimum MTU (RFC 4443 2.4 c).
const V6_MAX: usize = 1280;
/// IPv4 errors stay within the minimum reassembly size (RFC 1812 4.3.2.3).
const V4_MAX: usize = 576;
const V6_HEADERS: usize = 40 + 8;
const V4_HEADERS: usize = 20 + 8;
const HOP_LIMIT: u8 = 64;

/// Writes into `out` a destination unreachable error (IPv6 "address unreachable",
/// IPv4 "host unreachable") about `original`, sent from the unreachable destination
/// back to the original source. That source address belongs to a prefix routed to
/// this node, and unlike a local address it passes the receiving kernel's source
/// checks when the error is handed to it through the tunnel device.
///
/// Returns the error's length, or `None` when no error may be sent about this packet
/// (RFC 4443 2.4 e, RFC 1812 4.3.2.7): it is itself an ICMP error, it was sent to or
/// from a multicast, broadcast or unspecified address, it is a later fragment, or it
/// is malformed. `out` should hold at least the size of `original` plus 48 bytes;
/// the quote is cut to fit.
pub fn destination_unreachable(original: &[u8], out: &mut [u8]) -> Option<usize> {
    match original.first()? >> 4 {
        6 => v6(original, out),
        4 => v4(original, out),
        _ => None,
    }
}

fn v6(original: &[u8], out: &mut [u8]) -> Option<usize> {
    if original.len() < 40 || out.len() < V6_HEADERS + 40 {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&original[8..24]).ok()?);
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&original[24..40]).ok()?);
    if src.is_unspecified() || src.is_multicast() || dst.is_multicast() || dst.is_unspecified() {
        return None;
    }
    if original[6] == 58 && original.get(40).is_none_or(|t| *t < 128) {
        return None;
    }
    let quote = original
        .len()
        .min(V6_MAX - V6_HEADERS)
        .min(out.len() - V6_HEADERS);
    let icmp_len = 8 + quote;
    let total = V6_HEADERS + quote;
    let out = &mut out[..total];
    out[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    out[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
    out[6] = 58;
    out[7] = HOP_LIMIT;
    out[8..24].copy_from_slice(&dst.octets());
    out[24..40].copy_from_slice(&src.octets());
    out[40] = 1; // destination unreachable
    out[41] = 3; // address unreachable
    out[42..48].fill(0);
    out[48..].copy_from_slice(&original[..quote]);
    let mut sum = Checksum::default();
    sum.add(&out[8..40]);
    sum.add(&(icmp_len as u32).to_be_bytes());
    sum.add(&[0, 0, 0, 58]);
    sum.add(&out[40..]);
    out[42..44].copy_from_slice(&sum.finish().to_be_bytes());
    Some(total)
}

fn v4(original: &[u8], out: &mut [u8]) -> Option<usize> {
    let header = usize::from(*original.first()? & 0x0f) * 4;
    if header < 20 || original.len() < header || out.len() < V4_HEADERS + header + 8 {
        return None;
    }
    let src = Ipv4Addr::from(<[u8; 4]>::try_from(&original[12..16]).ok()?);
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(&original[16..20]).ok()?);
    let bad = |a: Ipv4Addr| a.is_unspecified() || a.is_multicast() || a.is_broadcast();
    if bad(src) || bad(dst) || src.octets()[0] >= 240 {
        return None;
    }
    if u16::from_be_bytes([original[6], original[7]]) & 0x1fff != 0 {
        return None;
    }
    if original[9] == 1
        && original
            .get(header)
            .is_none_or(|t| matches!(t, 3 | 4 | 5 | 11 | 12))
    {
        return None;
    }
    let quote = original
        .len()
        .min(V4_MAX - V4_HEADERS)
        .min(out.len() - V4_HEADERS);
    let total = V4_HEADERS + quote;
    let out = &mut out[..total];
    out[0] = 0x45;
    out[1] = 0;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[4..8].fill(0);
    out[8] = HOP_LIMIT;
    out[9] = 1;
    out[10..12].fill(0);
    out[12..16].copy_from_slice(&dst.octets());
    out[16..20].copy_from_slice(&src.octets());
    let mut sum = Checksum::default();
    sum.add(&out[..20]);
    out[10..12].copy_from_slice(&sum.finish().to_be_bytes());
    out[20] = 3; // destination unreachable
    out[21] = 1; // host unreachable
    out[22..28].fill(0);
    out[28..].copy_from_slice(&original[..quote]);
    let mut sum = Checksum::default();
    sum.add(&out[20..]);
    out[22..24].copy_from_slice(&sum.finish().to_be_bytes());
    Some(total)
}

/// The Internet checksum (RFC 1071) over pieces of even length but the last.
#[derive(Default)]
struct Checksum(u32);

impl Checksum {
    fn add(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            self.0 += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            self.0 += u32::from(u16::from_be_bytes([*last, 0]));
        }
        self.0 = (self.0 & 0xffff) + (self.0 >> 16);
    }

    fn finish(self) -> u16 {
        let mut s = self.0;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, Ipv4Packet, Ipv6Packet,
    };

    fn udp6(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = 17;
        p[7] = 3;
        p[8..24].copy_from_slice(&"2001:db8:5::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"2001:db8:7::9".parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    fn ping4(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[8] = 3;
        p[9] = 1;
        p[12..16].copy_from_slice(&[198, 51, 100, 2]);
        p[16..20].copy_from_slice(&[192, 0, 2, 130]);
        p[20] = 8;
        p
    }

    #[test]
    fn ipv6_error_is_valid_and_quotes_within_the_minimum_mtu() {
        let original = udp6(1420);
        let mut out = vec![0u8; 1500];
        let n = destination_unreachable(&original, &mut out).unwrap();
        assert_eq!(n, 1280);
        let ip = Ipv6Packet::new_checked(&out[..n]).unwrap();
        assert_eq!(ip.src_addr(), "2001:db8:7::9".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ip.dst_addr(), "2001:db8:5::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ip.hop_limit(), 64);
        let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        let repr = Icmpv6Repr::parse(
            &ip.src_addr(),
            &ip.dst_addr(),
            &icmp,
            &ChecksumCapabilities::default(),
        )
        .expect("checksum and layout verify");
        assert!(matches!(repr, Icmpv6Repr::DstUnreachable { .. }));
        assert_eq!(&out[48..n], &original[..n - 48]);
    }

    #[test]
    fn ipv4_error_is_valid() {
        let original = ping4(84);
        let mut out = vec![0u8; 200];
        let n = destination_unreachable(&original, &mut out).unwrap();
        assert_eq!(n, 28 + 84);
        let ip = Ipv4Packet::new_checked(&out[..n]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), Ipv4Addr::new(192, 0, 2, 130));
        assert_eq!(ip.dst_addr(), Ipv4Addr::new(198, 51, 100, 2));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        let repr = Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap();
        assert!(matches!(repr, Icmpv4Repr::DstUnreachable { .. }));
    }

    #[test]
    fn never_answers_errors_multicast_or_fragments() {
        let mut out = vec![0u8; 1500];
        // An error about our own error would start a ping-pong.
        let mut err = udp6(100);
        err[6] = 58;
        err[40] = 1;
        assert_eq!(destination_unreachable(&err, &mut out), None);
        let mut mcast = udp6(100);
        mcast[24] = 0xff;
        assert_eq!(destination_unreachable(&mcast, &mut out), None);
        let mut err4 = ping4(60);
        err4[20] = 3;
        assert_eq!(destination_unreachable(&err4, &mut out), None);
        let mut frag = ping4(60);
        frag[7] = 10;
        assert_eq!(destination_unreachable(&frag, &mut out), None);
        let mut bcast = ping4(60);
        bcast[12..16].copy_from_slice(&[255, 255, 255, 255]);
        assert_eq!(destination_unreachable(&bcast, &mut out), None);
        assert_eq!(destination_unreachable(&[0x45, 0, 0], &mut out), None);
        assert_eq!(destination_unreachable(&[], &mut out), None);
        assert_eq!(destination_unreachable(&udp6(100), &mut out[..50]), None);
    }
}
