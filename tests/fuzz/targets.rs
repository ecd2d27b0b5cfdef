//! The fuzz targets: one function per parser that sees network or user input.
//!
//! Each takes arbitrary bytes and must never panic. The same functions run under
//! libFuzzer (`benches/fuzz.sh`, coverage-guided, millions of inputs) and, briefly,
//! inside `cargo test --test fuzz` on seeds, kept crash inputs and a few thousand
//! mutations. A target may also assert a property (a parsed file written back reads
//! the same): a failed assertion is a finding like a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Mutex, OnceLock};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use sidecar::wg::{Device, Output, PeerConfig, MIN_OUT_BUF};
use sidecar::{IpPrefix, Key};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Device as PhyDevice, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

/// A fuzz target: arbitrary bytes in, no panic.
pub type Target = fn(&[u8]);

/// Every target, by the name the corpus folders, binaries and regressions use.
pub const TARGETS: &[(&str, Target)] = &[
    ("wg_datagram", wg_datagram),
    ("neighbor", neighbor),
    ("netstack", netstack),
    ("uapi", uapi),
    ("wgquick", wgquick),
    ("relay_toml", relay_toml),
    ("api_body", api_body),
];

/// Looks a target up by name.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

// ---------------------------------------------------------------- WireGuard

/// The relay's key in the WireGuard fixture (fixed, so seeds made in another
/// process carry a valid mac1 for it).
pub const SERVER_SECRET: [u8; 32] = [0x11; 32];
/// The one peer's key.
pub const CLIENT_SECRET: [u8; 32] = [0x22; 32];
/// The peer's receiver index as its `Tunn` announces it (upper 24 bits).
pub const CLIENT_INDEX: u32 = 7;
/// The peer's allowed addresses.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The peer's endpoint.
pub const CLIENT_ENDPOINT: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)), 51820);

/// What the first byte of a `wg_datagram` input selects.
pub mod wg_mode {
    /// The rest is a datagram from the network (source chosen by the second byte).
    pub const DATAGRAM: u8 = 0;
    /// The rest is an IP packet the peer encrypts in its session: the device then
    /// decrypts it and applies cryptokey routing to whatever it holds.
    pub const INNER: u8 = 1;
    /// The rest is a packet from the TUN device for the device to encrypt.
    pub const OUTBOUND: u8 = 2;
    /// The peer starts a fresh handshake, then the rest arrives as a datagram. Only
    /// this exact byte; any other value above 2 counts modulo 3.
    pub const REHANDSHAKE: u8 = 3;
}

pub fn client_tunn() -> Tunn {
    let server_public = x25519::PublicKey::from(&x25519::StaticSecret::from(SERVER_SECRET));
    Tunn::new(
        x25519::StaticSecret::from(CLIENT_SECRET),
        server_public,
        None,
        None,
        CLIENT_INDEX,
        None,
    )
}

struct WgFixture {
    device: Device,
    client: Tunn,
    /// Scratch for whole-size datagrams, kept so an input costs no 64 KiB zeroing.
    scratch: Vec<u8>,
}

impl WgFixture {
    fn new() -> WgFixture {
        let device = Device::with_private_key(Key(SERVER_SECRET));
        let mut peer = PeerConfig::new(Key(CLIENT_SECRET).public_key());
        peer.endpoint = Some(CLIENT_ENDPOINT);
        peer.allowed_ips = vec![
            IpPrefix::host(IpAddr::V6(CLIENT_V6)),
            IpPrefix::host(IpAddr::V4(CLIENT_V4)),
        ];
        device.set_peer(&peer);
        let mut fixture = WgFixture {
            device,
            client: client_tunn(),
            scratch: vec![0u8; 65_600],
        };
        fixture.handshake();
        fixture
    }

