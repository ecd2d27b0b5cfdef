//! The PROXY protocol header (HAProxy's v1 text or v2 binary form) that starts each
//! forwarded TCP connection when the container asks for one, so a server behind the
//! stack sees the real client's address and port instead of the agent's.

use std::net::SocketAddr;

/// Which form of the PROXY protocol header starts each forwarded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// `PROXY TCP6 client public cport pport\r\n`: readable, understood everywhere.
    V1,
    /// The binary form: fixed size, no text to parse.
    V2,
}

impl std::str::FromStr for ProxyProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<ProxyProtocol, String> {
        match s {
            "v1" | "1" => Ok(ProxyProtocol::V1),
            "v2" | "2" => Ok(ProxyProtocol::V2),
            other => Err(format!(
                "unknown PROXY protocol version {other:?}: use v1 or v2"
            )),
        }
    }
}

impl ProxyProtocol {
    /// The header for a connection from `client` to the container's `public` address.
    /// Both are of one family: the stack only joins a client to an address of its own.
    pub(super) fn header(self, client: SocketAddr, public: SocketAddr) -> Vec<u8> {
        match self {
            ProxyProtocol::V1 => ppp::v1::Addresses::from((client, public))
                .to_string()
                .into_bytes(),
            ProxyProtocol::V2 => ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                (client, public),
            )
            .build()
            // Building into a Vec with two addresses and no TLVs cannot fail.
            .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_names_client_then_public_address() {
        let client: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let public: SocketAddr = "[2001:db8:1::5]:443".parse().unwrap();
        assert_eq!(
            ProxyProtocol::V1.header(client, public),
            b"PROXY TCP6 2001:db8::7 2001:db8:1::5 40000 443\r\n"
        );
        let client: SocketAddr = "192.0.2.9:1234".parse().unwrap();
        let public: SocketAddr = "203.0.113.5:25".parse().unwrap();
        assert_eq!(
            ProxyProtocol::V1.header(client, public),
            b"PROXY TCP4 192.0.2.9 203.0.113.5 1234 25\r\n"
        );
    }

    #[test]
    fn v2_is_the_binary_form_with_both_addresses() {
        let client: SocketAddr = "192.0.2.9:1234".parse().unwrap();
        let public: SocketAddr = "203.0.113.5:25".parse().unwrap();
        let h = ProxyProtocol::V2.header(client, public);
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        // Version 2, PROXY; TCP over IPv4; 12 bytes of addresses.
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 9, 203, 0, 113, 5]);
        want.extend_from_slice(&1234u16.to_be_bytes());
        want.extend_from_slice(&25u16.to_be_bytes());
        assert_eq!(h, want);
        let client: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let public: SocketAddr = "[2001:db8:1::5]:443".parse().unwrap();
        let h = ProxyProtocol::V2.header(client, public);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
    }

    #[test]
    fn versions_parse_strictly() {
        assert_eq!("v2".parse(), Ok(ProxyProtocol::V2));
        assert_eq!("v1".parse(), Ok(ProxyProtocol::V1));
        assert!("v3".parse::<ProxyProtocol>().is_err());
        assert!("".parse::<ProxyProtocol>().is_err());
    }
}
