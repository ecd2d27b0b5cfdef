//! A peer's addresses as the API writes them: single-address prefixes
//! (`2001:db8::1/128`, `192.0.2.1/32`), the form `Address =` takes in a WireGuard
//! configuration. Anything else (another length, the other family) is refused, so a
//! decoded body holds exactly one address of the right family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};
use sidecar::IpPrefix;

fn single<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    let prefix = IpPrefix::deserialize(d)?;
    if prefix.len() != IpPrefix::host(prefix.addr()).len() {
        return Err(D::Error::custom(format!(
            "{prefix} is not a single address (addr/128 or addr/32)"
        )));
    }
    Ok(prefix.addr())
}

pub mod ipv6 {
    use super::*;

    pub fn serialize<S: Serializer>(addr: &Ipv6Addr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&IpPrefix::host(IpAddr::V6(*addr)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv6Addr, D::Error> {
        match single(d)? {
            IpAddr::V6(addr) => Ok(addr),
            IpAddr::V4(addr) => Err(D::Error::custom(format!(
                "{addr} is an IPv4 address where an IPv6 address/128 belongs"
            ))),
        }
    }
}

pub mod optional_ipv4 {
    use super::*;

    pub fn serialize<S: Serializer>(addr: &Option<Ipv4Addr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(&IpPrefix::host(IpAddr::V4(*addr))),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
        #[derive(Deserialize)]
        struct Host(#[serde(deserialize_with = "v4")] Ipv4Addr);

        fn v4<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
            match single(d)? {
                IpAddr::V4(addr) => Ok(addr),
                IpAddr::V6(addr) => Err(D::Error::custom(format!(
                    "{addr} is an IPv6 address where an IPv4 address/32 belongs"
                ))),
            }
        }

        Ok(Option::<Host>::deserialize(d)?.map(|Host(addr)| addr))
    }
}

/// An optional IPv4 address without a prefix length, and an empty string for none:
/// the plain form of `GET /v1/peers/by-container/{id}`.
pub mod bare_optional_ipv4 {
    use super::*;

    pub fn serialize<S: Serializer>(addr: &Option<Ipv4Addr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{text:?} is not an IPv4 address")))
    }
}
