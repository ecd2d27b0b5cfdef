//! The wg-quick(8) configuration format: an `[Interface]` section and any number of
//! `[Peer]` sections of `Key = Value` lines.
//!
//! Parsing follows wg-quick and wg(8): section names and keys are case-insensitive,
//! `#` starts a comment anywhere on a line, list values are comma-separated, and
//! `Address` and `AllowedIPs` accumulate over repeated lines. `sidecar-agent up` runs
//! no shell hooks and manages no DNS, so keys that would need that are errors
//! rather than silently skipped: a configuration that relies on `PostUp` to add a
//! firewall rule must not come up without it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;

use crate::endpoint::{Endpoint, EndpointError};
use crate::wg::PeerConfig;
use crate::{IpPrefix, Key};

/// A parsed wg-quick configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgQuickConfig {
    pub interface: InterfaceSection,
    pub peers: Vec<PeerSection>,
    /// Things that parsed but are probably not what the author meant, each
    /// prefixed with its line (`line N: ...`). Show them to the user.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceSection {
    pub private_key: Key,
    /// Interface addresses, host bits kept (`10.0.0.2/24`); a bare address is a host prefix.
    pub addresses: Vec<IpPrefix>,
    /// `Some(0)` means "pick a random port", as with wg.
    pub listen_port: Option<u16>,
    pub mtu: Option<u16>,
    /// `Table = off`: do not add routes for the peers' allowed IPs.
    pub table_off: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSection {
    pub public_key: Key,
    /// An all-zero key in the file means "no preshared key" and becomes `None`.
    pub preshared_key: Option<Key>,
    /// As written: host bits are not cleared.
    pub allowed_ips: Vec<IpPrefix>,
    pub endpoint: Option<Endpoint>,
    /// Seconds; `off` and `0` both become `None`.
    pub persistent_keepalive: Option<u16>,
    /// Line of the `[Peer]` header, for messages about this peer.
    pub line: usize,
}

impl PeerSection {
    /// The engine's view of this peer, given its endpoint once resolved.
    pub fn peer_config(&self, endpoint: Option<SocketAddr>) -> PeerConfig {
        PeerConfig {
            public_key: self.public_key,
            preshared_key: self.preshared_key,
            endpoint,
            persistent_keepalive: self.persistent_keepalive,
            allowed_ips: self.allowed_ips.clone(),
        }
    }
}

/// Plain decimal digits only: `u16::from_str` would also take `+5`.
fn parse_number<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Why a configuration was refused, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {kind}", location(.line))]
pub struct ConfigError {
    /// 1-based line number; 0 when the problem concerns the whole file.
    pub line: usize,
    pub kind: ConfigErrorKind,
}

fn location(line: &usize) -> String {
    match line {
        0 => "configuration".to_string(),
        n => format!("line {n}"),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    #[error("expected `Key = Value` or a section header such as [Peer]")]
    Syntax,
    #[error("section header is missing its closing `]`")]
    UnterminatedHeader,
    #[error("unknown section [{0}]; expected [Interface] or [Peer]")]
    UnknownSection(String),
    #[error("`{0}` appears before any [Interface] or [Peer] section")]
    OutsideSection(String),
    #[error("unknown key `{key}` in [{section}]")]
    UnknownKey { key: String, section: &'static str },
    #[error("{key} belongs in [{expected}], not in [{found}]")]
    WrongSection {
        key: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("{key} is not supported: {reason}")]
    Unsupported {
        key: &'static str,
        reason: &'static str,
    },
    /// The reason never repeats key material.
    #[error("invalid {key}: {reason}")]
    InvalidValue { key: &'static str, reason: String },
    #[error("no [Interface] section")]
    MissingInterface,
    #[error("[Interface] has no PrivateKey")]
    MissingPrivateKey,
    #[error("[Peer] has no PublicKey")]
    MissingPublicKey,
    #[error(
        "this [Peer] already has a PublicKey at line {first_line}; is a [Peer] header missing?"
    )]
    RepeatedPublicKey { first_line: usize },
    #[error("peer {key} is listed twice (first at line {first_line})")]
    DuplicatePeer { key: Key, first_line: usize },
    #[error("peer {0} has the interface's own public key")]
    OwnPublicKey(Key),
}

const SECTION_INTERFACE: &str = "Interface";
const SECTION_PEER: &str = "Peer";

/// Which keys we know, under their canonical spelling.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Field {
    PrivateKey,
    Address,
    ListenPort,
    Mtu,
    Table,
    SaveConfig,
    FwMark,
    Dns,
    PreUp,
    PostUp,
    PreDown,
    PostDown,
    PublicKey,
    PresharedKey,
    AllowedIps,
    Endpoint,
    PersistentKeepalive,
}

