//! Real, valid inputs for every target, so mutation starts from deep states: a
//! WireGuard handshake and data packets made with boringtun, Neighbor Solicitations
//! and ARP requests, TCP/UDP/ICMP packets, the example wg-quick file, a relay.toml
//! from `to_commented_toml`, UAPI texts and JSON bodies.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use boringtun::noise::TunnResult;
use sidecar::wg::{Device, Output, PeerConfig};
use sidecar::{IpPrefix, Key};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol,
    IpRepr, Ipv6Packet, Ipv6Repr, NdiscRepr, RawHardwareAddress, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

use super::targets::{self, api_kind, wg_mode};

/// The seeds of one target.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "wg_datagram" => wg_datagram(),
        "neighbor" => neighbor(),
        "netstack" => netstack(),
        "uapi" => uapi(),
        "wgquick" => wgquick(),
        "relay_toml" => relay_toml(),
        "api_body" => api_body(),
        _ => Vec::new(),
    }
}

// ------------------------------------------------------------- IP packets

const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);

fn ip_packet(src: IpAddr, dst: IpAddr, proto: IpProtocol, payload_len: usize) -> (Vec<u8>, usize) {
    let repr = IpRepr::new(src.into(), dst.into(), proto, payload_len, 64);
    let header = repr.header_len();
    let mut buf = vec![0u8; header + payload_len];
    repr.emit(&mut buf[..], &ChecksumCapabilities::default());
    (buf, header)
}

/// A TCP segment; `syn` alone opens a connection.
pub fn tcp(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    control: TcpControl,
    payload: &[u8],
) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: sport,
        dst_port: dport,
        control,
        seq_number: TcpSeqNumber(1000),
        ack_number: (control != TcpControl::Syn).then_some(TcpSeqNumber(1)),
        window_len: 64_000,
        window_scale: (control == TcpControl::Syn).then_some(7),
        max_seg_size: (control == TcpControl::Syn).then_some(1380),
        sack_permitted: control == TcpControl::Syn,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload,
    };
    let (mut buf, h) = ip_packet(src, dst, IpProtocol::Tcp, repr.buffer_len());
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut buf[h..]),
        &IpAddress::from(src),
        &IpAddress::from(dst),
        &ChecksumCapabilities::default(),
    );
    buf
}

pub fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr {
        src_port: sport,
        dst_port: dport,
    };
    let (mut buf, h) = ip_packet(src, dst, IpProtocol::Udp, 8 + payload.len());
    repr.emit(
        &mut UdpPacket::new_unchecked(&mut buf[h..]),
        &IpAddress::from(src),
        &IpAddress::from(dst),
        payload.len(),
        |p| p.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    buf
}

