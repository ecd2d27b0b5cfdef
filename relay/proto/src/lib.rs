//! The relay's control API: request and response bodies shared by the relay
//! (which serves them) and the agent (which calls them), and the trust decision for
//! the relay's certificate ([`pin`]).
//!
//! Everything here is plain data with a fixed JSON shape; field names are part of
//! the wire contract, so renaming a field is a breaking API change. Fields are typed
//! ([`Key`], [`Ipv6Addr`], [`Endpoint`]): a body that decodes is well formed (the
//! relay still checks what only it can judge, such as a key being its own), and
//! nobody formats and parses the same value twice. On the wire keys are base64 and
//! addresses `addr/128` or `addr/32`, so the JSON reads the same as a WireGuard
//! configuration file.
//!
//! Unknown fields are ignored on input, so an older relay accepts requests from a
//! newer agent that sends extra optional fields.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use sidecar::{Endpoint, Key};

pub mod device;
pub mod discovery;
mod host;
pub mod pin;
pub mod pq;
mod whole_number;

/// Every API token starts with this, so that a leaked token is recognisable
/// (secret scanners key on it) and a wrong kind of credential is rejected early.
pub const TOKEN_PREFIX: &str = "sct_live_";

/// Stable machine-readable error codes carried in [`ApiError::error`].
/// Clients should branch on these, never on the message text.
pub mod codes {
    /// 401: missing, malformed, unknown or revoked bearer token.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 403: the request is not allowed for reasons other than the token's scopes.
    pub const FORBIDDEN: &str = "forbidden";
    /// 403: the token is valid but lacks the scope the route needs (named in the
    /// message and in the `WWW-Authenticate` challenge, as RFC 6750 section 3.1 says).
    pub const INSUFFICIENT_SCOPE: &str = "insufficient_scope";
    /// 403: registering would exceed the token's `max_peers` or `max_ipv4`.
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    /// 404: no such route, peer or token.
    pub const NOT_FOUND: &str = "not_found";
    /// 405: the route exists but not with this method.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// 409: the request conflicts with existing state.
    pub const CONFLICT: &str = "conflict";
    /// 400: the body is not syntactically valid JSON, or the request is malformed.
    pub const BAD_REQUEST: &str = "bad_request";
    /// 422: the JSON is well formed but a field is missing, mistyped or invalid.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// 400: the public key is not base64 of 32 bytes.
    pub const INVALID_PUBKEY: &str = "invalid_pubkey";
    /// 413: the request body exceeds the size limit.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// 415: the body is not `application/json`.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    /// 422: an IPv4 address was requested but this relay has no IPv4 pool.
    pub const IPV4_UNAVAILABLE: &str = "ipv4_unavailable";
    /// 503: the relay has no free address left in a pool.
    pub const POOL_EXHAUSTED: &str = "pool_exhausted";
    /// 503: the relay is shutting down and accepts no new peers.
    pub const DRAINING: &str = "draining";
    /// 429: too many requests from this token or source address; `Retry-After` says
    /// how many seconds to wait.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// 503: too many requests in flight on the relay; retry after `Retry-After`.
    pub const OVERLOADED: &str = "overloaded";
    /// 500: an internal failure; details are in the relay's log only.
    pub const INTERNAL: &str = "internal";
    /// 403: this relay requires a post-quantum preshared key and the registration
    /// carried no X-Wing ciphertext.
    pub const PQ_REQUIRED: &str = "pq_required";
    /// 403: the token is bound to another machine.
    pub const MACHINE_MISMATCH: &str = "machine_mismatch";
    /// 403: the token is bound to a machine and the registration named none.
    pub const MACHINE_REQUIRED: &str = "machine_required";
    /// 400: a device login asked for a scope that does not exist.
    pub const INVALID_SCOPE: &str = "invalid_scope";
    /// 428: the device login is not decided yet; poll again after the interval.
    pub const AUTHORIZATION_PENDING: &str = "authorization_pending";
    /// 429: polled faster than the interval, which has now grown by 5 seconds.
    pub const SLOW_DOWN: &str = "slow_down";
    /// 400: the device code expired; start over.
    pub const EXPIRED_TOKEN: &str = "expired_token";
    /// 400: the operator denied the device login.
    pub const ACCESS_DENIED: &str = "access_denied";
    /// 400: the device code is unknown or was already used.
    pub const INVALID_GRANT: &str = "invalid_grant";
    /// 400: a `grant_type` other than the device code grant.
    pub const UNSUPPORTED_GRANT_TYPE: &str = "unsupported_grant_type";
    /// 503: too many device logins are waiting for an operator.
    pub const DEVICE_LOGINS_FULL: &str = "device_logins_full";
}

