//! The standard interop fixture: sidecar-agent in namespace A, wireguard-go in namespace B,
//! joined by the dual-stack [`Pair`] underlay.

use super::agent::{Agent, AgentConfig};
use super::netns::Pair;
use super::wg::{KeyPair, Peer, WireguardGo, MTU};
use super::{cidr, endpoint, inner, underlay, Family};

pub const AGENT_PORT: u16 = 51820;
pub const WGGO_PORT: u16 = 51821;

/// Which side is told the other's underlay endpoint up front. A side that is not told can
/// only learn it from an authenticated packet, so this decides who may initiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    Both,
    AgentOnly,
    WireguardGoOnly,
}

pub struct Tunnel<'p> {
    pub pair: &'p Pair,
    pub outer: Family,
    pub agent_keys: KeyPair,
    pub wggo_keys: KeyPair,
    pub agent: Agent<'p>,
    pub wggo: WireguardGo<'p>,
}

impl<'p> Tunnel<'p> {
    /// Agent is host 1 and wireguard-go host 2 on the underlay and inside the tunnel; each
    /// side allows exactly the other's inner /32 and /128.
    pub fn new(pair: &'p Pair, outer: Family, endpoints: Endpoints) -> Self {
        Self::with_config(pair, outer, endpoints, |_| {})
    }

    /// Like [`Tunnel::new`], letting the caller adjust the agent's config before it starts.
    pub fn with_config(
        pair: &'p Pair,
        outer: Family,
        endpoints: Endpoints,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> Self {
        let agent_keys = KeyPair::generate();
        let wggo_keys = KeyPair::generate();

        let mut wggo_as_peer = Peer::new(&wggo_keys.public)
            .allow(cidr(inner(Family::V4, 2), 32))
            .allow(cidr(inner(Family::V6, 2), 128));
        if endpoints != Endpoints::WireguardGoOnly {
            wggo_as_peer = wggo_as_peer.endpoint(endpoint(underlay(outer, 2), WGGO_PORT));
        }
        let mut config = AgentConfig {
            private_key: agent_keys.private.clone(),
            addresses: Family::BOTH
                .iter()
                .map(|&f| cidr(inner(f, 1), f.prefix_len()))
                .collect(),
            listen_port: Some(AGENT_PORT),
            mtu: Some(MTU),
            peers: vec![wggo_as_peer],
            noise_backend: None,
        };
        adjust(&mut config);
        let agent = Agent::start(&pair.a, &config);

        let wggo = WireguardGo::start(&pair.b, &wggo_keys, WGGO_PORT);
        for f in Family::BOTH {
            wggo.add_addr(&cidr(inner(f, 2), f.prefix_len()));
        }
        let mut agent_as_peer = Peer::new(&agent_keys.public)
            .allow(cidr(inner(Family::V4, 1), 32))
            .allow(cidr(inner(Family::V6, 1), 128));
        if endpoints != Endpoints::AgentOnly {
            agent_as_peer = agent_as_peer.endpoint(endpoint(underlay(outer, 1), AGENT_PORT));
        }
        wggo.add_peer(&agent_as_peer);

        Tunnel {
            pair,
            outer,
            agent_keys,
            wggo_keys,
            agent,
            wggo,
        }
    }
}
