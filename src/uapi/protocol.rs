//! The text protocol spoken on the userspace API socket, without any I/O.
//!
//! Requests and replies are `key=value` lines ending with an empty line. Parsing
//! follows wireguard-go's `IpcSetOperation`/`IpcHandle` so that `wg(8)` and other
//! clients written against wireguard-go see the same behaviour, with two deliberate
//! differences that come from taking a whole request at once:
//!
//! * a request is validated completely before anything is applied, so a bad line
//!   leaves the device untouched (wireguard-go applies the lines before it);
//! * a request must end with its empty line; one cut short is refused rather than
//!   applied up to where it stopped.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::UNIX_EPOCH;

use crate::key::Key;
use crate::prefix::IpPrefix;
use crate::wg::{DeviceInfo, DeviceUpdate, PeerUpdate};

/// The first line of each request names the operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Get,
    Set,
    /// Our extension: Prometheus counters (`metrics=1`).
    Metrics,
}

impl Operation {
    /// Recognises an operation line (without its newline).
    pub fn from_line(line: &str) -> Result<Operation, ProtocolError> {
        match line {
            "get=1" => Ok(Operation::Get),
            "set=1" => Ok(Operation::Set),
            "metrics=1" => Ok(Operation::Metrics),
            other => Err(ProtocolError::UnknownOperation(excerpt(other))),
        }
    }
}

/// One parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Get,
    /// Peers must be applied in order: the same public key may appear in several
    /// sections (for example removed, then added again), as in wireguard-go.
    Set(DeviceUpdate),
    Metrics,
}

