//! `sidecar-agent up`: a userspace `wg-quick up`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sidecar::driver::Driver;
use sidecar::route;
use sidecar::tun::TunDevice;
use sidecar::uapi::{validate_interface_name, UapiServer};
use sidecar::udp::UdpTransport;
use sidecar::wg::{Device, DeviceConfig, DeviceUpdate};
use sidecar::wgquick;
use sidecar::Endpoint;
use sidecar::IpPrefix;
use sidecar_agent::full_tunnel::{self, Families, FullTunnel};
use sidecar_agent::interface::{self, StopSignals};
use sidecar_agent::resolve::{resolve_endpoint_with, system_resolver};

/// wg-quick's default for an Ethernet uplink: 1500 less the largest (IPv6) overhead.
const DEFAULT_MTU: u16 = 1420;

pub async fn run(config_path: &Path, interface: Option<&str>) -> Result<()> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config = wgquick::parse(&text).with_context(|| format!("in {}", config_path.display()))?;
    for warning in &config.warnings {
        tracing::warn!("{}: {warning}", config_path.display());
    }
    let name = match interface {
        Some(n) => n.to_string(),
        None => config_path
            .file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_string)
            .context("cannot derive an interface name from the file name; pass --interface")?,
    };
    validate_interface_name(&name).with_context(|| format!("interface name {name:?}"))?;

    let mut device_config = DeviceConfig::new(config.interface.private_key);
    device_config.noise_backend = interface::noise_backend_from_env()?;
    let device = Arc::new(Device::with_config(&device_config));
    let defaults = default_routes(&config);
    // The mark goes on the socket before any packet leaves, so the tunnel's own
    // packets never take the default route through it.
    let full_table = if defaults.any() {
        let table = full_tunnel::free_table(defaults)?;
        device.apply(&DeviceUpdate {
            fwmark: Some(table),
            ..DeviceUpdate::default()
        })?;
        Some(table)
    } else {
        None
    };
    let needs_lookup = config
        .peers
        .iter()
        .any(|p| matches!(p.endpoint, Some(Endpoint::Host { .. })));
    let resolver = if needs_lookup {
        let (resolver, config_error) = system_resolver()?;
        if let Some(e) = config_error {
            tracing::warn!(error = %e, "no usable DNS configuration; resolving from /etc/hosts only");
        }
        Some(resolver)
    } else {
        None
    };
    for peer in &config.peers {
        let endpoint = match (&peer.endpoint, &resolver) {
            (Some(ep @ Endpoint::Host { .. }), Some(resolver)) => Some(
                resolve_endpoint_with(resolver, ep)
                    .await
                    .with_context(|| format!("peer at line {}", peer.line))?,
            ),
            (Some(Endpoint::Addr(addr)), _) => Some(*addr),
            _ => None,
        };
        if let (Some(Endpoint::Host { host, .. }), Some(addr)) = (&peer.endpoint, endpoint) {
            tracing::info!(peer = %peer.public_key, %host, %addr, "resolved endpoint");
        }
        device.set_peer(&peer.peer_config(endpoint));
    }

    let socket =
        UdpTransport::bind(config.interface.listen_port.unwrap_or(0)).with_context(|| {
            format!(
                "cannot listen on UDP port {}",
                config.interface.listen_port.unwrap_or(0)
            )
        })?;
    let mtu = config.interface.mtu.unwrap_or(DEFAULT_MTU);
    let tun = TunDevice::create(&name, mtu).with_context(|| {
        format!("cannot create TUN interface {name} (is /dev/net/tun available, and are we root or CAP_NET_ADMIN?)")
    })?;
    for addr in &config.interface.addresses {
        tun.add_address(*addr)
            .with_context(|| format!("cannot add address {addr} to {name}"))?;
    }
    let ifindex = tun.if_index().context("cannot read the interface index")?;
    let routes = if config.interface.table_off {
        Vec::new()
    } else {
        add_routes(&config, ifindex)?
    };
    let full = match full_table {
        Some(table) => match FullTunnel::install(&name, defaults, table) {
            Ok(f) => Some(f),
            Err(e) => {
                remove_routes(&routes, ifindex);
                return Err(e.into());
            }
        },
        None => None,
    };

    let driver = Driver::start(device, Arc::new(tun), socket);
    let signals = StopSignals::install().context("cannot watch SIGTERM and SIGINT")?;
    let uapi = UapiServer::bind(&name, driver.control())
        .await
        .with_context(|| format!("cannot serve the userspace API for {name}"))?;
    tracing::info!(
        interface = %name,
        public_key = %config.interface.private_key.public_key(),
        listen_port = driver.listen_port(),
        peers = config.peers.len(),
        "interface is up; `wg show {name}` shows it",
    );

    interface::serve(&driver, uapi, signals).await;

    if let Some(full) = full {
        full.remove();
    }
    remove_routes(&routes, ifindex);
    driver.stop();
    tracing::info!(interface = %name, "interface removed");
    Ok(())
}

/// Which families have a /0 in some peer's allowed IPs (and routes are wanted).
fn default_routes(config: &wgquick::WgQuickConfig) -> Families {
    let mut families = Families::default();
    if config.interface.table_off {
        return families;
    }
    for prefix in config.peers.iter().flat_map(|p| &p.allowed_ips) {
        if prefix.len() == 0 {
            match prefix.addr() {
                std::net::IpAddr::V4(_) => families.v4 = true,
                std::net::IpAddr::V6(_) => families.v6 = true,
            }
        }
    }
    families
}

fn remove_routes(routes: &[IpPrefix], ifindex: u32) {
    for prefix in routes {
        if let Err(e) = route::delete_route(*prefix, ifindex) {
            tracing::debug!(%prefix, error = %e, "route already gone");
        }
    }
}

/// Routes every peer's allowed IPs but /0 to the interface; returns the routes it added.
fn add_routes(config: &wgquick::WgQuickConfig, ifindex: u32) -> Result<Vec<IpPrefix>> {
    let mut added: Vec<IpPrefix> = Vec::new();
    for prefix in config.peers.iter().flat_map(|p| &p.allowed_ips) {
        let prefix = prefix.network();
        if added.contains(&prefix) {
            continue;
        }
        if prefix.len() == 0 {
            // Policy routing for these: see [`FullTunnel`].
            continue;
        }
        match route::add_route(prefix, ifindex, None) {
            Ok(()) => added.push(prefix),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // The connected route of an interface address often covers it already.
                tracing::debug!(%prefix, "route exists already");
            }
            Err(e) => {
                for p in &added {
                    let _ = route::delete_route(*p, ifindex);
                }
                bail!("cannot add route {prefix}: {e}");
            }
        }
    }
    Ok(added)
}
