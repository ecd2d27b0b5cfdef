//! IP prefixes (`addr/len`) as used for allowed IPs, interface addresses and routes.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address with a prefix length. The address keeps its host bits (so it can also
/// describe an interface address such as `10.0.0.1/24`); [`IpPrefix::network`] masks them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefixError {
    #[error("'{0}' is not an IP address")]
    Address(String),
    #[error("prefix length '{0}' is not a number")]
    Length(String),
    #[error("prefix length {len} is too long for {addr} (at most {max})")]
    TooLong { addr: IpAddr, len: u8, max: u8 },
}

impl IpPrefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<IpPrefix, PrefixError> {
        let max = max_len(addr);
        if len > max {
            return Err(PrefixError::TooLong { addr, len, max });
        }
        Ok(IpPrefix { addr, len })
    }

    /// A single-address prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> IpPrefix {
        IpPrefix {
            addr,
            len: max_len(addr),
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits (a prefix is never "empty", so no `is_empty`).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The prefix with its host bits cleared.
    pub fn network(&self) -> IpPrefix {
        IpPrefix {
            addr: mask(self.addr, self.len),
            len: self.len,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == mask(self.addr, self.len)
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

/// Clears all but the first `len` bits of `addr`.
pub fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl FromStr for IpPrefix {
    type Err = PrefixError;
    /// Parses `addr/len`, or a bare address as a host prefix.
    fn from_str(s: &str) -> Result<IpPrefix, PrefixError> {
        let s = s.trim();
        let (addr_s, len_s) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .parse()
            .map_err(|_| PrefixError::Address(addr_s.to_string()))?;
        match len_s {
            None => Ok(IpPrefix::host(addr)),
            Some(l) => {
                let len: u8 = l.parse().map_err(|_| PrefixError::Length(l.to_string()))?;
                IpPrefix::new(addr, len)
            }
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Serialized as its text form, `addr/len`.
#[cfg(feature = "serde")]
impl serde::Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for IpPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IpPrefix, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks() {
        let p: IpPrefix = "10.1.2.3/16".parse().unwrap();
        assert_eq!(p.to_string(), "10.1.2.3/16");
        assert_eq!(p.network().to_string(), "10.1.0.0/16");
        assert!(p.contains("10.1.200.1".parse().unwrap()));
        assert!(!p.contains("10.2.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let h: IpPrefix = "2001:db8::1".parse().unwrap();
        assert_eq!(h.len(), 128);
        let all: IpPrefix = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::5".parse().unwrap()));
    }

    #[test]
    fn rejects_bad_prefixes() {
        assert!(matches!(
            "10.0.0.0/33".parse::<IpPrefix>(),
            Err(PrefixError::TooLong { .. })
        ));
        assert!(matches!(
            "foo/3".parse::<IpPrefix>(),
            Err(PrefixError::Address(_))
        ));
        assert!(matches!(
            "10.0.0.0/x".parse::<IpPrefix>(),
            Err(PrefixError::Length(_))
        ));
    }
}
