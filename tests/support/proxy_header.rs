//! Reads a PROXY protocol header the way a server behind the agent would, by the
//! HAProxy specification rather than by the code that wrote it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use sidecar::netstack::ProxyProtocol;

/// Splits a PROXY protocol header off `stream`: the (source, destination) it names
/// and the bytes after it.
pub fn parse_proxy_header(
    version: ProxyProtocol,
    stream: &[u8],
) -> ((SocketAddr, SocketAddr), &[u8]) {
    match version {
        ProxyProtocol::V1 => {
            let end = stream
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a v1 header ends in CRLF");
            let line = std::str::from_utf8(&stream[..end]).unwrap();
            let words: Vec<&str> = line.split(' ').collect();
            assert_eq!(words.len(), 6, "{line:?}");
            assert_eq!(words[0], "PROXY");
            let ip = |w: &str| -> IpAddr { w.parse().unwrap() };
            let (src, dst) = (ip(words[2]), ip(words[3]));
            assert_eq!(words[1], if src.is_ipv6() { "TCP6" } else { "TCP4" });
            let port = |w: &str| -> u16 { w.parse().unwrap() };
            (
                (
                    SocketAddr::new(src, port(words[4])),
                    SocketAddr::new(dst, port(words[5])),
                ),
                &stream[end + 2..],
            )
        }
        ProxyProtocol::V2 => {
            assert_eq!(&stream[..12], b"\r\n\r\n\0\r\nQUIT\n", "v2 signature");
            assert_eq!(stream[12], 0x21, "version 2, PROXY command");
            let len = usize::from(u16::from_be_bytes([stream[14], stream[15]]));
            let body = &stream[16..16 + len];
            let (src, dst, ports): (IpAddr, IpAddr, &[u8]) = match stream[13] {
                0x11 => (
                    Ipv4Addr::from(<[u8; 4]>::try_from(&body[0..4]).unwrap()).into(),
                    Ipv4Addr::from(<[u8; 4]>::try_from(&body[4..8]).unwrap()).into(),
                    &body[8..12],
                ),
                0x21 => (
                    Ipv6Addr::from(<[u8; 16]>::try_from(&body[0..16]).unwrap()).into(),
                    Ipv6Addr::from(<[u8; 16]>::try_from(&body[16..32]).unwrap()).into(),
                    &body[32..36],
                ),
                other => panic!("family and protocol {other:#x} is not TCP over IP"),
            };
            let sport = u16::from_be_bytes([ports[0], ports[1]]);
            let dport = u16::from_be_bytes([ports[2], ports[3]]);
            (
                (SocketAddr::new(src, sport), SocketAddr::new(dst, dport)),
                &stream[16 + len..],
            )
        }
    }
}
