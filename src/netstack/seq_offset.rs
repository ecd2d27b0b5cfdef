//! Moving a TCP connection from smoltcp's sequence space to ours.
//!
//! smoltcp picks its own initial sequence numbers and offers no way to supply one
//! (see [`super::isn`]). Each connection therefore carries an offset: the difference
//! between the ISN we want and the one smoltcp chose, learnt from its SYN-ACK. Our
//! sequence numbers go out shifted by it; the client's acknowledgements (and SACK
//! blocks) come in shifted back. The checksum is patched incrementally (RFC 1624),
//! so a segment that was corrupt stays corrupt.

use smoltcp::wire::{IpAddress, IpEndpoint};

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;

/// Where a TCP segment sits in an IP packet, and who it is between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) src: IpEndpoint,
    pub(super) dst: IpEndpoint,
    /// Offset of the TCP header in the packet.
    start: usize,
    /// Length of the TCP header, options included.
    header_len: usize,
}

impl Segment {
    /// The TCP segment in `packet`, if it is one (IPv4 without options past the
    /// header, or IPv6 with TCP as the first next header: what smoltcp emits and what
    /// the driver lets through).
    pub(super) fn find(packet: &[u8]) -> Option<Segment> {
        let (src, dst, start) = match packet.first()? >> 4 {
            4 => {
                let ihl = usize::from(packet[0] & 0x0f) * 4;
                if *packet.get(9)? != 6 || ihl < 20 {
                    return None;
                }
                let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
                let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
                (
                    IpAddress::Ipv4(src.into()),
                    IpAddress::Ipv4(dst.into()),
                    ihl,
                )
            }
            6 => {
                if *packet.get(6)? != 6 {
                    return None;
                }
                let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
                let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
                (IpAddress::Ipv6(src.into()), IpAddress::Ipv6(dst.into()), 40)
            }
            _ => return None,
        };
        let tcp = packet.get(start..start + 20)?;
        let header_len = usize::from(tcp[12] >> 4) * 4;
        if header_len < 20 || packet.len() < start + header_len {
            return None;
        }
        let port = |i: usize| u16::from_be_bytes([tcp[i], tcp[i + 1]]);
        Some(Segment {
            src: IpEndpoint::new(src, port(0)),
            dst: IpEndpoint::new(dst, port(2)),
            start,
            header_len,
        })
    }

    fn flags(&self, packet: &[u8]) -> u8 {
        packet[self.start + 13]
    }

    /// A SYN-ACK: the segment that reveals smoltcp's ISN.
    pub(super) fn is_syn_ack(&self, packet: &[u8]) -> bool {
        self.flags(packet) & (SYN | ACK) == SYN | ACK
    }

    pub(super) fn seq(&self, packet: &[u8]) -> u32 {
        read_u32(packet, self.start + 4)
    }

    /// Outbound: adds `offset` to the sequence number.
    pub(super) fn shift_seq(&self, packet: &mut [u8], offset: u32) {
        let at = self.start + 4;
        let old = read_u32(packet, at);
        self.rewrite(packet, at, old.wrapping_add(offset));
    }

    /// Inbound: takes `offset` off the acknowledgement number and the SACK edges,
    /// which all count in our sequence space.
    pub(super) fn unshift_acks(&self, packet: &mut [u8], offset: u32) {
        if self.flags(packet) & ACK == 0 {
            return;
        }
        let at = self.start + 8;
        let old = read_u32(packet, at);
        self.rewrite(packet, at, old.wrapping_sub(offset));

        let mut i = self.start + 20;
        let end = self.start + self.header_len;
        while i < end {
            match packet[i] {
                OPT_END => break,
                OPT_NOP => i += 1,
                kind => {
                    let Some(&len) = packet.get(i + 1) else { break };
                    let len = usize::from(len);
                    if len < 2 || i + len > end {
                        // Malformed options: smoltcp will judge the segment itself.
                        break;
                    }
                    if kind == OPT_SACK {
                        let mut edge = i + 2;
                        while edge + 4 <= i + len {
                            let old = read_u32(packet, edge);
                            self.rewrite(packet, edge, old.wrapping_sub(offset));
                            edge += 4;
                        }
                    }
                    i += len;
                }
            }
        }
    }

    fn rewrite(&self, packet: &mut [u8], at: usize, new: u32) {
        let old = read_u32(packet, at);
        packet[at..at + 4].copy_from_slice(&new.to_be_bytes());
        let sum_at = self.start + 16;
        let sum = u16::from_be_bytes([packet[sum_at], packet[sum_at + 1]]);
        let sum = patch_checksum(sum, old, new);
        packet[sum_at..sum_at + 2].copy_from_slice(&sum.to_be_bytes());
    }
}

fn read_u32(packet: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([packet[at], packet[at + 1], packet[at + 2], packet[at + 3]])
}

/// RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'), for both 16-bit halves of a word.
fn patch_checksum(sum: u16, old: u32, new: u32) -> u16 {
    let mut acc = u32::from(!sum);
    for (o, n) in [(old >> 16, new >> 16), (old & 0xffff, new & 0xffff)] {
        acc += u32::from(!(o as u16)) + n;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr,
        TcpSeqNumber,
    };

    use super::*;

    fn segment(v6: bool, control: TcpControl, seq: i32, ack: Option<i32>) -> Vec<u8> {
        let caps = ChecksumCapabilities::default();
        let (src, dst) = if v6 {
            (
                IpAddress::Ipv6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                IpAddress::Ipv6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
            )
        } else {
            (
                IpAddress::Ipv4(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddress::Ipv4(Ipv4Addr::new(192, 0, 2, 2)),
            )
        };
        let repr = TcpRepr {
            src_port: 443,
            dst_port: 40000,
            control,
            seq_number: TcpSeqNumber(seq),
            ack_number: ack.map(TcpSeqNumber),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [
                ack.map(|a| (a as u32 + 100, a as u32 + 200)),
                ack.map(|a| (a as u32 + 300, a as u32 + 400)),
                None,
            ],
            timestamp: None,
            payload: b"data",
        };
        let hdr = if v6 { 40 } else { 20 };
        let mut p = vec![0; hdr + repr.buffer_len()];
        match (src, dst) {
            (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: repr.buffer_len(),
                hop_limit: 64,
            }
            .emit(&mut Ipv6Packet::new_unchecked(&mut p[..])),
            (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: repr.buffer_len(),
                hop_limit: 64,
            }
            .emit(&mut Ipv4Packet::new_unchecked(&mut p[..]), &caps),
            _ => unreachable!(),
        }
        repr.emit(
            &mut TcpPacket::new_unchecked(&mut p[hdr..]),
            &src,
            &dst,
            &caps,
        );
        p
    }

    fn parse(p: &[u8], v6: bool) -> (u32, Option<u32>, Vec<(u32, u32)>) {
        let hdr = if v6 { 40 } else { 20 };
        let seg = Segment::find(p).unwrap();
        let tcp = TcpPacket::new_checked(&p[hdr..]).unwrap();
        let repr = TcpRepr::parse(
            &tcp,
            &seg.src.addr,
            &seg.dst.addr,
            &ChecksumCapabilities::default(),
        )
        .expect("checksum still valid");
        (
            repr.seq_number.0 as u32,
            repr.ack_number.map(|a| a.0 as u32),
            repr.sack_ranges.iter().flatten().copied().collect(),
        )
    }

    #[test]
    fn shifts_keep_checksums_valid_in_both_families() {
        for v6 in [false, true] {
            for offset in [1u32, 0x8000_0000, 0xffff_fffe, 0x1234_5678] {
                let mut p = segment(v6, TcpControl::Syn, -5, Some(1000));
                let seg = Segment::find(&p).unwrap();
                assert!(seg.is_syn_ack(&p));
                assert_eq!(seg.dst.port, 40000);
                seg.shift_seq(&mut p, offset);
                seg.unshift_acks(&mut p, offset);
                let (seq, ack, sack) = parse(&p, v6);
                assert_eq!(seq, (-5i32 as u32).wrapping_add(offset));
                assert_eq!(ack, Some(1000u32.wrapping_sub(offset)));
                assert_eq!(
                    sack,
                    vec![
                        (1100u32.wrapping_sub(offset), 1200u32.wrapping_sub(offset)),
                        (1300u32.wrapping_sub(offset), 1400u32.wrapping_sub(offset)),
                    ]
                );
            }
        }
    }

    #[test]
    fn segments_without_ack_keep_their_ack_field() {
        let mut p = segment(true, TcpControl::Syn, 77, None);
        let before = p.clone();
        let seg = Segment::find(&p).unwrap();
        assert!(!seg.is_syn_ack(&p));
        seg.unshift_acks(&mut p, 12345);
        assert_eq!(p, before);
    }

    #[test]
    fn truncated_and_foreign_packets_are_not_segments() {
        let p = segment(false, TcpControl::None, 1, Some(2));
        for len in 0..40 {
            assert_eq!(Segment::find(&p[..len]), None, "length {len}");
        }
        let mut udp = p.clone();
        udp[9] = 17;
        assert_eq!(Segment::find(&udp), None);
        let mut bad_offset = p.clone();
        bad_offset[20 + 12] = 0xf0;
        assert_eq!(Segment::find(&bad_offset), None);
    }

    #[test]
    fn malformed_options_never_panic() {
        let base = segment(false, TcpControl::None, 1, Some(2));
        for i in 40..base.len().min(60) {
            for b in [0u8, 1, 2, 5, 0xff] {
                let mut p = base.clone();
                p[i] = b;
                if let Some(seg) = Segment::find(&p) {
                    seg.unshift_acks(&mut p, 99);
                }
            }
        }
    }
}