/// `POST /v1/peers`: register a WireGuard public key and get addresses for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterPeer {
    /// The peer's WireGuard public key, base64 (32 bytes, not all zero).
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^(?!A{43}=)[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"))]
    pub pubkey: Key,
    /// Also allocate a public IPv4 /32 (counts against `max_ipv4`).
    #[serde(default)]
    pub ipv4: bool,
    /// Free-form label shown in listings: 1 to 128 printable characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\ufeff]+$"
        )
    )]
    pub name: Option<String>,
    /// Container id this peer serves, for lookup after an agent restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\ufeff]+$"
        )
    )]
    pub container: Option<String>,
}

/// `POST /v1/peers` as agents send it: the registration, the X-Wing ciphertext for a
/// post-quantum preshared key, and the machine fingerprint. A relay that predates
/// these fields ignores them; a [`RegisterPeer`] alone is still a valid body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterRequest {
    #[serde(flatten)]
    pub peer: RegisterPeer,
    /// Base64 X-Wing ciphertext encapsulated to the relay's key (`GET /v1/pq`); the
    /// preshared key is derived from it on both sides (see [`pq`]) and never sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9+/]{1493}[AQgw]==$"))]
    pub pq_ciphertext: Option<String>,
    /// Machine fingerprint: base64 HMAC-SHA256 of the host's identity under the
    /// token's machine key (`GET /v1/machine`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128))]
    pub machine: Option<String>,
}

/// `POST /v1/peers` response: the allocation, and the post-quantum grant when the
/// registration carried a ciphertext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Registered {
    #[serde(flatten)]
    pub allocation: Allocation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pq: Option<PqGrant>,
}

/// The preshared key the relay now uses for the peer is the one derived with this
/// counter; encapsulate again within `rotate_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PqGrant {
    /// Rotation counter bound into the preshared key (1 at the first encapsulation).
    pub counter: u64,
    /// How often the relay asks peers to encapsulate again, seconds.
    pub rotate_secs: u64,
}

/// `GET /v1/pq` response (no authentication): what a client needs to encapsulate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PqInfo {
    /// The relay's X-Wing public key, base64 (1216 bytes).
    pub xwing_public_key: String,
    /// The relay's WireGuard public key, base64 (bound into the preshared key).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub relay_public_key: Key,
    /// Registrations without a ciphertext are refused.
    pub required: bool,
    /// How often peers should encapsulate again, seconds.
    pub rotate_secs: u64,
}

/// `GET /v1/machine` response: the calling token's machine key and binding.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MachineKey {
    /// Base64 key (32 bytes) to HMAC the host's identity with; differs per token
    /// and per relay, so a fingerprint says nothing about the host.
    pub machine_key: String,
    /// Registrations must come from one machine.
    pub bind_machine: bool,
    /// A machine is bound already.
    pub bound: bool,
}