impl Field {
    const ALL: [Field; 17] = [
        Field::PrivateKey,
        Field::Address,
        Field::ListenPort,
        Field::Mtu,
        Field::Table,
        Field::SaveConfig,
        Field::FwMark,
        Field::Dns,
        Field::PreUp,
        Field::PostUp,
        Field::PreDown,
        Field::PostDown,
        Field::PublicKey,
        Field::PresharedKey,
        Field::AllowedIps,
        Field::Endpoint,
        Field::PersistentKeepalive,
    ];

    fn name(self) -> &'static str {
        match self {
            Field::PrivateKey => "PrivateKey",
            Field::Address => "Address",
            Field::ListenPort => "ListenPort",
            Field::Mtu => "MTU",
            Field::Table => "Table",
            Field::SaveConfig => "SaveConfig",
            Field::FwMark => "FwMark",
            Field::Dns => "DNS",
            Field::PreUp => "PreUp",
            Field::PostUp => "PostUp",
            Field::PreDown => "PreDown",
            Field::PostDown => "PostDown",
            Field::PublicKey => "PublicKey",
            Field::PresharedKey => "PresharedKey",
            Field::AllowedIps => "AllowedIPs",
            Field::Endpoint => "Endpoint",
            Field::PersistentKeepalive => "PersistentKeepalive",
        }
    }

    fn lookup(key: &str) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(key))
    }

    fn section(self) -> &'static str {
        match self {
            Field::PublicKey
            | Field::PresharedKey
            | Field::AllowedIps
            | Field::Endpoint
            | Field::PersistentKeepalive => SECTION_PEER,
            _ => SECTION_INTERFACE,
        }
    }
}

const HOOK_REASON: &str =
    "the agent does not run shell hooks; apply that change outside the agent and remove the line";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Interface,
    /// The last entry of `Parser::peers`.
    Peer,
}

#[derive(Default)]
struct InterfaceBuilder {
    header_line: usize,
    private_key: Option<Key>,
    addresses: Vec<IpPrefix>,
    listen_port: Option<u16>,
    mtu: Option<(u16, usize)>,
    table_off: bool,
    /// Where each single-valued key was last set, to warn about overrides.
    seen: HashMap<&'static str, usize>,
}

struct PeerBuilder {
    line: usize,
    public_key: Option<(Key, usize)>,
    preshared_key: Option<Key>,
    allowed_ips: Vec<IpPrefix>,
    endpoint: Option<Endpoint>,
    persistent_keepalive: Option<u16>,
    seen: HashMap<&'static str, usize>,
}

impl PeerBuilder {
    fn new(line: usize) -> PeerBuilder {
        PeerBuilder {
            line,
            public_key: None,
            preshared_key: None,
            allowed_ips: Vec::new(),
            endpoint: None,
            persistent_keepalive: None,
            seen: HashMap::new(),
        }
    }
}

struct Parser {
    interface: Option<InterfaceBuilder>,
    peers: Vec<PeerBuilder>,
    warnings: Vec<String>,
}

/// Parses a wg-quick configuration. Never panics, whatever the input.
pub fn parse(text: &str) -> Result<WgQuickConfig, ConfigError> {
    let mut parser = Parser {
        interface: None,
        peers: Vec::new(),
        warnings: Vec::new(),
    };
    let mut section = Section::None;
    // Editors on some systems prepend a byte-order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
        if content.is_empty() {
            continue;
        }
        if let Some(header) = content.strip_prefix('[') {
            let name = header
                .strip_suffix(']')
                .ok_or(ConfigError {
                    line,
                    kind: ConfigErrorKind::UnterminatedHeader,
                })?
                .trim();
            section = parser.start_section(name, line)?;
            continue;
        }
        let (key, value) = content.split_once('=').ok_or(ConfigError {
            line,
            kind: ConfigErrorKind::Syntax,
        })?;
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(ConfigError {
                line,
                kind: ConfigErrorKind::Syntax,
            });
        }
        match section {
            Section::None => {
                return Err(ConfigError {
                    line,
                    kind: ConfigErrorKind::OutsideSection(key.to_string()),
                })
            }
            Section::Interface => parser.interface_line(key, value, line)?,
            Section::Peer => parser.peer_line(key, value, line)?,
        }
    }
    parser.finish()
}

