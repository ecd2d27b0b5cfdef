//! Neighbour discovery answers checked against frames Linux really sends.
//!
//! The unit tests in `src/neighbor_reply.rs` build their solicitations with smoltcp, the
//! same library that parses them, so a shared misreading of the RFC would go unseen.
//! Here the inputs are frames captured from a Linux 6.18 kernel (`ping` from one
//! end of a veth pair, read with an `AF_PACKET` socket at the other end) and the
//! expected replies are written out byte by byte, with the ICMPv6 checksum computed
//! by an independent RFC 1071 implementation.

use std::net::{Ipv4Addr, Ipv6Addr};

use sidecar::neighbor_reply::{
    answer_arp_request, answer_neighbor_solicitation, neighbor_advertisement_with_checksum,
    RxChecksum,
};

const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const OURS: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xabcd);
const OURS4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);

/// `ping -c1 2001:db8:1::abcd` from 2001:db8:1::1 (MAC 02:00:00:00:00:01): the
/// multicast solicitation to ff02::1:ff00:abcd with a source link-layer option.
const LINUX_NS: &str = "3333ff00abcd02000000000186dd6000000000203aff20010db80001000000000000\
                        00000001ff0200000000000000000001ff00abcd8700c48d0000000020010db80001\
                        0000000000000000abcd0101020000000001";

/// The same solicitation handed to a Linux 6.18 veth by a sender that left its
/// checksum to the NIC (a packet socket with a vnet header asking for
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`, as a VM's virtio device does), read at the other end
/// with `PACKET_AUXDATA`: status `TP_STATUS_CSUMNOTREADY`, and the checksum field
/// (0xd7e7) holds only the folded pseudo-header sum. The kernel of the receiving
/// namespace answers such a solicitation for its own address.
const LINUX_NS_CSUM_NOT_READY: &str =
    "3333ff00abcd02000000000186dd6000000000203aff20010db80001000000000000\
     00000001ff0200000000000000000001ff00abcd8700d7e70000000020010db80001\
     0000000000000000abcd0101020000000001";

/// `ping -c1 192.0.2.77` from 192.0.2.1: a broadcast who-has, unpadded as a veth
/// delivers it.
const LINUX_ARP: &str = "ffffffffffff02000000000108060001080006040001020000000001c0000201000000\
                         000000c000024d";

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0);
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The Internet checksum over the IPv6 pseudo-header and `icmp` (RFC 1071, 8200 §8.1).
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(icmp);
    if data.len() % 2 == 1 {
        data.push(0);
    }
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The advertisement answering `LINUX_NS` (and `LINUX_NS_CSUM_NOT_READY`).
fn expected_advertisement() -> Vec<u8> {
    let mut expected = Vec::new();
    expected.extend_from_slice(&ROUTER_MAC); // to the solicitation's link-layer option
    expected.extend_from_slice(&OUR_MAC);
    expected.extend_from_slice(&[0x86, 0xdd]);
    expected.extend_from_slice(&[0x60, 0, 0, 0, 0, 32, 58, 255]);
    expected.extend_from_slice(&OURS.octets());
    expected.extend_from_slice(&ROUTER.octets());
    let icmp_start = expected.len();
    expected.extend_from_slice(&[136, 0, 0, 0]); // type NA, code 0, checksum below
    expected.extend_from_slice(&[0x60, 0, 0, 0]); // Solicited + Override
    expected.extend_from_slice(&OURS.octets());
    expected.extend_from_slice(&[2, 1]);
    expected.extend_from_slice(&OUR_MAC);
    let sum = icmpv6_checksum(OURS, ROUTER, &expected[icmp_start..]);
    expected[icmp_start + 2..icmp_start + 4].copy_from_slice(&sum.to_be_bytes());
    assert_eq!(icmpv6_checksum(OURS, ROUTER, &expected[icmp_start..]), 0);
    expected
}

#[test]
fn captured_linux_solicitation_is_answered_exactly() {
    let ns = hex(LINUX_NS);
    // The fixture itself must be sound: its checksum verifies as a whole.
    assert_eq!(
        icmpv6_checksum(ROUTER, "ff02::1:ff00:abcd".parse().unwrap(), &ns[54..]),
        0
    );

    let mut out = [0u8; 1514];
    let len = answer_neighbor_solicitation(&ns, OUR_MAC, |a| a == OURS, &mut out)
        .expect("a solicitation for an owned address is answered");
    assert_eq!(&out[..len], &expected_advertisement()[..]);
}

#[test]
fn captured_solicitation_with_checksum_left_to_the_nic_is_answered_when_the_kernel_says_so() {
    let ns = hex(LINUX_NS_CSUM_NOT_READY);
    // Only the checksum differs from the finished frame, and it does not verify.
    let finished = hex(LINUX_NS);
    assert_eq!(ns.len(), finished.len());
    let differ: Vec<usize> = (0..ns.len()).filter(|&i| ns[i] != finished[i]).collect();
    assert_eq!(differ, [56, 57]);
    assert_ne!(
        icmpv6_checksum(ROUTER, "ff02::1:ff00:abcd".parse().unwrap(), &ns[54..]),
        0
    );

    let mut out = [0u8; 1514];
    // Without the kernel's word the frame is corrupt and goes unanswered.
    assert_eq!(
        answer_neighbor_solicitation(&ns, OUR_MAC, |a| a == OURS, &mut out),
        None
    );
    let computed = RxChecksum::Computed;
    assert_eq!(
        neighbor_advertisement_with_checksum(&ns, computed, OUR_MAC, |a| a == OURS, &mut out),
        None
    );
    let not_ready = RxChecksum::NotReady;
    let answer =
        neighbor_advertisement_with_checksum(&ns, not_ready, OUR_MAC, |a| a == OURS, &mut out)
            .expect("the kernel vouches for the frame");
    assert_eq!(answer.target, OURS);
    assert_eq!(answer.requester, ROUTER);
    assert_eq!(&out[..answer.len], &expected_advertisement()[..]);
}

#[test]
fn captured_linux_solicitation_for_another_address_is_ignored() {
    let ns = hex(LINUX_NS);
    let mut out = [0u8; 1514];
    assert_eq!(
        answer_neighbor_solicitation(&ns, OUR_MAC, |a| a != OURS, &mut out),
        None
    );
    // An ARP request is not a solicitation, and the other way round.
    assert_eq!(
        answer_neighbor_solicitation(&hex(LINUX_ARP), OUR_MAC, |_| true, &mut out),
        None
    );
    assert_eq!(answer_arp_request(&ns, OUR_MAC, |_| true, &mut out), None);
}

#[test]
fn captured_linux_arp_request_is_answered_exactly() {
    let req = hex(LINUX_ARP);
    let mut out = [0u8; 1514];
    let len = answer_arp_request(&req, OUR_MAC, |a| a == OURS4, &mut out)
        .expect("a request for an owned address is answered");

    let mut expected = Vec::new();
    expected.extend_from_slice(&ROUTER_MAC);
    expected.extend_from_slice(&OUR_MAC);
    expected.extend_from_slice(&[0x08, 0x06]);
    expected.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 2]); // Ethernet, IPv4, reply
    expected.extend_from_slice(&OUR_MAC);
    expected.extend_from_slice(&OURS4.octets());
    expected.extend_from_slice(&ROUTER_MAC);
    expected.extend_from_slice(&[192, 0, 2, 1]);
    expected.resize(60, 0);
    assert_eq!(&out[..len], &expected[..]);

    assert_eq!(
        answer_arp_request(&req, OUR_MAC, |a| a != OURS4, &mut out),
        None
    );
}
