//! Peer endpoints as WireGuard configurations write them: `host:port`,
//! `192.0.2.1:port` or `[2001:db8::1]:port`.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// Why an endpoint was refused; the text says what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EndpointError(String);

/// Where a peer is reached: an address, or a host name its user resolves (the agent
/// does, before it hands the engine a socket address).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

impl Endpoint {
    pub fn port(&self) -> u16 {
        match self {
            Endpoint::Addr(addr) => addr.port(),
            Endpoint::Host { port, .. } => *port,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(addr) => write!(f, "{addr}"),
            Endpoint::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    /// Parses `host:port`, `1.2.3.4:port` or `[v6]:port`. An IPv6 address must be
    /// bracketed: wg would split `2001:db8::1:51820` at the last colon, but that is
    /// ambiguous to a reader, so it is refused.
    fn from_str(s: &str) -> Result<Endpoint, EndpointError> {
        parse(s).map_err(EndpointError)
    }
}

fn parse(s: &str) -> Result<Endpoint, String> {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{s}` is missing the closing `]`"))?;
        let port = after.strip_prefix(':').ok_or_else(|| {
            format!("`{s}` needs a port after the `]`, as in [2001:db8::1]:51820")
        })?;
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| format!("`{host}` in brackets is not an IPv6 address"))?;
        return Ok(Endpoint::Addr(SocketAddr::new(
            ip.into(),
            parse_port(port)?,
        )));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` is not of the form host:port"))?;
    if host.contains(':') {
        return Err(format!(
            "`{s}`: write an IPv6 endpoint in brackets, as in [2001:db8::1]:51820"
        ));
    }
    let port = parse_port(port)?;
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Endpoint::Addr(SocketAddr::new(ip.into(), port)));
    }
    check_hostname(host)?;
    Ok(Endpoint::Host {
        host: host.to_string(),
        port,
    })
}

fn parse_port(s: &str) -> Result<u16, String> {
    match parse_number(s) {
        Some(0) => Err("port 0 cannot be sent to".to_string()),
        Some(port) => Ok(port),
        None => Err(format!("port `{s}` is not a number from 1 to 65535")),
    }
}

/// Syntax check only (RFC 1123 labels, plus `_` which real zones use); whether the
/// name exists is for the resolver to say.
fn check_hostname(host: &str) -> Result<(), String> {
    let bad = || format!("`{host}` is not an IPv4 address or a host name");
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    let mut all_numeric = true;
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(bad());
        }
        all_numeric &= label.bytes().all(|b| b.is_ascii_digit());
    }
    // `10.0.0.256` or `1.2.3` is a mistyped address, not a name to look up.
    if all_numeric {
        return Err(format!("`{host}` is not a valid IPv4 address"));
    }
    Ok(())
}

/// Plain decimal digits only: `u16::from_str` would also take `+5`.
fn parse_number(s: &str) -> Option<u16> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Serialized as its text form, `host:port` (IPv6 in brackets).
#[cfg(feature = "serde")]
impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Endpoint, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let ok = |s: &str| s.parse::<Endpoint>().unwrap();
        assert_eq!(
            ok("192.0.2.1:51820"),
            Endpoint::Addr("192.0.2.1:51820".parse().unwrap())
        );
        assert_eq!(
            ok("[2001:db8::5]:1"),
            Endpoint::Addr("[2001:db8::5]:1".parse().unwrap())
        );
        assert_eq!(
            ok("vpn-1.example.org.:443"),
            Endpoint::Host {
                host: "vpn-1.example.org.".into(),
                port: 443
            }
        );
        assert_eq!(ok("localhost:9").to_string(), "localhost:9");
        assert_eq!(ok("[2001:db8::5]:1").to_string(), "[2001:db8::5]:1");
        for bad in [
            "",
            "192.0.2.1",
            "192.0.2.1:",
            "192.0.2.1:0",
            "192.0.2.1:65536",
            "192.0.2.1:+5",
            "2001:db8::1:51820",
            "[2001:db8::1]",
            "[2001:db8::1]51820",
            "[2001:db8::1:51820",
            "[192.0.2.1]:5",
            "192.0.2.256:5",
            "10.1.2:5",
            "exa mple.com:5",
            "-bad.example:5",
            "a..b:5",
            ":5",
        ] {
            assert!(
                bad.parse::<Endpoint>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }
}