pub fn echo_v4(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 7,
        seq_no: 1,
        data: b"sidecar ping",
    };
    let (mut buf, h) = ip_packet(src.into(), dst.into(), IpProtocol::Icmp, icmp.buffer_len());
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(&mut buf[h..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

pub fn echo_v6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let icmp = Icmpv6Repr::EchoRequest {
        ident: 7,
        seq_no: 1,
        data: b"sidecar ping",
    };
    let (mut buf, h) = ip_packet(
        src.into(),
        dst.into(),
        IpProtocol::Icmpv6,
        icmp.buffer_len(),
    );
    icmp.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut buf[h..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// A spread of packets between `a` and `b` of one family.
fn packets_between(a: IpAddr, b: IpAddr) -> Vec<Vec<u8>> {
    let mut out = vec![
        tcp(a, b, 40000, 80, TcpControl::Syn, &[]),
        tcp(a, b, 40000, 80, TcpControl::None, b"GET / HTTP/1.1\r\n\r\n"),
        tcp(a, b, 40000, 80, TcpControl::Rst, &[]),
        tcp(a, b, 40000, 80, TcpControl::Fin, &[]),
        udp(
            a,
            b,
            5353,
            53,
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
        ),
    ];
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => out.push(echo_v4(a, b)),
        (IpAddr::V6(a), IpAddr::V6(b)) => out.push(echo_v6(a, b)),
        _ => {}
    }
    out
}

// ------------------------------------------------------------- WireGuard

fn wg_datagram() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let with = |mode: u8, src: Option<u8>, body: &[u8]| {
        let mut v = vec![mode];
        v.extend(src);
        v.extend_from_slice(body);
        v
    };
    // A real exchange with a device holding the fixture's keys.
    let device = Device::with_private_key(Key(targets::SERVER_SECRET));
    let mut peer = PeerConfig::new(Key(targets::CLIENT_SECRET).public_key());
    peer.endpoint = Some(targets::CLIENT_ENDPOINT);
    peer.allowed_ips = vec![
        IpPrefix::host(IpAddr::V6(targets::CLIENT_V6)),
        IpPrefix::host(IpAddr::V4(targets::CLIENT_V4)),
    ];
    device.set_peer(&peer);
    let mut client = targets::client_tunn();
    let mut buf = vec![0u8; 4096];
    let mut out = vec![0u8; 4096];
    if let TunnResult::WriteToNetwork(init) = client.format_handshake_initiation(&mut buf, true) {
        let init = init.to_vec();
        seeds.push(with(wg_mode::DATAGRAM, Some(0), &init));
        seeds.push(with(wg_mode::DATAGRAM, Some(1), &init));
        seeds.push(with(wg_mode::DATAGRAM, Some(2), &init));
        let now = std::time::Instant::now();
        let response = match device.handle_datagram(now, targets::CLIENT_ENDPOINT, &init, &mut out)
        {
            Output::Transmit { datagram, .. } => datagram.to_vec(),
            _ => Vec::new(),
        };
        seeds.push(with(wg_mode::DATAGRAM, Some(0), &response));
        if let TunnResult::WriteToNetwork(keepalive) =
            client.decapsulate(Some(targets::CLIENT_ENDPOINT.ip()), &response, &mut buf)
        {
            seeds.push(with(wg_mode::DATAGRAM, Some(0), keepalive));
        }
        let ping = echo_v6(targets::CLIENT_V6, REMOTE_V6);
        if let TunnResult::WriteToNetwork(data) = client.encapsulate(&ping, &mut buf) {
            seeds.push(with(wg_mode::DATAGRAM, Some(0), data));
            seeds.push(with(wg_mode::DATAGRAM, Some(3), data));
        }
    }
    // A cookie reply's shape: type 3, receiver index, nonce, sealed cookie.
    let mut cookie = vec![3u8, 0, 0, 0];
    cookie.extend_from_slice(&(targets::CLIENT_INDEX << 8).to_le_bytes());
    cookie.resize(64, 0xab);
    seeds.push(with(wg_mode::DATAGRAM, Some(0), &cookie));

    let client_v6 = IpAddr::V6(targets::CLIENT_V6);
    let client_v4 = IpAddr::V4(targets::CLIENT_V4);
    for p in packets_between(client_v6, REMOTE_V6.into())
        .into_iter()
        .chain(packets_between(client_v4, REMOTE_V4.into()))
    {
        seeds.push(with(wg_mode::INNER, None, &p));
    }
    // Sources the peer may not use.
    seeds.push(with(
        wg_mode::INNER,
        None,
        &echo_v6(REMOTE_V6, targets::CLIENT_V6),
    ));
    seeds.push(with(
        wg_mode::INNER,
        None,
        &echo_v4(REMOTE_V4, targets::CLIENT_V4),
    ));
    seeds.push(with(wg_mode::INNER, None, &[]));
    for p in packets_between(REMOTE_V6.into(), client_v6)
        .into_iter()
        .chain(packets_between(REMOTE_V4.into(), client_v4))
    {
        seeds.push(with(wg_mode::OUTBOUND, None, &p));
    }
    seeds.push(with(wg_mode::REHANDSHAKE, None, &[]));
    seeds
}

// ------------------------------------------------------------- NDP / ARP

fn ethernet(dst: [u8; 6], ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let repr = EthernetRepr {
        src_addr: EthernetAddress(ROUTER_MAC),
        dst_addr: EthernetAddress(dst),
        ethertype,
    };
    let mut buf = vec![0u8; repr.buffer_len() + payload.len()];
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    repr.emit(&mut frame);
    frame.payload_mut().copy_from_slice(payload);
    buf
}

fn solicitation(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr, lladdr: bool) -> Vec<u8> {
    let icmp = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
        target_addr: target,
        lladdr: lladdr.then(|| RawHardwareAddress::from_bytes(&ROUTER_MAC)),
    });
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: 255,
    };
    let mut buf = vec![0u8; ip.buffer_len() + icmp.buffer_len()];
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut buf[..]));
    icmp.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut buf[ip.buffer_len()..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

fn arp(operation: ArpOperation, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr: EthernetAddress(ROUTER_MAC),
        source_protocol_addr: sender,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut buf = vec![0u8; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut buf[..]));
    buf
}

