//! Turning a configured [`Endpoint`] into a socket address.
//!
//! Host names go through hickory-resolver with the system configuration: name
//! servers from `/etc/resolv.conf`, and `/etc/hosts` consulted first (hickory's
//! default `ResolveHosts::Auto` loads it). `localhost` never leaves the machine:
//! hickory answers it itself (RFC 6761) when `/etc/hosts` does not.

use std::net::SocketAddr;

use hickory_resolver::config::ResolverConfig;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::{Resolver, TokioResolver};

use sidecar::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(#[source] NetError),
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: NetError,
    },
    #[error(
        "cannot resolve {host}: it is not in /etc/hosts, and no DNS servers are usable ({config})"
    )]
    NoDns {
        host: String,
        /// Why the system DNS configuration could not be read.
        config: NetError,
    },
    #[error("{host} has no IPv4 or IPv6 address")]
    NoAddress { host: String },
}

/// Resolves `ep` to one socket address. Addresses are returned as they are, with
/// no lookup; host names are looked up with a resolver built from the system
/// configuration for this call (so edits to `/etc/resolv.conf` are picked up).
///
/// The first address the resolver returns wins. With hickory's default strategy
/// (`Ipv6AndIpv4`) that is an IPv6 address whenever the name has one, so on a host
/// without IPv6 connectivity a dual-stack name gives an unreachable endpoint;
/// write an IPv4 address or a v4-only name there. To resolve many endpoints, build
/// one resolver and use [`resolve_endpoint_with`].
pub async fn resolve_endpoint(ep: &Endpoint) -> Result<SocketAddr, ResolveError> {
    match ep {
        Endpoint::Addr(addr) => Ok(*addr),
        Endpoint::Host { host, .. } => {
            let (resolver, config_error) = system_resolver()?;
            resolve_endpoint_with(&resolver, ep)
                .await
                .map_err(|e| match (e, config_error) {
                    (ResolveError::Lookup { .. }, Some(config)) => ResolveError::NoDns {
                        host: host.clone(),
                        config,
                    },
                    (e, _) => e,
                })
        }
    }
}

/// As [`resolve_endpoint`], with a caller-provided resolver (and its cache).
pub async fn resolve_endpoint_with(
    resolver: &TokioResolver,
    ep: &Endpoint,
) -> Result<SocketAddr, ResolveError> {
    let (host, port) = match ep {
        Endpoint::Addr(addr) => return Ok(*addr),
        Endpoint::Host { host, port } => (host, *port),
    };
    let lookup =
        resolver
            .lookup_ip(host.as_str())
            .await
            .map_err(|source| ResolveError::Lookup {
                host: host.clone(),
                source,
            })?;
    let ip = lookup
        .iter()
        .next()
        .ok_or_else(|| ResolveError::NoAddress { host: host.clone() })?;
    Ok(SocketAddr::new(ip, port))
}

/// The system resolver, or, when `/etc/resolv.conf` is missing or lists no name
/// servers (common in minimal containers), one without name servers that still
/// answers from `/etc/hosts` and for `localhost`. The second value is the reason
/// the system configuration was not used.
pub fn system_resolver() -> Result<(TokioResolver, Option<NetError>), ResolveError> {
    match TokioResolver::builder_tokio() {
        Ok(builder) => Ok((builder.build().map_err(ResolveError::Setup)?, None)),
        Err(config_error) => {
            tracing::debug!(%config_error, "no usable DNS configuration; using /etc/hosts only");
            let hosts_only = Resolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
                TokioRuntimeProvider::default(),
            )
            .build()
            .map_err(ResolveError::Setup)?;
            Ok((hosts_only, Some(config_error)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_need_no_lookup() {
        for s in ["192.0.2.1:51820", "[2001:db8::1]:4500"] {
            let addr: SocketAddr = s.parse().unwrap();
            let got = resolve_endpoint(&Endpoint::Addr(addr)).await.unwrap();
            assert_eq!(got, addr);
        }
        // A literal that reached the Host variant is still not sent to DNS.
        let (resolver, _) = system_resolver().unwrap();
        let ep = Endpoint::Host {
            host: "198.51.100.4".into(),
            port: 7,
        };
        assert_eq!(
            resolve_endpoint_with(&resolver, &ep).await.unwrap(),
            "198.51.100.4:7".parse::<SocketAddr>().unwrap()
        );
    }

    #[tokio::test]
    async fn localhost_is_loopback() {
        let ep: Endpoint = "localhost:51820".parse().unwrap();
        let addr = resolve_endpoint(&ep).await.unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        assert_eq!(addr.port(), 51820);
    }

    #[tokio::test]
    async fn hosts_only_fallback_answers_localhost() {
        let resolver = Resolver::builder_with_config(
            ResolverConfig::from_parts(None, Vec::new(), Vec::new()),
            TokioRuntimeProvider::default(),
        )
        .build()
        .unwrap();
        let ep = Endpoint::Host {
            host: "localhost".into(),
            port: 1,
        };
        let addr = resolve_endpoint_with(&resolver, &ep).await.unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
        // A real name fails cleanly rather than hanging or panicking.
        let ep = Endpoint::Host {
            host: "relay.example.invalid".into(),
            port: 1,
        };
        assert!(resolve_endpoint_with(&resolver, &ep).await.is_err());
    }
}