/// Why a request was refused. [`ProtocolError::errno`] gives the code to report.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("empty request")]
    Empty,
    #[error("unknown operation {0:?}")]
    UnknownOperation(String),
    #[error("request does not end with an empty line")]
    Unterminated,
    #[error("unexpected data after the end of the {0} request")]
    TrailingData(&'static str),
    #[error("line {0} is not key=value")]
    MalformedLine(usize),
    #[error("invalid {key}: {reason}")]
    InvalidValue { key: &'static str, reason: String },
    #[error("unknown device key {0:?}")]
    UnknownDeviceKey(String),
    #[error("unknown peer key {0:?}")]
    UnknownPeerKey(String),
    #[error("{0} is a device key and must come before the first public_key")]
    DeviceKeyInPeerSection(&'static str),
    #[error("{0} is a peer key and needs a public_key line before it")]
    PeerKeyOutsidePeer(&'static str),
    #[error("line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("request longer than {0} lines")]
    TooManyLines(usize),
    #[error("request larger than {0} bytes")]
    TooLarge(usize),
    #[error("request is not valid UTF-8")]
    InvalidUtf8,
    #[error("reply has no errno line")]
    MissingErrno,
}

impl ProtocolError {
    /// The (positive) errno to report, following wireguard-go: lines that are not
    /// `key=value` are protocol errors, everything else is an invalid argument.
    pub fn errno(&self) -> i32 {
        match self {
            ProtocolError::MalformedLine(_) | ProtocolError::MissingErrno => libc::EPROTO,
            _ => libc::EINVAL,
        }
    }
}

/// Error messages quote what the client sent; keep them short and printable so a
/// hostile client cannot flood or corrupt the log.
fn excerpt(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// Parses one complete request, including its terminating empty line:
/// `get=1\n\n`, `metrics=1\n\n`, or `set=1\n` followed by `key=value` lines and `\n`.
///
/// Allowed IPs are reduced to their network address (`10.1.2.3/8` becomes
/// `10.0.0.0/8`), which is what wireguard-go stores and reports.
pub fn parse_request(input: &str) -> Result<Request, ProtocolError> {
    let (op_line, rest) = input.split_once('\n').ok_or(if input.is_empty() {
        ProtocolError::Empty
    } else {
        ProtocolError::Unterminated
    })?;
    match Operation::from_line(op_line)? {
        Operation::Get => expect_only_terminator(rest, "get").map(|()| Request::Get),
        Operation::Metrics => expect_only_terminator(rest, "metrics").map(|()| Request::Metrics),
        Operation::Set => parse_set_body(rest).map(Request::Set),
    }
}

fn expect_only_terminator(rest: &str, op: &'static str) -> Result<(), ProtocolError> {
    match rest {
        "\n" => Ok(()),
        "" => Err(ProtocolError::Unterminated),
        _ => Err(ProtocolError::TrailingData(op)),
    }
}

/// Which part of a `set` request a key belongs to.
enum Section {
    Device,
    Peer(PeerUpdate),
}

fn parse_set_body(body: &str) -> Result<DeviceUpdate, ProtocolError> {
    let mut update = DeviceUpdate::default();
    let mut section = Section::Device;
    let mut rest = body;
    // Line numbers count the operation line as line 1.
    let mut line_no = 1;
    loop {
        let (raw, after) = rest.split_once('\n').ok_or(ProtocolError::Unterminated)?;
        rest = after;
        line_no += 1;
        // bufio.ScanLines (which wireguard-go reads set lines with) drops a CR before
        // the newline; do the same so CRLF clients behave identically.
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            if !rest.is_empty() {
                return Err(ProtocolError::TrailingData("set"));
            }
            break;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or(ProtocolError::MalformedLine(line_no))?;
        if key == "public_key" {
            if let Section::Peer(peer) = section {
                update.peers.push(peer);
            }
            section = Section::Peer(PeerUpdate::new(parse_key("public_key", value)?));
            continue;
        }
        match &mut section {
            Section::Device => device_line(&mut update, key, value)?,
            Section::Peer(peer) => peer_line(peer, key, value)?,
        }
    }
    if let Section::Peer(peer) = section {
        update.peers.push(peer);
    }
    Ok(update)
}

const DEVICE_KEYS: [&str; 4] = ["private_key", "listen_port", "fwmark", "replace_peers"];
const PEER_KEYS: [&str; 8] = [
    "remove",
    "update_only",
    "preshared_key",
    "endpoint",
    "persistent_keepalive_interval",
    "replace_allowed_ips",
    "allowed_ip",
    "protocol_version",
];

fn device_line(update: &mut DeviceUpdate, key: &str, value: &str) -> Result<(), ProtocolError> {
    match key {
        "private_key" => update.private_key = Some(parse_key("private_key", value)?),
        "listen_port" => update.listen_port = Some(parse_decimal("listen_port", value)?),
        "fwmark" => update.fwmark = Some(parse_decimal("fwmark", value)?),
        "replace_peers" => update.replace_peers = parse_true("replace_peers", value)?,
        _ => {
            return Err(match PEER_KEYS.iter().find(|k| **k == key) {
                Some(k) => ProtocolError::PeerKeyOutsidePeer(k),
                None => ProtocolError::UnknownDeviceKey(excerpt(key)),
            })
        }
    }
    Ok(())
}

fn peer_line(peer: &mut PeerUpdate, key: &str, value: &str) -> Result<(), ProtocolError> {
    match key {
        "remove" => peer.remove = parse_true("remove", value)?,
        "update_only" => peer.update_only = parse_true("update_only", value)?,
        "preshared_key" => peer.preshared_key = Some(parse_key("preshared_key", value)?),
        "endpoint" => peer.endpoint = Some(parse_endpoint(value)?),
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive =
                Some(parse_decimal("persistent_keepalive_interval", value)?);
        }
        "replace_allowed_ips" => {
            peer.replace_allowed_ips = parse_true("replace_allowed_ips", value)?;
            // wireguard-go applies lines in order, so allowed IPs given earlier in
            // this section are dropped by the replace as well.
            peer.allowed_ips.clear();
        }
        "allowed_ip" => peer.allowed_ips.push(parse_allowed_ip(value)?),
        "protocol_version" => {
            if value != "1" {
                return Err(invalid("protocol_version", "only version 1 exists"));
            }
        }
        _ => {
            return Err(match DEVICE_KEYS.iter().find(|k| **k == key) {
                Some(k) => ProtocolError::DeviceKeyInPeerSection(k),
                None => ProtocolError::UnknownPeerKey(excerpt(key)),
            })
        }
    }
    Ok(())
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::InvalidValue {
        key,
        reason: reason.into(),
    }
}

/// Keys are exactly 64 hex digits. [`Key::from_hex`] alone would also accept
/// surrounding whitespace, which wireguard-go refuses. The value is never quoted
/// in the error because it may be a secret.
fn parse_key(key: &'static str, value: &str) -> Result<Key, ProtocolError> {
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(key, "must be 64 hex digits"));
    }
    Key::from_hex(value).map_err(|e| invalid(key, e.to_string()))
}

/// Plain decimal digits only, like Go's `strconv.ParseUint(s, 10, bits)`: Rust's
/// `from_str` would also take a leading `+`.
fn parse_decimal<T: FromStr>(key: &'static str, value: &str) -> Result<T, ProtocolError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            key,
            format!("{:?} is not a decimal number", excerpt(value)),
        ));
    }
    value
        .parse()
        .map_err(|_| invalid(key, format!("{} is out of range", excerpt(value))))
}