fn neighbor() -> Vec<Vec<u8>> {
    let target = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5);
    let solicited_node = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 5);
    let group_mac = [0x33, 0x33, 0xff, 0, 0, 5];
    let router = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let v4 = Ipv4Addr::new(203, 0, 113, 17);
    vec![
        ethernet(
            group_mac,
            EthernetProtocol::Ipv6,
            &solicitation(router, solicited_node, target, true),
        ),
        ethernet(
            group_mac,
            EthernetProtocol::Ipv6,
            &solicitation(router, solicited_node, target, false),
        ),
        ethernet(
            targets::OUR_MAC,
            EthernetProtocol::Ipv6,
            &solicitation(router, target, target, true),
        ),
        // Duplicate address detection by someone else.
        ethernet(
            group_mac,
            EthernetProtocol::Ipv6,
            &solicitation(Ipv6Addr::UNSPECIFIED, solicited_node, target, false),
        ),
        ethernet(
            [0xff; 6],
            EthernetProtocol::Arp,
            &arp(ArpOperation::Request, Ipv4Addr::new(203, 0, 113, 1), v4),
        ),
        ethernet(
            targets::OUR_MAC,
            EthernetProtocol::Arp,
            &arp(ArpOperation::Request, Ipv4Addr::new(203, 0, 113, 1), v4),
        ),
        // An RFC 5227 probe.
        ethernet(
            [0xff; 6],
            EthernetProtocol::Arp,
            &arp(ArpOperation::Request, Ipv4Addr::UNSPECIFIED, v4),
        ),
        ethernet(
            [0xff; 6],
            EthernetProtocol::Arp,
            &arp(ArpOperation::Reply, Ipv4Addr::new(203, 0, 113, 1), v4),
        ),
    ]
}

// ------------------------------------------------------------- netstack

fn netstack() -> Vec<Vec<u8>> {
    let v6 = IpAddr::V6(targets::NETSTACK_V6);
    let v4 = IpAddr::V4(targets::NETSTACK_V4);
    let mut seeds = Vec::new();
    for (remote, us) in [(IpAddr::V6(REMOTE_V6), v6), (IpAddr::V4(REMOTE_V4), v4)] {
        for p in packets_between(remote, us) {
            seeds.push(targets::join_packets(&[&p]));
        }
        let syn = tcp(remote, us, 40000, 80, TcpControl::Syn, &[]);
        let data = tcp(remote, us, 40000, 80, TcpControl::Psh, b"hello");
        let fin = tcp(remote, us, 40000, 80, TcpControl::Fin, &[]);
        seeds.push(targets::join_packets(&[&syn, &data, &fin]));
        // Not ours.
        seeds.push(targets::join_packets(&[&tcp(
            remote,
            remote,
            1,
            2,
            TcpControl::Syn,
            &[],
        )]));
    }
    seeds
}

// ------------------------------------------------------------- text formats

fn key_hex(byte: u8) -> String {
    Key([byte; 32]).to_hex()
}