    /// A complete handshake, so data packets reach a live session.
    fn handshake(&mut self) {
        let mut buf = vec![0u8; 2048];
        let init = match self.client.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => return,
        };
        self.deliver(CLIENT_ENDPOINT, &init);
    }

    /// Hands `datagram` to the device and whatever it sends back to the peer, until
    /// the exchange settles.
    fn deliver(&mut self, from: SocketAddr, datagram: &[u8]) {
        let mut out = vec![0u8; datagram.len().max(MIN_OUT_BUF) + 64];
        let mut to_client = Vec::new();
        let now = std::time::Instant::now();
        match self.device.handle_datagram(now, from, datagram, &mut out) {
            Output::Transmit { datagram, .. } => to_client.push(datagram.to_vec()),
            Output::Deliver(packet) => {
                // What the relay writes to its TUN device must be one whole IP packet.
                assert!(
                    is_whole_ip_packet(packet),
                    "the link got a broken packet: {packet:02x?}"
                );
            }
            _ => {}
        }
        let mut more = std::mem::take(&mut self.scratch);
        for _ in 0..300 {
            match self.device.poll_transmit(now, &mut more) {
                Some(t) => to_client.push(more[..t.len].to_vec()),
                None => break,
            }
        }
        while let Some(n) = self.device.poll_deliver(now, &mut more) {
            assert!(
                is_whole_ip_packet(&more[..n]),
                "the link got a broken packet: {:02x?}",
                &more[..n]
            );
        }
        self.scratch = more;
        if from == CLIENT_ENDPOINT {
            for d in to_client {
                self.answer_as_peer(&d);
            }
        }
    }

    /// The peer's side: answers go back to the device (handshake completion,
    /// keepalives), bounded so a ping-pong cannot run away.
    fn answer_as_peer(&mut self, datagram: &[u8]) {
        let mut pending = vec![datagram.to_vec()];
        let mut buf = std::mem::take(&mut self.scratch);
        for _ in 0..4 {
            let Some(d) = pending.pop() else { break };
            let mut replies = Vec::new();
            if let TunnResult::WriteToNetwork(r) =
                self.client
                    .decapsulate(Some(CLIENT_ENDPOINT.ip()), &d, &mut buf)
            {
                replies.push(r.to_vec());
                while let TunnResult::WriteToNetwork(r) =
                    self.client.decapsulate(None, &[], &mut buf)
                {
                    replies.push(r.to_vec());
                }
            }
            for r in replies {
                let mut out = vec![0u8; r.len().max(MIN_OUT_BUF) + 64];
                if let Output::Transmit { datagram, .. } = self.device.handle_datagram(
                    std::time::Instant::now(),
                    CLIENT_ENDPOINT,
                    &r,
                    &mut out,
                ) {
                    pending.push(datagram.to_vec());
                }
            }
        }
        self.scratch = buf;
    }
}

fn wg_fixture() -> &'static Mutex<WgFixture> {
    static FIXTURE: OnceLock<Mutex<WgFixture>> = OnceLock::new();
    FIXTURE.get_or_init(|| Mutex::new(WgFixture::new()))
}

/// Datagram classification and cryptokey routing of [`sidecar::wg::Device`], in
/// both directions, against a device that has a live session with one peer.
pub fn wg_datagram(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if rest.len() > 65_535 {
        return;
    }
    let mut fx = wg_fixture().lock().unwrap_or_else(|e| e.into_inner());
    // A fresh handshake costs several Diffie-Hellmans: only the exact mode byte
    // asks for one, so mutations of the first byte seldom land there.
    let mode = if mode == wg_mode::REHANDSHAKE {
        mode
    } else {
        mode % 3
    };
    match mode {
        wg_mode::DATAGRAM => {
            let Some((&src, datagram)) = rest.split_first() else {
                return;
            };
            let from = match src % 4 {
                0 => CLIENT_ENDPOINT,
                1 => "[2001:db8:9::1]:4000".parse().unwrap(),
                2 => "[::ffff:198.51.100.2]:51820".parse().unwrap(),
                _ => "203.0.113.9:0".parse().unwrap(),
            };
            fx.deliver(from, datagram);
            // An output buffer too small must be refused, not overrun.
            let mut small = [0u8; MIN_OUT_BUF];
            let _ =
                fx.device
                    .handle_datagram(std::time::Instant::now(), from, datagram, &mut small);
        }
        wg_mode::INNER => {
            let mut buf = vec![0u8; rest.len() + 148];
            let datagram = match fx.client.encapsulate(rest, &mut buf) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => return,
            };
            fx.deliver(CLIENT_ENDPOINT, &datagram);
        }
        wg_mode::OUTBOUND => {
            let mut out = vec![0u8; rest.len() + 148];
            let now = std::time::Instant::now();
            let sent = match fx.device.handle_packet(now, rest, &mut out) {
                Output::Transmit { datagram, .. } => Some(datagram.to_vec()),
                _ => None,
            };
            let mut small = [0u8; 16];
            let _ = fx.device.handle_packet(now, rest, &mut small);
            // Answers for the link (ICMP errors) are whole packets too.
            while let Some(n) = fx.device.poll_deliver(now, &mut out) {
                assert!(
                    is_whole_ip_packet(&out[..n]),
                    "broken answer: {:02x?}",
                    &out[..n]
                );
            }
            if let Some(d) = sent {
                fx.answer_as_peer(&d);
            }
        }
        _ => {
            fx.handshake();
            fx.deliver(CLIENT_ENDPOINT, rest);
        }
    }
}