/// Keeps the key out of `{:?}` logs.
impl fmt::Debug for MachineKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MachineKey")
            .field("bind_machine", &self.bind_machine)
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/admin/tokens/unbind-machine` request: forget the machine a token is
/// bound to, so the next registration binds it anew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnbindMachine {
    pub id: String,
}

/// What a registration grants: everything the agent needs to configure its side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Allocation {
    /// The registered public key, base64.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub pubkey: Key,
    /// The peer's routable IPv6 address, `addr/128`.
    #[serde(with = "host::ipv6")]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ipv6: Ipv6Addr,
    /// The peer's public IPv4 address, `addr/32`, when one was requested.
    #[serde(default, with = "host::optional_ipv4")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub ipv4: Option<Ipv4Addr>,
    /// The relay's WireGuard public key, base64.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub relay_public_key: Key,
    /// Where to send WireGuard packets, `host:port`.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub relay_endpoint: Endpoint,
    /// Persistent keepalive the peer should use, seconds.
    pub keepalive: u16,
    /// Tunnel MTU the peer should use.
    pub mtu: u16,
    /// True when this request created the peer, false when it already existed.
    pub created: bool,
}

/// One registered peer as listed by `GET /v1/peers`.
///
/// Carries the allocation fields (so an agent can rebuild its configuration from a
/// listing alone) plus bookkeeping and live counters from the data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerView {
    /// The peer's public key, base64.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub pubkey: Key,
    /// `addr/128`.
    #[serde(with = "host::ipv6")]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub ipv6: Ipv6Addr,
    /// `addr/32`, if the peer has a public IPv4 address.
    #[serde(default, with = "host::optional_ipv4")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub ipv4: Option<Ipv4Addr>,
    /// The relay's WireGuard public key, base64.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub relay_public_key: Key,
    /// `host:port`.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub relay_endpoint: Endpoint,
    /// Seconds.
    pub keepalive: u16,
    pub mtu: u16,
    pub name: Option<String>,
    pub container: Option<String>,
    /// When the peer was registered, unix seconds.
    pub created: u64,
    /// Last completed WireGuard handshake, unix seconds.
    pub last_handshake: Option<u64>,
    /// Bytes received from the peer through the tunnel.
    pub rx_bytes: u64,
    /// Bytes sent to the peer through the tunnel.
    pub tx_bytes: u64,
}

/// `GET /v1/peers/by-container/{id}` response: the peer as [`PeerView`] gives it,
/// with its addresses bare (`2001:db8::5`; an empty string where there is none) and
/// its state in plain form, so a script or health check needs no parsing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ContainerPeer {
    /// The peer's public key, base64.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub pubkey: Key,
    /// The peer's IPv6 address, bare (`2001:db8::5`).
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "2001:db8::5"))]
    pub ipv6: Ipv6Addr,
    /// The peer's IPv4 address, bare; an empty string when it has none.
    #[serde(default, with = "host::bare_optional_ipv4")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = ""))]
    pub ipv4: Option<Ipv4Addr>,
    /// The relay's WireGuard public key, base64.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub relay_public_key: Key,
    /// `host:port`.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub relay_endpoint: Endpoint,
    /// Seconds.
    pub keepalive: u16,
    pub mtu: u16,
    pub name: Option<String>,
    pub container: Option<String>,
    /// When the peer was registered, unix seconds.
    pub created: u64,
    /// Last completed WireGuard handshake, unix seconds.
    pub last_handshake: Option<u64>,
    /// Bytes received from the peer through the tunnel.
    pub rx_bytes: u64,
    /// Bytes sent to the peer through the tunnel.
    pub tx_bytes: u64,
    /// A WireGuard handshake completed within the last 180 seconds.
    pub up: bool,
    /// The relay itself just reached the peer's address through its data path: an
    /// echo request sent from the relay's own address through the tunnel, and its
    /// reply seen. Cached for a few seconds.
    pub externally_reachable: bool,
}

/// `GET /v1/peers` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerList {
    pub peers: Vec<PeerView>,
}

/// `DELETE /v1/peers` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeletePeer {
    /// The peer's public key, base64.
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^(?!A{43}=)[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"))]
    pub pubkey: Key,
}

/// What a token may do; every authenticated route needs one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Scope {
    /// Read the token's own peers and status.
    #[serde(rename = "peers:read")]
    PeersRead,
    /// Register and remove the token's own peers (and read its machine key).
    #[serde(rename = "peers:add")]
    PeersAdd,
    /// Manage tokens and approve device logins; see every peer. Implies
    /// `peers:read` and `peers:add`.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::PeersRead, Scope::PeersAdd, Scope::Admin];

    /// The name on the wire, as in OAuth scope strings.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::PeersRead => "peers:read",
            Scope::PeersAdd => "peers:add",
            Scope::Admin => "admin",
        }
    }

    /// `scopes` sorted and without repeats, so equal sets compare equal.
    pub fn normalize(mut scopes: Vec<Scope>) -> Vec<Scope> {
        scopes.sort();
        scopes.dedup();
        scopes
    }

    /// The space-separated form of `scopes` (RFC 6749 section 3.3).
    pub fn join(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `POST /v1/admin/tokens` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateToken {
    /// Human-readable label for the token's owner: 1 to 128 printable characters.
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\ufeff]+$"
        )
    )]
    pub name: String,
    /// Most peers this token may register at once.
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    #[serde(deserialize_with = "whole_number::u32")]
    pub max_peers: u32,
    /// Most of those peers that may hold a public IPv4 address.
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    #[serde(deserialize_with = "whole_number::u32")]
    pub max_ipv4: u32,
    /// Per-peer bandwidth cap in Mbit/s; none means unlimited.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole_number::option_u32"
    )]
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub bandwidth_mbps: Option<u32>,
    /// Peers of this token cannot reach each other through the relay.
    #[serde(default)]
    pub isolate_peers: bool,
    /// The first registration binds the token to its machine (the default); false
    /// for CI runners and other hosts that are new machines each time.
    #[serde(default = "yes")]
    pub bind_machine: bool,
    /// What the token may do, at least one; left out: `peers:read` and `peers:add`,
    /// what an agent needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub scopes: Option<Vec<Scope>>,
}

fn yes() -> bool {
    true
}

/// `POST /v1/admin/tokens` response. The secret is shown only this once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    /// Public identifier, used to revoke the token.
    pub id: String,
    /// The bearer secret, starting with `sct_live_`.
    pub token: String,
}

/// Keeps the secret out of logs that print the response with `{:?}`.
impl fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedToken")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// `PATCH /v1/admin/tokens` request: the fields given change, the rest stay. Lower
/// limits than a token uses keep its peers but refuse new ones over the limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateToken {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "openapi",
        schema(
            min_length = 1,
            max_length = 128,
            pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u200b-\\u200f\\u202a-\\u202e\\u2060-\\u2064\\u2066-\\u2069\\ufeff]+$"
        )
    )]
    pub name: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole_number::option_u32"
    )]
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub max_peers: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole_number::option_u32"
    )]
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub max_ipv4: Option<u32>,
    /// Per-peer cap in Mbit/s; 0 removes the cap. Applies to live peers at once.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole_number::option_u32"
    )]
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub bandwidth_mbps: Option<u32>,
    /// Applies to live peers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolate_peers: Option<bool>,
    /// Replaces the token's scopes (at least one); takes effect at its next request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_items = 1))]
    pub scopes: Option<Vec<Scope>>,
}

/// `DELETE /v1/admin/tokens` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RevokeToken {
    pub id: String,
}

/// `GET /v1/health` response (no authentication).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// `ok`, or `draining` while the relay shuts down.
    pub status: String,
    /// The relay's version.
    pub version: String,
    /// Registered peers across all tokens.
    pub peers: usize,
    pub uptime_secs: u64,
}

/// A token's limits, as in `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Limits {
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub max_peers: u32,
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub max_ipv4: u32,
    /// Per-peer cap in Mbit/s; none means unlimited.
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub bandwidth_mbps: Option<u32>,
}