fn uapi() -> Vec<Vec<u8>> {
    let set = format!(
        "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\n\
         public_key={}\npreshared_key={}\nendpoint=[2001:db8::1]:51820\n\
         persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
         allowed_ip=2001:db8:2::/64\nallowed_ip=192.0.2.0/24\nprotocol_version=1\n\
         public_key={}\nendpoint=192.0.2.7:4000\nallowed_ip=198.51.100.0/24\n\n",
        key_hex(1),
        key_hex(2),
        key_hex(3),
        key_hex(4)
    );
    let remove = format!("set=1\npublic_key={}\nremove=true\n\n", key_hex(2));
    let update_only = format!(
        "set=1\npublic_key={}\nupdate_only=true\nallowed_ip=2001:db8:3::1/128\n\n",
        key_hex(4)
    );
    [
        "get=1\n\n".to_string(),
        "metrics=1\n\n".to_string(),
        set,
        remove,
        update_only,
        "errno=0\n\n".to_string(),
        "private_key=01\nerrno=-22\n\n".to_string(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

fn wgquick() -> Vec<Vec<u8>> {
    let example = include_str!("../../config/wg0.conf.example")
        .replace("<base64 private key>", &Key([1; 32]).to_base64())
        .replace(
            "<base64 public key of the other side>",
            &Key([2; 32]).public_key().to_base64(),
        )
        .replace(
            "# PresharedKey = <base64, from `wg genpsk`>",
            &format!("PresharedKey = {}", Key([3; 32]).to_base64()),
        );
    let two_peers = format!(
        "{example}\n[Peer]\nPublicKey = {}\nAllowedIPs = 0.0.0.0/0, ::/0\nEndpoint = [2001:db8::1]:51820\n\
         \n[Interface]\nDNS = 192.0.2.53\nPostUp = true\nTable = off\nFwMark = 0x10\n",
        Key([4; 32]).public_key().to_base64()
    );
    vec![example.into_bytes(), two_peers.into_bytes()]
}

/// The relay configuration the seeds are written from.
pub fn sample_relay_config() -> sidecar_relay::config::RelayConfig {
    use sidecar_relay::config::*;
    RelayConfig {
        data_dir: "/var/lib/sidecar-relay".into(),
        wireguard: WireguardSection {
            listen_port: 51820,
            endpoint: "relay.example.net:51820".parse().unwrap(),
            interface: "sidecar0".into(),
            mtu: 1420,
            keepalive: 25,
        },
        network: NetworkSection {
            ipv6_prefix: "2001:db8:1::/64".parse().unwrap(),
            ipv6_mode: PrefixMode::OnLink,
            ipv4_pool: Some("203.0.113.16/28".parse().unwrap()),
            ipv4_mode: PrefixMode::Routed,
            uplink: Some("eth0".into()),
            reserved: vec![
                "2001:db8:1::1".parse().unwrap(),
                "203.0.113.17".parse().unwrap(),
            ],
            address_hold_hours: default_address_hold_hours(),
            peer_ttl_secs: 0,
        },
        api: ApiSection {
            listen: "[::]:8443".parse().unwrap(),
        },
        limits: LimitsSection::default(),
        pq: PqSection::for_new_relay(),
        metrics: MetricsSection::default(),
        device_login: Default::default(),
    }
}

fn relay_toml() -> Vec<Vec<u8>> {
    let full = sample_relay_config();
    let mut minimal = full.clone();
    minimal.network.ipv4_pool = None;
    minimal.network.uplink = None;
    minimal.network.ipv6_mode = sidecar_relay::config::PrefixMode::Routed;
    minimal.network.reserved.clear();
    vec![
        full.to_commented_toml().into_bytes(),
        minimal.to_commented_toml().into_bytes(),
    ]
}

fn api_body() -> Vec<Vec<u8>> {
    let pubkey = Key([5; 32]).public_key().to_base64();
    let with = |kind: u8, json: String| {
        let mut v = vec![kind];
        v.extend_from_slice(json.as_bytes());
        v
    };
    vec![
        with(
            api_kind::REGISTER,
            format!(r#"{{"pubkey":"{pubkey}","ipv4":true,"name":"web","container":"3f2a9c1e0b7d"}}"#),
        ),
        with(api_kind::REGISTER, format!(r#"{{"pubkey":"{pubkey}"}}"#)),
        with(api_kind::DELETE, format!(r#"{{"pubkey":"{pubkey}"}}"#)),
        with(
            api_kind::CREATE_TOKEN,
            r#"{"name":"team blue","max_peers":10,"max_ipv4":2,"bandwidth_mbps":100,"isolate_peers":true}"#.into(),
        ),
        with(api_kind::CREATE_TOKEN, r#"{"name":"t","max_peers":0,"max_ipv4":0}"#.into()),
        with(api_kind::REVOKE_TOKEN, r#"{"id":"tok_0123456789ab"}"#.into()),
    ]
}