/// Whether `packet` is exactly one IP packet: a complete header, and the length
/// fields agree with the bytes there are.
pub fn is_whole_ip_packet(packet: &[u8]) -> bool {
    use smoltcp::wire::{Ipv4Packet, Ipv6Packet};
    match packet.first().map(|b| b >> 4) {
        Some(4) => Ipv4Packet::new_checked(packet)
            .is_ok_and(|p| usize::from(p.total_len()) == packet.len()),
        Some(6) => Ipv6Packet::new_checked(packet)
            .is_ok_and(|p| usize::from(p.payload_len()) + 40 == packet.len()),
        _ => false,
    }
}

// ---------------------------------------------------------------- NDP / ARP

/// The relay's uplink MAC in the neighbour fixture.
pub const OUR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Whether an address is one the relay hands out: 2001:db8:1::/64 and
/// 203.0.113.16/28.
pub fn neighbor_owns_v6(a: Ipv6Addr) -> bool {
    a.segments()[..4] == [0x2001, 0xdb8, 1, 0]
}
pub fn neighbor_owns_v4(a: Ipv4Addr) -> bool {
    a.octets()[..3] == [203, 0, 113] && a.octets()[3] & 0xf0 == 16
}

/// NDP and ARP answers on arbitrary Ethernet frames, into buffers of every size
/// from none to plenty.
pub fn neighbor(frame: &[u8]) {
    for len in [0, 14, 59, 60, 85, 86, 1600] {
        let mut out = vec![0u8; len];
        if let Some(a) = sidecar::neighbor_reply::neighbor_advertisement(
            frame,
            OUR_MAC,
            neighbor_owns_v6,
            &mut out,
        ) {
            assert!(a.len <= len && neighbor_owns_v6(a.target));
        }
        if let Some(a) =
            sidecar::neighbor_reply::arp_reply(frame, OUR_MAC, neighbor_owns_v4, &mut out)
        {
            assert!(a.len <= len && neighbor_owns_v4(a.target));
        }
    }
}

// ---------------------------------------------------------------- netstack

/// The addresses the netstack fixture terminates.
pub const NETSTACK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x10);
pub const NETSTACK_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// A `phy::Device` over two queues, as the netstack's own.
#[derive(Default)]
struct Queues {
    rx: std::collections::VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
}

struct QueueRx(Vec<u8>);
struct QueueTx<'a>(&'a mut Vec<Vec<u8>>);

impl RxToken for QueueRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for QueueTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push(buf);
        r
    }
}