/// What a token currently uses, as in `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub peers: u32,
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub ipv4: u32,
}

/// `GET /v1/status` response: the calling token's limits and usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    pub token_id: String,
    pub name: String,
    pub limits: Limits,
    pub usage: Usage,
}

/// One token as `GET /v1/admin/tokens` lists it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// May manage tokens and sees every peer (it has the `admin` scope).
    pub admin: bool,
    /// What the token may do, sorted.
    pub scopes: Vec<Scope>,
    pub limits: Limits,
    pub usage: Usage,
    /// Peers of this token cannot reach each other through the relay.
    pub isolate_peers: bool,
    /// Registrations must all come from the machine of the first one.
    pub bind_machine: bool,
    /// Whether that first registration happened (the token is bound now).
    pub bound: bool,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds of the last authenticated request since the relay started;
    /// none if the token has not been used since then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<u64>,
}

/// `GET /v1/admin/tokens` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenList {
    pub tokens: Vec<TokenInfo>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    /// Stable snake_case code (see [`codes`]).
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.error)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn to_value<T: Serialize>(v: &T) -> Value {
        serde_json::to_value(v).unwrap()
    }

    const K: Key = Key([1; 32]);
    const R: Key = Key([2; 32]);
    const K_B64: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    const R_B64: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

    #[test]
    fn container_peer_has_bare_addresses_and_plain_state() {
        let view = ContainerPeer {
            pubkey: K,
            ipv6: "2001:db8::5".parse().unwrap(),
            ipv4: None,
            relay_public_key: R,
            relay_endpoint: "relay.example:51820".parse().unwrap(),
            keepalive: 25,
            mtu: 1420,
            name: None,
            container: Some("abc".into()),
            created: 1,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            up: true,
            externally_reachable: false,
        };
        let v = to_value(&view);
        assert_eq!(v["ipv6"], "2001:db8::5");
        assert_eq!(v["ipv4"], "");
        assert_eq!(v["up"], true);
        assert_eq!(v["externally_reachable"], false);
        let back: ContainerPeer = serde_json::from_value(v).unwrap();
        assert_eq!(back, view);
        let with_v4 = ContainerPeer {
            ipv4: Some("192.0.2.7".parse().unwrap()),
            ..view
        };
        let v = to_value(&with_v4);
        assert_eq!(v["ipv4"], "192.0.2.7");
        assert_eq!(serde_json::from_value::<ContainerPeer>(v).unwrap(), with_v4);
    }

    fn allocation() -> Allocation {
        Allocation {
            pubkey: K,
            ipv6: "2001:db8::1".parse().unwrap(),
            ipv4: None,
            relay_public_key: R,
            relay_endpoint: "relay.example:51820".parse().unwrap(),
            keepalive: 25,
            mtu: 1420,
            created: true,
        }
    }

    #[test]
    fn register_peer_defaults_and_shape() {
        let minimal: RegisterPeer = serde_json::from_value(json!({ "pubkey": K_B64 })).unwrap();
        assert_eq!(
            minimal,
            RegisterPeer {
                pubkey: K,
                ipv4: false,
                name: None,
                container: None
            }
        );
        let full = RegisterPeer {
            pubkey: K,
            ipv4: true,
            name: Some("web".into()),
            container: Some("c1".into()),
        };
        assert_eq!(
            to_value(&full),
            json!({"pubkey": K_B64, "ipv4": true, "name": "web", "container": "c1"})
        );
        // An agent newer than the relay may add fields; they must not be fatal.
        let extra: RegisterPeer =
            serde_json::from_value(json!({"pubkey": K_B64, "future": 1})).unwrap();
        assert_eq!(extra.pubkey, K);
        assert!(serde_json::from_str::<RegisterPeer>(r#"{"ipv4":true}"#).is_err());
    }

    #[test]
    fn pq_and_machine_fields_are_optional_both_ways() {
        // An old agent's body is a valid request without the new fields.
        let old: RegisterRequest =
            serde_json::from_value(json!({"pubkey": K_B64, "ipv4": true})).unwrap();
        assert_eq!((old.pq_ciphertext, old.machine), (None, None));
        assert!(old.peer.ipv4);
        let new = RegisterRequest {
            peer: RegisterPeer {
                pubkey: K,
                ipv4: false,
                name: None,
                container: None,
            },
            pq_ciphertext: Some("Y3Q=".into()),
            machine: Some("bQ==".into()),
        };
        let v = to_value(&new);
        assert_eq!(
            v,
            json!({"pubkey": K_B64, "ipv4": false, "pq_ciphertext": "Y3Q=", "machine": "bQ=="})
        );
        // An old relay reads the same body as a plain registration.
        assert_eq!(serde_json::from_value::<RegisterPeer>(v).unwrap(), new.peer);

        let granted = Registered {
            allocation: allocation(),
            pq: Some(PqGrant {
                counter: 3,
                rotate_secs: 60,
            }),
        };
        let v = to_value(&granted);
        assert_eq!(v["pq"], json!({"counter": 3, "rotate_secs": 60}));
        assert_eq!(v["mtu"], 1420);
        // An old agent reads the allocation and ignores the grant.
        assert_eq!(
            serde_json::from_value::<Allocation>(v.clone()).unwrap(),
            allocation()
        );
        assert_eq!(serde_json::from_value::<Registered>(v).unwrap(), granted);
        let plain: Registered = serde_json::from_value(to_value(&allocation())).unwrap();
        assert_eq!(plain.pq, None);
    }

    #[test]
    fn a_body_with_a_bad_key_does_not_decode() {
        for bad in [json!(""), json!("AAAA"), json!("not base64!"), json!(5)] {
            let err = serde_json::from_value::<RegisterPeer>(json!({ "pubkey": bad }))
                .expect_err("a bad key must not decode");
            assert!(!err.to_string().is_empty());
            assert!(serde_json::from_value::<DeletePeer>(json!({ "pubkey": bad })).is_err());
        }
        let short = serde_json::from_value::<RegisterPeer>(json!({"pubkey": "AAAA"})).unwrap_err();
        assert!(short.to_string().contains("32 bytes"), "{short}");
    }

    #[test]
    fn allocation_shape() {
        let a = allocation();
        assert_eq!(
            to_value(&a),
            json!({
                "pubkey": K_B64, "ipv6": "2001:db8::1/128", "ipv4": null,
                "relay_public_key": R_B64, "relay_endpoint": "relay.example:51820",
                "keepalive": 25, "mtu": 1420, "created": true
            })
        );
        let back: Allocation = serde_json::from_value(to_value(&a)).unwrap();
        assert_eq!(back, a);
        let with_v4 = Allocation {
            ipv4: Some(Ipv4Addr::new(192, 0, 2, 7)),
            relay_endpoint: "[2001:db8::9]:51820".parse().unwrap(),
            ..a
        };
        let v = to_value(&with_v4);
        assert_eq!(v["ipv4"], "192.0.2.7/32");
        assert_eq!(v["relay_endpoint"], "[2001:db8::9]:51820");
        assert_eq!(serde_json::from_value::<Allocation>(v).unwrap(), with_v4);
    }

    #[test]
    fn allocation_without_ipv4_field_decodes_as_none() {
        let mut v = to_value(&allocation());
        v.as_object_mut().unwrap().remove("ipv4");
        assert_eq!(serde_json::from_value::<Allocation>(v).unwrap().ipv4, None);
    }

    #[test]
    fn allocation_addresses_must_be_single_addresses_of_their_family() {
        let decode = |field: &str, value: Value| {
            let mut v = to_value(&allocation());
            v[field] = value;
            serde_json::from_value::<Allocation>(v)
        };
        assert_eq!(
            decode("ipv6", json!("2001:db8::5")).unwrap().ipv6,
            "2001:db8::5".parse::<Ipv6Addr>().unwrap()
        );
        for (field, bad) in [
            ("ipv6", json!("2001:db8::/64")),
            ("ipv6", json!("192.0.2.1/32")),
            ("ipv6", json!("nonsense")),
            ("ipv6", json!(null)),
            ("ipv4", json!("192.0.2.0/24")),
            ("ipv4", json!("2001:db8::1/128")),
            ("ipv4", json!(7)),
            ("relay_endpoint", json!("relay.example")),
            ("relay_public_key", json!("AAAA")),
        ] {
            let err = decode(field, bad.clone()).expect_err("must be refused");
            assert!(!err.to_string().is_empty(), "{field}: {bad}");
        }
        let err = decode("ipv6", json!("2001:db8::/64")).unwrap_err();
        assert!(err.to_string().contains("2001:db8::/64"), "{err}");
    }

    #[test]
    fn peer_list_shape() {
        let list = PeerList {
            peers: vec![PeerView {
                pubkey: K,
                ipv6: "2001:db8::1".parse().unwrap(),
                ipv4: Some("192.0.2.1".parse().unwrap()),
                relay_public_key: R,
                relay_endpoint: "h:1".parse().unwrap(),
                keepalive: 25,
                mtu: 1420,
                name: None,
                container: Some("c".into()),
                created: 1_700_000_000,
                last_handshake: Some(1_700_000_100),
                rx_bytes: 1,
                tx_bytes: 2,
            }],
        };
        assert_eq!(
            to_value(&list),
            json!({"peers": [{
                "pubkey": K_B64, "ipv6": "2001:db8::1/128", "ipv4": "192.0.2.1/32",
                "relay_public_key": R_B64, "relay_endpoint": "h:1", "keepalive": 25,
                "mtu": 1420, "name": null, "container": "c", "created": 1_700_000_000u64,
                "last_handshake": 1_700_000_100u64, "rx_bytes": 1, "tx_bytes": 2
            }]})
        );
        let back: PeerList = serde_json::from_value(to_value(&list)).unwrap();
        assert_eq!(back, list);
    }

    #[test]
    fn token_shapes() {
        let create: CreateToken =
            serde_json::from_str(r#"{"name":"n","max_peers":5,"max_ipv4":1}"#).unwrap();
        assert_eq!(create.bandwidth_mbps, None);
        assert!(!create.isolate_peers);
        assert!(
            create.bind_machine,
            "tokens are bound to a machine unless asked"
        );
        assert_eq!(
            to_value(&CreateToken {
                bandwidth_mbps: Some(100),
                isolate_peers: true,
                ..create
            }),
            json!({"name": "n", "max_peers": 5, "max_ipv4": 1, "bandwidth_mbps": 100, "isolate_peers": true, "bind_machine": true})
        );
        let scoped: CreateToken = serde_json::from_str(
            r#"{"name":"n","max_peers":5,"max_ipv4":1,"scopes":["peers:read","admin"]}"#,
        )
        .unwrap();
        assert_eq!(scoped.scopes, Some(vec![Scope::PeersRead, Scope::Admin]));
        assert!(serde_json::from_str::<CreateToken>(
            r#"{"name":"n","max_peers":5,"max_ipv4":1,"scopes":["root"]}"#
        )
        .is_err());
        assert_eq!(
            Scope::join(&Scope::normalize(vec![
                Scope::Admin,
                Scope::PeersAdd,
                Scope::Admin
            ])),
            "peers:add admin"
        );
        let created = CreatedToken {
            id: "i".into(),
            token: format!("{TOKEN_PREFIX}secret"),
        };
        assert_eq!(
            to_value(&created),
            json!({"id": "i", "token": "sct_live_secret"})
        );
        assert!(!format!("{created:?}").contains("secret"));
        assert_eq!(
            to_value(&RevokeToken { id: "i".into() }),
            json!({"id": "i"})
        );
        assert_eq!(
            to_value(&DeletePeer { pubkey: K }),
            json!({ "pubkey": K_B64 })
        );
    }

    #[test]
    fn health_status_and_error_shapes() {
        assert_eq!(
            to_value(&Health {
                status: "ok".into(),
                version: "0.1.0".into(),
                peers: 3,
                uptime_secs: 9
            }),
            json!({"status": "ok", "version": "0.1.0", "peers": 3, "uptime_secs": 9})
        );
        assert_eq!(
            to_value(&Status {
                token_id: "i".into(),
                name: "n".into(),
                limits: Limits {
                    max_peers: 5,
                    max_ipv4: 1,
                    bandwidth_mbps: None
                },
                usage: Usage { peers: 2, ipv4: 0 },
            }),
            json!({
                "token_id": "i", "name": "n",
                "limits": {"max_peers": 5, "max_ipv4": 1, "bandwidth_mbps": null},
                "usage": {"peers": 2, "ipv4": 0}
            })
        );
        let err = ApiError {
            error: codes::QUOTA_EXCEEDED.into(),
            message: "max_peers quota of 5 reached".into(),
        };
        assert_eq!(
            to_value(&err),
            json!({"error": "quota_exceeded", "message": "max_peers quota of 5 reached"})
        );
        assert_eq!(
            err.to_string(),
            "max_peers quota of 5 reached (quota_exceeded)"
        );
    }
}