impl Parser {
    fn start_section(&mut self, name: &str, line: usize) -> Result<Section, ConfigError> {
        if name.eq_ignore_ascii_case(SECTION_INTERFACE) {
            match &self.interface {
                // wg-quick merges repeated [Interface] sections; so do we, but it is
                // more often a pasting mistake than intent.
                Some(iface) => self.warnings.push(format!(
                    "line {line}: second [Interface] section (first at line {}); their settings are merged",
                    iface.header_line
                )),
                None => {
                    self.interface = Some(InterfaceBuilder {
                        header_line: line,
                        ..InterfaceBuilder::default()
                    })
                }
            }
            Ok(Section::Interface)
        } else if name.eq_ignore_ascii_case(SECTION_PEER) {
            self.peers.push(PeerBuilder::new(line));
            Ok(Section::Peer)
        } else {
            Err(ConfigError {
                line,
                kind: ConfigErrorKind::UnknownSection(name.to_string()),
            })
        }
    }

    fn interface_line(&mut self, key: &str, value: &str, line: usize) -> Result<(), ConfigError> {
        let field = known_field(key, SECTION_INTERFACE, line)?;
        let err = |kind| ConfigError { line, kind };
        let invalid = |reason: String| {
            err(ConfigErrorKind::InvalidValue {
                key: field.name(),
                reason,
            })
        };
        let unsupported = |reason| {
            err(ConfigErrorKind::Unsupported {
                key: field.name(),
                reason,
            })
        };
        let iface = self
            .interface
            .as_mut()
            .expect("the [Interface] section is created when its header is read");
        match field {
            Field::PrivateKey => {
                let key = Key::from_base64(value).map_err(|e| invalid(e.to_string()))?;
                if key.is_zero() {
                    return Err(invalid("the all-zero key is not a private key".into()));
                }
                iface.private_key = Some(key);
            }
            Field::Address => {
                // wg-quick splits Address on commas and on whitespace.
                let items = split_list(value, true).map_err(invalid)?;
                for item in items {
                    let prefix = item
                        .parse::<IpPrefix>()
                        .map_err(|e| invalid(e.to_string()))?;
                    iface.addresses.push(prefix);
                }
            }
            Field::ListenPort => {
                let port = parse_number::<u16>(value)
                    .ok_or_else(|| invalid(format!("`{value}` is not a port number")))?;
                iface.listen_port = Some(port);
            }
            Field::Mtu => {
                let mtu = parse_number::<u16>(value)
                    .filter(|m| *m >= 576)
                    .ok_or_else(|| invalid(format!("`{value}` is not a number from 576 to 65535")))?;
                iface.mtu = Some((mtu, line));
            }
            Field::Table => {
                if value.eq_ignore_ascii_case("off") {
                    iface.table_off = true;
                } else if value.eq_ignore_ascii_case("auto") {
                    iface.table_off = false;
                } else {
                    return Err(unsupported(
                        "only `auto` (add routes to the main table) and `off` (add no routes) are supported",
                    ));
                }
            }
            Field::SaveConfig => {
                if value.eq_ignore_ascii_case("true") {
                    return Err(unsupported(
                        "the agent never writes the configuration file back",
                    ));
                } else if value.eq_ignore_ascii_case("false") {
                    self.warnings
                        .push(format!("line {line}: SaveConfig = false has no effect"));
                } else {
                    return Err(invalid(format!("`{value}` is neither true nor false")));
                }
            }
            Field::FwMark => {
                // `off` and 0 ask for nothing, so they can be honoured.
                if !(value.eq_ignore_ascii_case("off") || value == "0") {
                    return Err(unsupported("the agent does not mark its packets"));
                }
            }
            Field::Dns => {
                return Err(unsupported(
                    "the agent does not manage /etc/resolv.conf; configure DNS separately and remove the line",
                ))
            }
            Field::PreUp | Field::PostUp | Field::PreDown | Field::PostDown => {
                return Err(unsupported(HOOK_REASON))
            }
            _ => unreachable!("known_field only returns [Interface] keys here"),
        }
        if single_valued(field) {
            note_override(&mut iface.seen, field, line, &mut self.warnings);
        }
        Ok(())
    }