impl PhyDevice for Queues {
    type RxToken<'a> = QueueRx;
    type TxToken<'a> = QueueTx<'a>;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(QueueRx, QueueTx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((QueueRx(p), QueueTx(&mut self.tx)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<QueueTx<'_>> {
        Some(QueueTx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 1420;
        caps
    }
}

/// Splits a netstack input into packets: each is a big-endian u16 length and that
/// many bytes (the last one takes what is left).
pub fn split_packets(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 16 {
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let body = &data[2..];
        let take = len.min(body.len());
        out.push(&body[..take]);
        data = &body[take..];
    }
    out
}

/// Joins packets in the format [`split_packets`] reads.
pub fn join_packets(packets: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in packets {
        out.extend_from_slice(&(p.len() as u16).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// The netstack's inbound path: its own first look at each packet from the tunnel
/// (`classify`), then smoltcp with a listener made for each SYN, as the driver does,
/// over a sequence of packets (so a handshake can complete and data follow).
pub fn netstack(data: &[u8]) {
    let public = [IpAddr::V6(NETSTACK_V6), IpAddr::V4(NETSTACK_V4)];
    let ours = |a: &IpAddress| public.contains(&IpAddr::from(*a));
    let mut dev = Queues::default();
    let mut config = Config::new(HardwareAddress::Ip);
    config.random_seed = 0x5eed;
    let t0 = smoltcp::time::Instant::from_millis(1_000);
    let mut iface = Interface::new(config, &mut dev, t0);
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv6(NETSTACK_V6), 128));
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(NETSTACK_V4), 32));
    });
    let mut sockets = SocketSet::new(Vec::new());
    for (i, packet) in split_packets(data).into_iter().enumerate() {
        let now = t0 + smoltcp::time::Duration::from_millis(10 * i as u64);
        match sidecar::netstack::packet::classify(packet, ours) {
            Ok(sidecar::netstack::packet::Inbound::Tcp(seg)) => {
                if seg.opens && sockets.iter().count() < 4 {
                    let mut s = tcp::Socket::new(
                        tcp::SocketBuffer::new(vec![0; 4096]),
                        tcp::SocketBuffer::new(vec![0; 4096]),
                    );
                    if s.listen(seg.local).is_ok() {
                        sockets.add(s);
                    }
                }
                dev.rx.push_back(packet.to_vec());
            }
            Ok(sidecar::netstack::packet::Inbound::Udp { payload, .. }) => {
                assert!(
                    payload.end <= packet.len(),
                    "UDP payload outside the packet"
                );
                let _ = &packet[payload];
            }
            Ok(sidecar::netstack::packet::Inbound::Echo(reply)) => {
                assert!(
                    is_whole_ip_packet(&reply),
                    "echo reply is not one IP packet"
                );
            }
            // smoltcp sees every packet in the real stack only after classify; feed
            // it the rest anyway so its own parser is fuzzed too.
            Ok(sidecar::netstack::packet::Inbound::Unsupported) | Err(_) => {
                dev.rx.push_back(packet.to_vec())
            }
        }
        iface.poll(now, &mut dev, &mut sockets);
        for (_, s) in sockets.iter_mut() {
            if let smoltcp::socket::Socket::Tcp(s) = s {
                if s.can_recv() {
                    let _ = s.recv(|b| (b.len(), ()));
                }
                if s.can_send() {
                    let _ = s.send_slice(b"pong");
                }
            }
        }
        iface.poll(now, &mut dev, &mut sockets);
        dev.tx.clear();
    }
}

// ---------------------------------------------------------------- UAPI

/// The userspace API: one request as the socket server reads it, parsed, and a
/// `set` applied to a device; replies as the client splits them.
pub fn uapi(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = sidecar::uapi::split_reply(text);
    if let Ok(sidecar::uapi::Request::Set(update)) = sidecar::uapi::parse_request(text) {
        // What `wg set` would send for this change must parse to the same change.
        let again = sidecar::uapi::format_set(&update);
        match sidecar::uapi::parse_request(&again) {
            Ok(sidecar::uapi::Request::Set(back)) => {
                assert_eq!(
                    back, update,
                    "format_set output reads back differently: {again:?}"
                )
            }
            other => panic!("format_set output does not parse: {again:?}: {other:?}"),
        }
        let device = uapi_device();
        let _ = device.apply(&update);
        let _ = sidecar::uapi::format_get(&sidecar::wg::DeviceInfo {
            private_key: device.private_key(),
            listen_port: update.listen_port.unwrap_or(0),
            fwmark: device.fwmark(),
            peers: device.peers(std::time::Instant::now(), std::time::SystemTime::now()),
        });
        // Keep the fixture small: start over once it has grown.
        if device.peer_count() > 64 {
            let mut clear = update.clone();
            clear.replace_peers = true;
            clear.peers.clear();
            let _ = device.apply(&clear);
        }
    }
}

fn uapi_device() -> &'static Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE.get_or_init(Device::new)
}

// ---------------------------------------------------------------- wg-quick

/// A wg-quick file, then each peer's configuration from it.
pub fn wgquick(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = sidecar::wgquick::parse(&text) {
        for peer in &config.peers {
            let _ = peer.peer_config(None);
            let _ = peer.peer_config(Some(CLIENT_ENDPOINT));
        }
    }
}

// ---------------------------------------------------------------- relay.toml

/// relay.toml as `RelayConfig::load` reads it (parse, then validate); a valid file
/// written back by `to_commented_toml` (what `init` writes) must read the same.
pub fn relay_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = toml::from_str::<sidecar_relay::config::RelayConfig>(text) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let written = config.to_commented_toml();
    let back: sidecar_relay::config::RelayConfig = toml::from_str(&written).unwrap_or_else(|e| {
        panic!("to_commented_toml wrote a file that does not parse: {e}\n{written}")
    });
    assert_eq!(
        back, config,
        "to_commented_toml does not round-trip:\n{written}"
    );
}