/// Flags carry no "false": wireguard-go refuses anything but `true`.
fn parse_true(key: &'static str, value: &str) -> Result<bool, ProtocolError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(invalid(
            key,
            format!("{:?} is not \"true\"", excerpt(value)),
        ))
    }
}

fn parse_endpoint(value: &str) -> Result<SocketAddr, ProtocolError> {
    value.parse().map_err(|_| {
        // wg(8) prints link-local endpoints with the interface name as zone; we would
        // need an interface lookup (I/O) to turn it into the scope id.
        let reason = if value.starts_with('[') && value.contains('%') {
            format!(
                "{:?}: only numeric IPv6 zones are supported",
                excerpt(value)
            )
        } else {
            format!("{:?} is not IPv4:port or [IPv6]:port", excerpt(value))
        };
        invalid("endpoint", reason)
    })
}

/// `addr/len` with the length required, as Go's `netip.ParsePrefix` does
/// ([`IpPrefix::from_str`] would take a bare address as a host route).
fn parse_allowed_ip(value: &str) -> Result<IpPrefix, ProtocolError> {
    let bad = || {
        invalid(
            "allowed_ip",
            format!("{:?} is not address/length", excerpt(value)),
        )
    };
    let (addr, len) = value.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = parse_decimal("allowed_ip", len).map_err(|_| bad())?;
    IpPrefix::new(addr, len)
        .map(|p| p.network())
        .map_err(|e| invalid("allowed_ip", e.to_string()))
}