    fn peer_line(&mut self, key: &str, value: &str, line: usize) -> Result<(), ConfigError> {
        let field = known_field(key, SECTION_PEER, line)?;
        let peer = self
            .peers
            .last_mut()
            .expect("a [Peer] section is created when its header is read");
        let invalid = |reason: String| ConfigError {
            line,
            kind: ConfigErrorKind::InvalidValue {
                key: field.name(),
                reason,
            },
        };
        match field {
            Field::PublicKey => {
                if let Some((_, first_line)) = peer.public_key {
                    return Err(ConfigError {
                        line,
                        kind: ConfigErrorKind::RepeatedPublicKey { first_line },
                    });
                }
                let key = Key::from_base64(value).map_err(|e| invalid(e.to_string()))?;
                peer.public_key = Some((key, line));
            }
            Field::PresharedKey => {
                let key = Key::from_base64(value).map_err(|e| invalid(e.to_string()))?;
                peer.preshared_key = (!key.is_zero()).then_some(key);
            }
            Field::AllowedIps => {
                for item in split_list(value, false).map_err(invalid)? {
                    let prefix = item
                        .parse::<IpPrefix>()
                        .map_err(|e| invalid(e.to_string()))?;
                    peer.allowed_ips.push(prefix);
                }
            }
            Field::Endpoint => {
                peer.endpoint = Some(
                    value
                        .parse()
                        .map_err(|e: EndpointError| invalid(e.to_string()))?,
                )
            }
            Field::PersistentKeepalive => {
                peer.persistent_keepalive = if value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    let secs = parse_number::<u16>(value).ok_or_else(|| {
                        invalid(format!(
                            "`{value}` is not `off` or a number of seconds up to 65535"
                        ))
                    })?;
                    (secs != 0).then_some(secs)
                };
            }
            _ => unreachable!("known_field only returns [Peer] keys here"),
        }
        if single_valued(field) {
            note_override(&mut peer.seen, field, line, &mut self.warnings);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<WgQuickConfig, ConfigError> {
        let iface = self.interface.ok_or(ConfigError {
            line: 0,
            kind: ConfigErrorKind::MissingInterface,
        })?;
        let private_key = iface.private_key.ok_or(ConfigError {
            line: iface.header_line,
            kind: ConfigErrorKind::MissingPrivateKey,
        })?;
        let own_public = private_key.public_key();

        let mut peers = Vec::with_capacity(self.peers.len());
        let mut by_key: HashMap<Key, usize> = HashMap::new();
        // Network prefix -> header line of the peer that first claimed it.
        let mut claimed: HashMap<IpPrefix, usize> = HashMap::new();
        for peer in self.peers {
            let (public_key, key_line) = peer.public_key.ok_or(ConfigError {
                line: peer.line,
                kind: ConfigErrorKind::MissingPublicKey,
            })?;
            if public_key == own_public {
                return Err(ConfigError {
                    line: key_line,
                    kind: ConfigErrorKind::OwnPublicKey(public_key),
                });
            }
            if let Some(&first_line) = by_key.get(&public_key) {
                return Err(ConfigError {
                    line: key_line,
                    kind: ConfigErrorKind::DuplicatePeer {
                        key: public_key,
                        first_line,
                    },
                });
            }
            by_key.insert(public_key, key_line);
            if peer.allowed_ips.is_empty() {
                self.warnings.push(format!(
                    "line {}: peer {public_key} has no AllowedIPs, so no traffic goes to or comes from it",
                    peer.line
                ));
            }
            for prefix in &peer.allowed_ips {
                let network = prefix.network();
                // Kept as written, but wg warns too: `10.0.0.7/24` is often a typo for /32.
                if network != *prefix {
                    self.warnings.push(format!(
                        "line {}: AllowedIPs {prefix} has host bits set; it covers {network}",
                        peer.line
                    ));
                }
                match claimed.get(&network) {
                    Some(&other) if other != peer.line => self.warnings.push(format!(
                        "line {}: AllowedIPs {network} is also given to the peer at line {other}; only one peer can own it",
                        peer.line
                    )),
                    Some(_) => {}
                    None => {
                        claimed.insert(network, peer.line);
                    }
                }
            }
            peers.push(PeerSection {
                public_key,
                preshared_key: peer.preshared_key,
                allowed_ips: peer.allowed_ips,
                endpoint: peer.endpoint,
                persistent_keepalive: peer.persistent_keepalive,
                line: peer.line,
            });
        }

        if let Some((mtu, line)) = iface.mtu {
            let any_v6 = iface.addresses.iter().any(|p| !p.is_ipv4())
                || peers
                    .iter()
                    .flat_map(|p| &p.allowed_ips)
                    .any(|p| !p.is_ipv4());
            if mtu < 1280 && any_v6 {
                self.warnings.push(format!(
                    "line {line}: MTU {mtu} is below 1280, the minimum IPv6 needs; IPv6 through the tunnel will fail"
                ));
            }
        }

        Ok(WgQuickConfig {
            interface: InterfaceSection {
                private_key,
                addresses: iface.addresses,
                listen_port: iface.listen_port,
                mtu: iface.mtu.map(|(mtu, _)| mtu),
                table_off: iface.table_off,
            },
            peers,
            warnings: self.warnings,
        })
    }
}

/// Resolves `key` to a field that belongs in `section`.
fn known_field(key: &str, section: &'static str, line: usize) -> Result<Field, ConfigError> {
    let field = Field::lookup(key).ok_or_else(|| ConfigError {
        line,
        kind: ConfigErrorKind::UnknownKey {
            key: key.to_string(),
            section,
        },
    })?;
    if field.section() != section {
        return Err(ConfigError {
            line,
            kind: ConfigErrorKind::WrongSection {
                key: field.name(),
                expected: field.section(),
                found: section,
            },
        });
    }
    Ok(field)
}

fn single_valued(field: Field) -> bool {
    !matches!(field, Field::Address | Field::AllowedIps)
}

/// wg lets a later line override an earlier one; allow it, but say so.
fn note_override(
    seen: &mut HashMap<&'static str, usize>,
    field: Field,
    line: usize,
    warnings: &mut Vec<String>,
) {
    if let Some(first) = seen.insert(field.name(), line) {
        warnings.push(format!(
            "line {line}: {} is set again (also at line {first}); the later value wins",
            field.name()
        ));
    }
}

/// Splits a comma-separated list (and on whitespace too if `split_whitespace`).
/// An empty value is an empty list, as in wg; an empty item (`a,,b`) is an error.
fn split_list(value: &str, split_whitespace: bool) -> Result<Vec<&str>, String> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let mut items = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err("empty entry in the comma-separated list".to_string());
        }
        if split_whitespace {
            items.extend(part.split_whitespace());
        } else {
            items.push(part);
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PEER1: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PEER2: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

    fn key(s: &str) -> Key {
        s.parse().unwrap()
    }

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    fn err(text: &str) -> ConfigError {
        parse(text).expect_err("configuration should be refused")
    }

    fn with_iface(extra_iface: &str, rest: &str) -> String {
        format!("[Interface]\nPrivateKey = {PRIV}\n{extra_iface}\n{rest}")
    }

    #[test]
    fn full_example() {
        let text = format!(
            "# comment at top\n\
             \n\
             [Interface]\n\
             PrivateKey = {PRIV}   # trailing comment\n\
             Address = 10.0.0.2/24, fd00::2/64\n\
             Address = 192.0.2.1\n\
             ListenPort = 51820\n\
             MTU = 1420\n\
             \n\
             [Peer]\n\
             PublicKey = {PEER1}\n\
             PresharedKey = {PSK}\n\
             AllowedIPs = 10.0.0.0/24, fd00::/64\n\
             AllowedIPs = 198.51.100.7/24\n\
             Endpoint = relay.example.com:51820\n\
             PersistentKeepalive = 25\n\
             \n\
             [peer]\n\
             publickey = {PEER2}\n\
             allowedips = 203.0.113.0/24\n\
             endpoint = [2001:db8::1]:4500\n\
             persistentkeepalive = off\n"
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(
            cfg.warnings,
            vec![
                "line 10: AllowedIPs 198.51.100.7/24 has host bits set; it covers 198.51.100.0/24"
            ]
        );
        let i = &cfg.interface;
        assert_eq!(i.private_key, key(PRIV));
        assert_eq!(
            i.addresses,
            vec![p("10.0.0.2/24"), p("fd00::2/64"), p("192.0.2.1/32")]
        );
        assert_eq!(i.listen_port, Some(51820));
        assert_eq!(i.mtu, Some(1420));
        assert!(!i.table_off);

        assert_eq!(cfg.peers.len(), 2);
        let a = &cfg.peers[0];
        assert_eq!(a.public_key, key(PEER1));
        assert_eq!(a.preshared_key, Some(key(PSK)));
        // Host bits are kept as written.
        assert_eq!(
            a.allowed_ips,
            vec![p("10.0.0.0/24"), p("fd00::/64"), p("198.51.100.7/24")]
        );
        assert_eq!(
            a.endpoint,
            Some(Endpoint::Host {
                host: "relay.example.com".into(),
                port: 51820
            })
        );
        assert_eq!(a.persistent_keepalive, Some(25));
        assert_eq!(a.line, 10);

        let b = &cfg.peers[1];
        assert_eq!(b.public_key, key(PEER2));
        assert_eq!(b.preshared_key, None);
        assert_eq!(
            b.endpoint,
            Some(Endpoint::Addr("[2001:db8::1]:4500".parse().unwrap()))
        );
        assert_eq!(b.persistent_keepalive, None);
        assert_eq!(b.line, 18);

        let pc = a.peer_config(Some("192.0.2.50:51820".parse().unwrap()));
        assert_eq!(pc.public_key, key(PEER1));
        assert_eq!(pc.allowed_ips.len(), 3);
    }

    #[test]
    fn case_whitespace_crlf_and_bom() {
        let text = format!(
            "\u{feff}[INTERFACE]\r\n  privatekey=  {PRIV}\r\n\tADDRESS = 10.0.0.1/24 fd00::1/64\r\n[ Peer ]\r\nPUBLICKEY={PEER1}\r\nAllowedIps=0.0.0.0/0,::/0\r\n"
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(
            cfg.interface.addresses,
            vec![p("10.0.0.1/24"), p("fd00::1/64")]
        );
        assert_eq!(cfg.peers[0].allowed_ips, vec![p("0.0.0.0/0"), p("::/0")]);
    }

    #[test]
    fn error_lines_and_messages() {
        let e = err(&with_iface("PostUp = iptables -A FORWARD -j ACCEPT", ""));
        assert_eq!(e.line, 3);
        assert!(matches!(
            e.kind,
            ConfigErrorKind::Unsupported { key: "PostUp", .. }
        ));
        assert!(e.to_string().starts_with("line 3: PostUp is not supported"));

        for hook in ["PreUp", "PostDown", "predown"] {
            let e = err(&with_iface(&format!("{hook} = echo hi"), ""));
            assert!(
                matches!(e.kind, ConfigErrorKind::Unsupported { .. }),
                "{hook}"
            );
        }

        let e = err(&with_iface("DNS = 192.0.2.53", ""));
        assert!(e.to_string().contains("resolv.conf"), "{e}");

        let e = err(&with_iface("Frobnicate = 1", ""));
        assert_eq!(e.line, 3);
        assert_eq!(
            e.kind,
            ConfigErrorKind::UnknownKey {
                key: "Frobnicate".into(),
                section: "Interface"
            }
        );
        assert_eq!(
            e.to_string(),
            "line 3: unknown key `Frobnicate` in [Interface]"
        );

        let e = err("PrivateKey = x\n[Interface]\n");
        assert_eq!(e.line, 1);
        assert!(matches!(e.kind, ConfigErrorKind::OutsideSection(_)));

        let e = err("# nothing\n\n");
        assert_eq!(e.line, 0);
        assert_eq!(e.to_string(), "configuration: no [Interface] section");

        let e = err("\n[Interface]\nAddress = 10.0.0.1/24\n");
        assert_eq!((e.line, e.kind), (2, ConfigErrorKind::MissingPrivateKey));

        let e = err(&with_iface("", "[Peer]\nAllowedIPs = 10.0.0.0/8\n"));
        assert_eq!((e.line, e.kind), (4, ConfigErrorKind::MissingPublicKey));

        let e = err(&with_iface("", "[Wat]\n"));
        assert_eq!(e.kind, ConfigErrorKind::UnknownSection("Wat".into()));
        let e = err(&with_iface("", "[Peer\n"));
        assert_eq!(e.kind, ConfigErrorKind::UnterminatedHeader);
        let e = err(&with_iface("just some words", ""));
        assert_eq!((e.line, e.kind), (3, ConfigErrorKind::Syntax));
        let e = err(&with_iface("= 5", ""));
        assert_eq!(e.kind, ConfigErrorKind::Syntax);
    }

    #[test]
    fn wrong_section() {
        let e = err(&with_iface("AllowedIPs = 10.0.0.0/8", ""));
        assert_eq!(
            e.kind,
            ConfigErrorKind::WrongSection {
                key: "AllowedIPs",
                expected: "Peer",
                found: "Interface"
            }
        );
        let e = err(&with_iface(
            "",
            &format!("[Peer]\nPublicKey = {PEER1}\nAddress = 10.0.0.1/24\n"),
        ));
        assert_eq!(e.line, 6);
        assert!(matches!(
            e.kind,
            ConfigErrorKind::WrongSection { key: "Address", .. }
        ));
    }

    #[test]
    fn keys_are_validated_without_echoing_them() {
        let e = err("[Interface]\nPrivateKey = c2VjcmV0c2VjcmV0\n");
        assert!(matches!(
            e.kind,
            ConfigErrorKind::InvalidValue {
                key: "PrivateKey",
                ..
            }
        ));
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
        let zero = Key([0; 32]).to_base64();
        assert!(parse(&format!("[Interface]\nPrivateKey = {zero}\n")).is_err());
        // An all-zero preshared key means none, as with wg.
        let cfg = parse(&with_iface(
            "",
            &format!("[Peer]\nPublicKey = {PEER1}\nPresharedKey = {zero}\nAllowedIPs = 10.0.0.0/8"),
        ))
        .unwrap();
        assert_eq!(cfg.peers[0].preshared_key, None);
        assert!(parse(&with_iface("", "[Peer]\nPublicKey = AAAA\n")).is_err());
    }

    #[test]
    fn duplicate_and_own_peers() {
        let e = err(&with_iface(
            "",
            &format!(
                "[Peer]\nPublicKey = {PEER1}\nAllowedIPs = 10.0.0.1/32\n[Peer]\nPublicKey = {PEER1}\nAllowedIPs = 10.0.0.2/32\n"
            ),
        ));
        assert_eq!(
            (e.line, e.kind),
            (
                8,
                ConfigErrorKind::DuplicatePeer {
                    key: key(PEER1),
                    first_line: 5
                }
            )
        );

        let e = err(&with_iface(
            "",
            &format!("[Peer]\nPublicKey = {PEER1}\nPublicKey = {PEER2}\n"),
        ));
        assert_eq!(
            (e.line, e.kind),
            (6, ConfigErrorKind::RepeatedPublicKey { first_line: 5 })
        );

        let own = key(PRIV).public_key().to_base64();
        let e = err(&with_iface("", &format!("[Peer]\nPublicKey = {own}\n")));
        assert!(matches!(e.kind, ConfigErrorKind::OwnPublicKey(_)));
    }

    #[test]
    fn numbers_and_ranges() {
        let e = err(&with_iface("MTU = 500", ""));
        assert!(matches!(
            e.kind,
            ConfigErrorKind::InvalidValue { key: "MTU", .. }
        ));
        assert!(parse(&with_iface("MTU = 65536", "")).is_err());
        assert!(parse(&with_iface("MTU = abc", "")).is_err());
        assert!(parse(&with_iface("MTU = -1", "")).is_err());
        assert_eq!(
            parse(&with_iface("MTU = 576\nAddress = 10.0.0.1/24", ""))
                .unwrap()
                .interface
                .mtu,
            Some(576)
        );
        assert!(parse(&with_iface("ListenPort = 70000", "")).is_err());
        assert_eq!(
            parse(&with_iface("ListenPort = 0", ""))
                .unwrap()
                .interface
                .listen_port,
            Some(0)
        );
        let peer = |ka: &str| {
            parse(&with_iface(
                "",
                &format!("[Peer]\nPublicKey = {PEER1}\nAllowedIPs = 10.0.0.0/8\nPersistentKeepalive = {ka}\n"),
            ))
        };
        assert_eq!(peer("0").unwrap().peers[0].persistent_keepalive, None);
        assert_eq!(peer("OFF").unwrap().peers[0].persistent_keepalive, None);
        assert_eq!(
            peer("65535").unwrap().peers[0].persistent_keepalive,
            Some(65535)
        );
        assert!(peer("65536").is_err());
        assert!(peer("soon").is_err());
    }

    #[test]
    fn mtu_warning_only_with_ipv6() {
        let cfg = parse(&with_iface("MTU = 1200\nAddress = 10.0.0.1/24", "")).unwrap();
        assert!(cfg.warnings.is_empty());
        let cfg = parse(&with_iface(
            "MTU = 1200\nAddress = 10.0.0.1/24, fd00::1/64",
            "",
        ))
        .unwrap();
        assert_eq!(cfg.warnings.len(), 1);
        assert!(
            cfg.warnings[0].starts_with("line 3: MTU 1200"),
            "{:?}",
            cfg.warnings
        );
        let cfg = parse(&with_iface(
            "MTU = 1200",
            &format!("[Peer]\nPublicKey = {PEER1}\nAllowedIPs = ::/0\n"),
        ))
        .unwrap();
        assert_eq!(cfg.warnings.len(), 1);
    }

    #[test]
    fn table_saveconfig_fwmark() {
        let cfg = parse(&with_iface("Table = off", "")).unwrap();
        assert!(cfg.interface.table_off);
        assert!(
            !parse(&with_iface("Table = auto", ""))
                .unwrap()
                .interface
                .table_off
        );
        let e = err(&with_iface("Table = 1234", ""));
        assert!(matches!(
            e.kind,
            ConfigErrorKind::Unsupported { key: "Table", .. }
        ));

        let cfg = parse(&with_iface("SaveConfig = false", "")).unwrap();
        assert_eq!(cfg.warnings.len(), 1);
        assert!(matches!(
            err(&with_iface("SaveConfig = true", "")).kind,
            ConfigErrorKind::Unsupported {
                key: "SaveConfig",
                ..
            }
        ));
        assert!(matches!(
            err(&with_iface("SaveConfig = maybe", "")).kind,
            ConfigErrorKind::InvalidValue { .. }
        ));

        assert!(parse(&with_iface("FwMark = off", "")).is_ok());
        assert!(parse(&with_iface("FwMark = 0", "")).is_ok());
        let e = err(&with_iface("FwMark = 0x1234", ""));
        assert!(matches!(
            e.kind,
            ConfigErrorKind::Unsupported { key: "FwMark", .. }
        ));
    }

    #[test]
    fn lists() {
        let e = err(&with_iface("Address = 10.0.0.1/24,,fd00::1/64", ""));
        assert!(matches!(
            e.kind,
            ConfigErrorKind::InvalidValue { key: "Address", .. }
        ));
        let e = err(&with_iface("Address = 10.0.0.300/24", ""));
        assert!(e.to_string().contains("10.0.0.300"), "{e}");
        assert!(parse(&with_iface("Address = 10.0.0.1/33", "")).is_err());
        // AllowedIPs are split on commas only, as wg does.
        let e = err(&with_iface(
            "",
            &format!("[Peer]\nPublicKey = {PEER1}\nAllowedIPs = 10.0.0.0/8 10.1.0.0/16\n"),
        ));
        assert!(matches!(
            e.kind,
            ConfigErrorKind::InvalidValue {
                key: "AllowedIPs",
                ..
            }
        ));
        // An empty list is allowed (wg accepts it) but warned about.
        let cfg = parse(&with_iface(
            "Address =",
            &format!("[Peer]\nPublicKey = {PEER1}\nAllowedIPs =\n"),
        ))
        .unwrap();
        assert!(cfg.interface.addresses.is_empty());
        assert!(cfg.peers[0].allowed_ips.is_empty());
        assert_eq!(cfg.warnings.len(), 1);
        assert!(
            cfg.warnings[0].contains("no AllowedIPs"),
            "{:?}",
            cfg.warnings
        );
    }

    #[test]
    fn warnings() {
        let cfg = parse(&with_iface(
            "ListenPort = 1\nListenPort = 2",
            &format!(
                "[Peer]\nPublicKey = {PEER1}\nAllowedIPs = 10.0.0.0/24\n\
                 [Peer]\nPublicKey = {PEER2}\nAllowedIPs = 10.0.0.0/24\n\
                 [Interface]\nMTU = 1400\n"
            ),
        ))
        .unwrap();
        assert_eq!(cfg.interface.listen_port, Some(2));
        assert_eq!(cfg.interface.mtu, Some(1400));
        assert_eq!(cfg.warnings.len(), 3, "{:?}", cfg.warnings);
        assert!(cfg.warnings[0].starts_with("line 4: ListenPort is set again"));
        assert!(cfg.warnings[1].contains("second [Interface]"));
        assert!(cfg.warnings[2].contains("10.0.0.0/24 is also given to the peer at line 5"));
    }

    /// A small deterministic generator, so the fuzz tests need no extra crate and
    /// a failure reproduces.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = rng.below(300);
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }
    }

    /// Random bytes rarely get past the first line, so also build random lines
    /// out of plausible pieces.
    #[test]
    fn random_lines_never_panic() {
        let headers = [
            "[Interface]",
            "[Peer]",
            "[peer",
            "[]",
            "[Other]",
            "",
            "=",
            "#",
        ];
        let keys = [
            "PrivateKey",
            "PublicKey",
            "PresharedKey",
            "Address",
            "AllowedIPs",
            "Endpoint",
            "PersistentKeepalive",
            "ListenPort",
            "MTU",
            "Table",
            "SaveConfig",
            "FwMark",
            "DNS",
            "PostUp",
            "mtu",
            "",
            " ",
            "é",
            "Key With Space",
        ];
        let values = [
            PRIV,
            PEER1,
            PEER2,
            PSK,
            "AAAA",
            "",
            "off",
            "auto",
            "true",
            "false",
            "0",
            "25",
            "576",
            "1280",
            "65535",
            "99999",
            "-1",
            "10.0.0.1/24",
            "fd00::/64",
            "::/0",
            "0.0.0.0/0",
            "/",
            "/129",
            "10.0.0.1",
            "[2001:db8::1]:51820",
            "[::1]",
            "example.com:51820",
            "192.0.2.1:51820",
            "2001:db8::1:5",
            ":",
            "[",
            "]",
            "é",
            "\u{feff}",
            "#",
            "=",
        ];
        let separators = [",", ", ", " ", ",,", "=", "#"];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut text = String::new();
            // Start most configurations well so that later lines get parsed too.
            if round % 4 != 0 {
                text.push_str(&format!("[Interface]\nPrivateKey = {PRIV}\n"));
            }
            for _ in 0..rng.below(12) {
                if rng.below(4) == 0 {
                    text.push_str(headers[rng.below(headers.len())]);
                } else {
                    text.push_str(keys[rng.below(keys.len())]);
                    text.push_str(if rng.below(10) == 0 { " " } else { " = " });
                    for i in 0..=rng.below(3) {
                        if i > 0 {
                            text.push_str(separators[rng.below(separators.len())]);
                        }
                        text.push_str(values[rng.below(values.len())]);
                    }
                }
                text.push_str(if rng.below(5) == 0 { "\r\n" } else { "\n" });
            }
            if parse(&text).is_ok() {
                accepted += 1;
            }
        }
        // The generator must reach the end of the parser, not just its first error.
        assert!(
            accepted > 500,
            "only {accepted} generated configurations parsed"
        );
    }
}