// ---------------------------------------------------------------- API bodies

/// What the first byte of an `api_body` input selects: the body's type.
pub mod api_kind {
    pub const REGISTER: u8 = 0;
    pub const DELETE: u8 = 1;
    pub const CREATE_TOKEN: u8 = 2;
    pub const REVOKE_TOKEN: u8 = 3;
}

struct ApiFixture {
    rt: tokio::runtime::Runtime,
    store: sidecar_relay::store::Store,
    token: sidecar_relay::store::TokenRecord,
    relay_key: Key,
}

fn api_fixture() -> &'static ApiFixture {
    static FIXTURE: OnceLock<ApiFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let plan = sidecar_relay::store::AddressPlan {
            ipv6: "2001:db8:1::/64".parse().unwrap(),
            ipv4_pool: Some("203.0.113.16/28".parse().unwrap()),
            reserved: vec!["2001:db8:1::1".parse().unwrap()],
        };
        let store = sidecar_relay::store::Store::temporary(plan).expect("temporary store");
        let spec = sidecar_relay::store::TokenSpec::tenant("fuzz", 8, 2);
        let (token, _) = rt.block_on(store.create_token(spec)).expect("token");
        ApiFixture {
            rt,
            store,
            token,
            relay_key: Key(SERVER_SECRET).public_key(),
        }
    })
}

/// The relay's check of a decoded `pubkey` field (not zero, not its own).
fn api_pubkey(key: Key, relay_key: &Key) -> Option<Key> {
    (!key.is_zero() && key != *relay_key).then_some(key)
}

/// A JSON request body of the control API, deserialised into its `proto` type and
/// then validated and carried out against a real (temporary) store as the relay's
/// handlers do; whatever is created is removed again so the store stays small.
pub fn api_body(data: &[u8]) {
    use sidecar_proto::{CreateToken, DeletePeer, RegisterPeer, RevokeToken};
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let fx = api_fixture();
    let store = &fx.store;
    match kind % 4 {
        api_kind::REGISTER => {
            let Ok(req) = serde_json::from_slice::<RegisterPeer>(body) else {
                return;
            };
            let Some(key) = api_pubkey(req.pubkey, &fx.relay_key) else {
                return;
            };
            let reg = sidecar_relay::store::Registration {
                public_key: key,
                ipv4: req.ipv4,
                name: req.name,
                container: req.container.clone(),
            };
            fx.rt.block_on(async {
                if let Ok((peer, _)) = store.register(&fx.token, reg).await {
                    if let Some(c) = &req.container {
                        let found = store.peer_by_container(&fx.token.id, c);
                        assert!(
                            matches!(found, Ok(Some(ref p)) if p.public_key == key),
                            "registered container {c:?} is not found again: {found:?}"
                        );
                    }
                    let gone = store.delete_peer(&fx.token.id, &peer.public_key).await;
                    assert!(
                        matches!(gone, Ok(Some(_))),
                        "registered peer not deleted: {gone:?}"
                    );
                }
            });
        }
        api_kind::DELETE => {
            let Ok(req) = serde_json::from_slice::<DeletePeer>(body) else {
                return;
            };
            if let Some(key) = api_pubkey(req.pubkey, &fx.relay_key) {
                let _ = fx.rt.block_on(store.delete_peer(&fx.token.id, &key));
            }
        }
        api_kind::CREATE_TOKEN => {
            let Ok(req) = serde_json::from_slice::<CreateToken>(body) else {
                return;
            };
            let spec = sidecar_relay::store::TokenSpec::from(req);
            fx.rt.block_on(async {
                if let Ok((record, secret)) = store.create_token(spec).await {
                    let found = store.authenticate(&secret);
                    assert!(matches!(found, Ok(Some(ref t)) if t.id == record.id));
                    let _ = store.revoke_token(&record.id).await;
                }
            });
        }
        _ => {
            let Ok(req) = serde_json::from_slice::<RevokeToken>(body) else {
                return;
            };
            // Never the fixture's own token: the store would have nothing to work on.
            if req.id != fx.token.id {
                let _ = fx.rt.block_on(store.revoke_token(&req.id));
            }
        }
    }
}