/// The reply to `get=1`, byte for byte in wireguard-go's order, ending with
/// `errno=0` and the empty line.
///
/// Two choices where wireguard-go differs slightly and `wg(8)` accepts both:
/// `listen_port` is always present (wireguard-go omits 0) and `preshared_key` only
/// when one is set (wireguard-go sends 64 zeros).
pub fn format_get(info: &DeviceInfo) -> String {
    // About 400 bytes per peer with a handful of allowed IPs.
    let mut out = String::with_capacity(128 + info.peers.len() * 400);
    // `fmt::Write` for `String` cannot fail, hence the ignored results.
    if let Some(key) = info.private_key.filter(|k| !k.is_zero()) {
        let _ = writeln!(out, "private_key={}", key.to_hex());
    }
    let _ = writeln!(out, "listen_port={}", info.listen_port);
    if info.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", info.fwmark);
    }
    for peer in &info.peers {
        let config = &peer.config;
        let _ = writeln!(out, "public_key={}", config.public_key.to_hex());
        if let Some(psk) = config.preshared_key.filter(|k| !k.is_zero()) {
            let _ = writeln!(out, "preshared_key={}", psk.to_hex());
        }
        out.push_str("protocol_version=1\n");
        if let Some(endpoint) = config.endpoint {
            // SocketAddr's Display brackets IPv6 (with a numeric zone if any).
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        // A handshake "before 1970" can only come from a broken clock; report it
        // like "never" rather than as a negative time wg(8) cannot parse.
        let since_epoch = peer
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", since_epoch.as_secs());
        let _ = writeln!(
            out,
            "last_handshake_time_nsec={}",
            since_epoch.subsec_nanos()
        );
        let _ = writeln!(out, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            config.persistent_keepalive.unwrap_or(0)
        );
        for ip in &config.allowed_ips {
            let _ = writeln!(out, "allowed_ip={}", ip.network());
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// A `set=1` request that applies `update`; what a client sends to a device.
/// [`parse_request`] turns it back into the same update.
pub fn format_set(update: &DeviceUpdate) -> String {
    let mut out = String::from("set=1\n");
    if let Some(key) = update.private_key {
        let _ = writeln!(out, "private_key={}", key.to_hex());
    }
    if let Some(port) = update.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    if let Some(mark) = update.fwmark {
        let _ = writeln!(out, "fwmark={mark}");
    }
    if update.replace_peers {
        out.push_str("replace_peers=true\n");
    }
    for peer in &update.peers {
        let _ = writeln!(out, "public_key={}", peer.public_key.to_hex());
        if peer.remove {
            out.push_str("remove=true\n");
        }
        if peer.update_only {
            out.push_str("update_only=true\n");
        }
        if let Some(psk) = peer.preshared_key {
            let _ = writeln!(out, "preshared_key={}", psk.to_hex());
        }
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "endpoint={endpoint}");
        }
        if let Some(interval) = peer.persistent_keepalive {
            let _ = writeln!(out, "persistent_keepalive_interval={interval}");
        }
        if peer.replace_allowed_ips {
            out.push_str("replace_allowed_ips=true\n");
        }
        for ip in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out.push('\n');
    out
}

/// The status line that ends every reply.
///
/// `errno` is a positive `errno.h` value, or 0 for success. It goes on the wire
/// negated (`errno=-22`), because that is what wireguard-go sends and what `wg(8)`
/// expects: it reports `errno=-22` as "Invalid argument" but `errno=22` as
/// "Unknown error -22".
pub fn format_errno(errno: i32) -> String {
    match errno.unsigned_abs() {
        0 => "errno=0\n\n".to_string(),
        n => format!("errno=-{n}\n\n"),
    }
}

/// Splits a reply into its body (every line before `errno=`) and the errno as a
/// positive value (0 for success), accepting either sign on the wire.
pub fn split_reply(reply: &str) -> Result<(&str, i32), ProtocolError> {
    let mut start = 0;
    for line in reply.split_inclusive('\n') {
        if let Some(value) = line.strip_prefix("errno=") {
            let value = value.strip_suffix('\n').unwrap_or(value);
            let digits = value.strip_prefix('-').unwrap_or(value);
            let errno: i32 = parse_decimal("errno", digits)?;
            return Ok((&reply[..start], errno));
        }
        start += line.len();
    }
    Err(ProtocolError::MissingErrno)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};
    use std::time::Duration;

    use super::*;
    use crate::wg::{PeerConfig, PeerInfo};

    fn key(byte: u8) -> Key {
        Key([byte; 32])
    }

    fn hex(byte: u8) -> String {
        key(byte).to_hex()
    }

    fn set(body: &str) -> Result<DeviceUpdate, ProtocolError> {
        match parse_request(&format!("set=1\n{body}\n"))? {
            Request::Set(update) => Ok(update),
            other => panic!("expected a set, got {other:?}"),
        }
    }

    fn prefix(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    #[test]
    fn parses_get_and_metrics() {
        assert_eq!(parse_request("get=1\n\n"), Ok(Request::Get));
        assert_eq!(parse_request("metrics=1\n\n"), Ok(Request::Metrics));
    }

    #[test]
    fn rejects_bad_framing() {
        assert_eq!(parse_request(""), Err(ProtocolError::Empty));
        assert_eq!(parse_request("get=1"), Err(ProtocolError::Unterminated));
        assert_eq!(parse_request("get=1\n"), Err(ProtocolError::Unterminated));
        assert_eq!(
            parse_request("get=1\nx\n"),
            Err(ProtocolError::TrailingData("get"))
        );
        assert_eq!(
            parse_request("get=1\n\nget=1\n\n"),
            Err(ProtocolError::TrailingData("get"))
        );
        assert_eq!(
            parse_request("metrics=1\nx"),
            Err(ProtocolError::TrailingData("metrics"))
        );
        assert_eq!(
            parse_request("get=2\n\n"),
            Err(ProtocolError::UnknownOperation("get=2".into()))
        );
        assert_eq!(
            parse_request("\n\n"),
            Err(ProtocolError::UnknownOperation(String::new()))
        );
        assert_eq!(parse_request("set=1\n"), Err(ProtocolError::Unterminated));
        assert_eq!(
            parse_request("set=1\nlisten_port=1\n"),
            Err(ProtocolError::Unterminated)
        );
        assert_eq!(
            parse_request("set=1\nlisten_port=1"),
            Err(ProtocolError::Unterminated)
        );
        assert_eq!(
            parse_request("set=1\n\nlisten_port=1\n\n"),
            Err(ProtocolError::TrailingData("set"))
        );
        assert_eq!(set("noequals\n"), Err(ProtocolError::MalformedLine(2)));
        assert_eq!(
            set("listen_port=1\nnoequals\n"),
            Err(ProtocolError::MalformedLine(3))
        );
        assert_eq!(ProtocolError::MalformedLine(2).errno(), libc::EPROTO);
        assert_eq!(ProtocolError::Unterminated.errno(), libc::EINVAL);
    }

    #[test]
    fn empty_set_is_a_no_op() {
        assert_eq!(set(""), Ok(DeviceUpdate::default()));
    }

    #[test]
    fn parses_device_keys() {
        let update = set(&format!(
            "private_key={}\nlisten_port=51820\nfwmark=4294967295\nreplace_peers=true\n",
            hex(7)
        ))
        .unwrap();
        assert_eq!(
            update,
            DeviceUpdate {
                private_key: Some(key(7)),
                listen_port: Some(51820),
                fwmark: Some(u32::MAX),
                replace_peers: true,
                peers: vec![],
            }
        );
        // Zero values mean "remove the key", "pick a port" and "no mark".
        let update = set(&format!(
            "private_key={}\nlisten_port=0\nfwmark=0\n",
            "0".repeat(64)
        ))
        .unwrap();
        assert!(update.private_key.unwrap().is_zero());
        assert_eq!(update.listen_port, Some(0));
        assert_eq!(update.fwmark, Some(0));
        // Upper-case hex is accepted, as by Go's encoding/hex.
        let update = set(&format!("private_key={}\n", hex(0xab).to_uppercase())).unwrap();
        assert_eq!(update.private_key, Some(key(0xab)));
        // Later values win, as when wireguard-go applies lines in order.
        assert_eq!(
            set("listen_port=1\nlisten_port=2\n").unwrap().listen_port,
            Some(2)
        );
    }

    #[test]
    fn parses_every_peer_key() {
        let update = set(&format!(
            "public_key={}\nupdate_only=true\npreshared_key={}\nendpoint=[2001:db8::1]:51820\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.0.0.0/8\n\
             allowed_ip=fd00::/64\nprotocol_version=1\npublic_key={}\nremove=true\n",
            hex(1),
            hex(2),
            hex(3)
        ))
        .unwrap();
        let mut first = PeerUpdate::new(key(1));
        first.update_only = true;
        first.preshared_key = Some(key(2));
        first.endpoint = Some("[2001:db8::1]:51820".parse().unwrap());
        first.persistent_keepalive = Some(25);
        first.replace_allowed_ips = true;
        first.allowed_ips = vec![prefix("10.0.0.0/8"), prefix("fd00::/64")];
        let mut second = PeerUpdate::new(key(3));
        second.remove = true;
        assert_eq!(update.peers, vec![first, second]);
    }

    #[test]
    fn peer_values() {
        let peer = |line: &str| set(&format!("public_key={}\n{line}\n", hex(1)));
        let endpoint = |line: &str| peer(line).map(|u| u.peers[0].endpoint);
        assert_eq!(
            endpoint("endpoint=1.2.3.4:51820"),
            Ok(Some(SocketAddr::from((Ipv4Addr::new(1, 2, 3, 4), 51820))))
        );
        assert_eq!(
            endpoint("endpoint=[fe80::1%3]:5"),
            Ok(Some(SocketAddr::V6(SocketAddrV6::new(
                "fe80::1".parse().unwrap(),
                5,
                0,
                3
            ))))
        );
        // Host bits are cleared; wireguard-go's allowed-IPs trie does the same.
        assert_eq!(
            peer("allowed_ip=10.1.2.3/8").unwrap().peers[0].allowed_ips,
            vec![prefix("10.0.0.0/8")]
        );
        assert_eq!(
            peer("allowed_ip=0.0.0.0/0\nallowed_ip=::/0").unwrap().peers[0].allowed_ips,
            vec![prefix("0.0.0.0/0"), prefix("::/0")]
        );
        // A zero preshared key clears it; 0 turns keepalive off.
        let p = &peer(&format!(
            "preshared_key={}\npersistent_keepalive_interval=0",
            "0".repeat(64)
        ))
        .unwrap()
        .peers[0];
        assert!(p.preshared_key.unwrap().is_zero());
        assert_eq!(p.persistent_keepalive, Some(0));
    }

    #[test]
    fn replace_allowed_ips_drops_earlier_ones_in_the_section() {
        let update = set(&format!(
            "public_key={}\nallowed_ip=10.0.0.0/8\nreplace_allowed_ips=true\nallowed_ip=10.1.0.0/16\n",
            hex(1)
        ))
        .unwrap();
        assert!(update.peers[0].replace_allowed_ips);
        assert_eq!(update.peers[0].allowed_ips, vec![prefix("10.1.0.0/16")]);
    }

    #[test]
    fn repeated_public_key_keeps_sections_in_order() {
        let update = set(&format!(
            "public_key={k}\nremove=true\npublic_key={k}\nallowed_ip=10.0.0.1/32\n",
            k = hex(1)
        ))
        .unwrap();
        assert_eq!(update.peers.len(), 2);
        assert!(update.peers[0].remove);
        assert!(!update.peers[1].remove);
    }

    #[test]
    fn accepts_crlf_lines_in_set() {
        let update = parse_request("set=1\r\nlisten_port=5\r\n\r\n");
        // The operation line must be exact (wireguard-go compares it whole).
        assert_eq!(
            update,
            Err(ProtocolError::UnknownOperation("set=1\\r".into()))
        );
        let update = parse_request("set=1\nlisten_port=5\r\n\r\n").unwrap();
        assert_eq!(
            update,
            Request::Set(DeviceUpdate {
                listen_port: Some(5),
                ..DeviceUpdate::default()
            })
        );
    }

    #[test]
    fn rejects_bad_device_values() {
        let cases = [
            ("private_key=abc", "private_key"),
            (&format!("private_key= {}", &hex(1)[1..]), "private_key"),
            (&format!("private_key={}", "g".repeat(64)), "private_key"),
            ("listen_port=65536", "listen_port"),
            ("listen_port=-1", "listen_port"),
            ("listen_port=+1", "listen_port"),
            ("listen_port=", "listen_port"),
            ("listen_port= 1", "listen_port"),
            ("fwmark=4294967296", "fwmark"),
            ("fwmark=0x10", "fwmark"),
            ("replace_peers=false", "replace_peers"),
            ("replace_peers=1", "replace_peers"),
        ];
        for (line, name) in cases {
            match set(&format!("{line}\n")) {
                Err(e @ ProtocolError::InvalidValue { key, .. }) => {
                    assert_eq!(key, name, "{line}");
                    assert!(e.to_string().contains(name), "{e}");
                    assert_eq!(e.errno(), libc::EINVAL);
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_bad_peer_values() {
        let cases = [
            ("public_key=zz", "public_key"),
            ("public_key=", "public_key"),
            ("remove=false", "remove"),
            ("update_only=yes", "update_only"),
            ("preshared_key=1234", "preshared_key"),
            ("endpoint=1.2.3.4", "endpoint"),
            ("endpoint=1.2.3.4:", "endpoint"),
            ("endpoint=1.2.3.4:65536", "endpoint"),
            ("endpoint=2001:db8::1:51820", "endpoint"),
            ("endpoint=[1.2.3.4]:5", "endpoint"),
            ("endpoint=example.com:51820", "endpoint"),
            ("endpoint=[fe80::1%eth0]:51820", "endpoint"),
            (
                "persistent_keepalive_interval=65536",
                "persistent_keepalive_interval",
            ),
            (
                "persistent_keepalive_interval=off",
                "persistent_keepalive_interval",
            ),
            ("replace_allowed_ips=TRUE", "replace_allowed_ips"),
            ("allowed_ip=10.0.0.1", "allowed_ip"),
            ("allowed_ip=10.0.0.0/33", "allowed_ip"),
            ("allowed_ip=::/129", "allowed_ip"),
            ("allowed_ip=10.0.0.0/+8", "allowed_ip"),
            ("allowed_ip=10.0.0.0/", "allowed_ip"),
            ("allowed_ip=fe80::%eth0/64", "allowed_ip"),
            ("allowed_ip=host/32", "allowed_ip"),
            ("protocol_version=2", "protocol_version"),
            ("protocol_version=", "protocol_version"),
        ];
        for (line, name) in cases {
            let body = if line.starts_with("public_key") {
                format!("{line}\n")
            } else {
                format!("public_key={}\n{line}\n", hex(1))
            };
            match set(&body) {
                Err(e @ ProtocolError::InvalidValue { key, .. }) => {
                    assert_eq!(key, name, "{line}");
                    assert!(e.to_string().contains(name), "{e}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
        // Values after remove=true are still checked, as in wireguard-go.
        assert!(set(&format!(
            "public_key={}\nremove=true\nallowed_ip=x\n",
            hex(1)
        ))
        .is_err());
    }

    #[test]
    fn secrets_are_not_echoed_in_errors() {
        let secret = format!("{}x", &hex(0x5a)[..63]);
        let err = set(&format!("private_key={secret}\n")).unwrap_err();
        assert!(!err.to_string().contains(&secret[..16]), "{err}");
    }

    #[test]
    fn rejects_keys_in_the_wrong_place_or_unknown() {
        assert_eq!(
            set("frobnicate=1\n"),
            Err(ProtocolError::UnknownDeviceKey("frobnicate".into()))
        );
        assert_eq!(
            set(&format!("public_key={}\nfrobnicate=1\n", hex(1))),
            Err(ProtocolError::UnknownPeerKey("frobnicate".into()))
        );
        for device_key in DEVICE_KEYS {
            let err = set(&format!("public_key={}\n{device_key}=1\n", hex(1))).unwrap_err();
            assert_eq!(err, ProtocolError::DeviceKeyInPeerSection(device_key));
            assert!(err.to_string().contains(device_key));
        }
        for peer_key in PEER_KEYS {
            let err = set(&format!("{peer_key}=1\n")).unwrap_err();
            assert_eq!(err, ProtocolError::PeerKeyOutsidePeer(peer_key));
            assert!(err.to_string().contains(peer_key));
        }
        // Keys are case-sensitive; get-only keys cannot be set.
        assert!(set("Listen_Port=1\n").is_err());
        assert!(set(&format!("public_key={}\ntx_bytes=1\n", hex(1))).is_err());
        // A hostile key name is shortened and escaped before it reaches a log.
        let long = format!("{}\u{1b}", "k".repeat(100));
        match set(&format!("{long}=1\n")) {
            Err(ProtocolError::UnknownDeviceKey(k)) => {
                assert!(k.len() < 80 && !k.contains('\u{1b}'), "{k}")
            }
            other => panic!("{other:?}"),
        }
        // The value may contain '=': only the first one splits.
        assert!(matches!(
            set("listen_port=1=2\n"),
            Err(ProtocolError::InvalidValue {
                key: "listen_port",
                ..
            })
        ));
    }

    fn sample_info() -> DeviceInfo {
        let mut first = PeerConfig::new(key(2));
        first.preshared_key = Some(key(3));
        first.endpoint = Some("[2001:db8::1]:51820".parse().unwrap());
        first.persistent_keepalive = Some(25);
        first.allowed_ips = vec![prefix("10.0.0.0/24"), prefix("fd00::/64")];
        let mut second = PeerConfig::new(key(4));
        second.endpoint = Some(SocketAddr::from((Ipv4Addr::new(1, 2, 3, 4), 5)));
        DeviceInfo {
            private_key: Some(key(1)),
            listen_port: 42423,
            fwmark: 16,
            peers: vec![
                PeerInfo {
                    config: first,
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
                    rx_bytes: 1000,
                    tx_bytes: 2000,
                    rx_dropped_source: 7,
                },
                PeerInfo {
                    config: second,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    rx_dropped_source: 0,
                },
            ],
        }
    }

    #[test]
    fn formats_get_like_wireguard_go() {
        let expected = format!(
            "private_key={}\nlisten_port=42423\nfwmark=16\n\
             public_key={}\npreshared_key={}\nprotocol_version=1\nendpoint=[2001:db8::1]:51820\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=123456789\n\
             tx_bytes=2000\nrx_bytes=1000\npersistent_keepalive_interval=25\n\
             allowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\n\
             public_key={}\nprotocol_version=1\nendpoint=1.2.3.4:5\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\nerrno=0\n\n",
            hex(1),
            hex(2),
            hex(3),
            hex(4)
        );
        assert_eq!(format_get(&sample_info()), expected);
    }

    #[test]
    fn formats_get_for_a_bare_device() {
        let info = DeviceInfo {
            private_key: Some(Key([0; 32])),
            listen_port: 0,
            fwmark: 0,
            peers: vec![],
        };
        assert_eq!(format_get(&info), "listen_port=0\nerrno=0\n\n");
        let mut info = sample_info();
        info.peers[0].last_handshake = Some(UNIX_EPOCH - Duration::from_secs(5));
        info.peers[0].config.preshared_key = Some(Key([0; 32]));
        info.peers[0].config.endpoint = Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 9)));
        let text = format_get(&info);
        assert!(text.contains("last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"));
        assert!(text.contains("endpoint=[::1]:9\n"));
        assert!(!text.contains("preshared_key"));
    }

    #[test]
    fn errno_lines() {
        assert_eq!(format_errno(0), "errno=0\n\n");
        assert_eq!(format_errno(libc::EINVAL), "errno=-22\n\n");
        assert_eq!(format_errno(-libc::EINVAL), "errno=-22\n\n");
        assert_eq!(format_errno(i32::MIN), "errno=-2147483648\n\n");
        assert_eq!(split_reply("errno=0\n\n"), Ok(("", 0)));
        assert_eq!(split_reply("a=1\nerrno=-22\n\n"), Ok(("a=1\n", 22)));
        assert_eq!(split_reply("errno=22\n\n"), Ok(("", 22)));
        assert_eq!(split_reply("a=1\n"), Err(ProtocolError::MissingErrno));
        assert!(split_reply("errno=x\n\n").is_err());
    }

    #[test]
    fn set_round_trips() {
        let mut peer = PeerUpdate::new(key(9));
        peer.update_only = true;
        peer.preshared_key = Some(key(0));
        peer.endpoint = Some("[fe80::1%4]:1".parse().unwrap());
        peer.persistent_keepalive = Some(0);
        peer.replace_allowed_ips = true;
        peer.allowed_ips = vec![prefix("10.0.0.0/8"), prefix("::/0")];
        let mut removed = PeerUpdate::new(key(8));
        removed.remove = true;
        let update = DeviceUpdate {
            private_key: Some(key(1)),
            listen_port: Some(1),
            fwmark: Some(2),
            replace_peers: true,
            peers: vec![peer, removed, PeerUpdate::new(key(7))],
        };
        assert_eq!(
            parse_request(&format_set(&update)),
            Ok(Request::Set(update.clone()))
        );
        assert_eq!(
            parse_request(&format_set(&DeviceUpdate::default())),
            Ok(Request::Set(DeviceUpdate::default()))
        );
    }

    /// What `get` reports can be fed back as a `set` (minus the live counters)
    /// and describes the same configuration, as `wg showconf | wg setconf` relies on.
    #[test]
    fn get_output_sets_the_same_configuration() {
        let info = sample_info();
        let mut request = String::from("set=1\nreplace_peers=true\n");
        let reply = format_get(&info);
        let (body, errno) = split_reply(&reply).unwrap();
        assert_eq!(errno, 0);
        for line in body.lines() {
            let live = [
                "last_handshake_time_sec=",
                "last_handshake_time_nsec=",
                "tx_bytes=",
                "rx_bytes=",
            ];
            if !live.iter().any(|p| line.starts_with(p)) {
                request.push_str(line);
                request.push('\n');
            }
        }
        request.push('\n');
        let Request::Set(update) = parse_request(&request).unwrap() else {
            panic!("not a set");
        };
        assert_eq!(update.private_key, info.private_key);
        assert_eq!(update.listen_port, Some(info.listen_port));
        assert_eq!(update.fwmark, Some(info.fwmark));
        assert!(update.replace_peers);
        let configs: Vec<PeerConfig> = update
            .peers
            .iter()
            .map(|p| PeerConfig {
                public_key: p.public_key,
                preshared_key: p.preshared_key,
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive.filter(|&k| k != 0),
                allowed_ips: p.allowed_ips.clone(),
            })
            .collect();
        let expected: Vec<PeerConfig> = info.peers.iter().map(|p| p.config.clone()).collect();
        assert_eq!(configs, expected);
    }
}
