//! Device login (RFC 8628): a client without a token asks for one, an operator
//! approves it, and the client collects it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Scope;

/// The `grant_type` of a device token request (RFC 8628 section 3.4).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// An optional string field that, when present, must be a string: the form encoding
/// has no null, so JSON gets none either and both bodies mean the same.
fn present_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// `POST /v1/device/authorize` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceAuthorizeRequest {
    /// Space-separated scopes the token should have (`peers:read`, `peers:add`,
    /// `admin`); left out: `peers:read peers:add`, what an agent needs.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_string"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(
            example = "peers:add peers:read",
            nullable = false,
            pattern = "^((peers:read|peers:add|admin)( (peers:read|peers:add|admin))*)?$"
        )
    )]
    pub scope: Option<String>,
}

/// `POST /v1/device/authorize` response (RFC 8628 section 3.2).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceAuthorization {
    /// The secret the client polls with: 32 random bytes, base64url without padding.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_-]{43}$"))]
    pub device_code: String,
    /// What the operator types or sees: 8 letters, shown `XXXX-XXXX`.
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = "^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$",
            example = "BCDF-GHJK"
        )
    )]
    pub user_code: String,
    /// Where the operator approves the request.
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub verification_uri: String,
    /// `verification_uri` with the user code filled in.
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub verification_uri_complete: String,
    /// Seconds until the codes expire.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub expires_in: u64,
    /// Seconds the client waits between polls.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub interval: u64,
}

/// Keeps the device code out of logs that print the response with `{:?}`.
impl fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("device_code", &"<redacted>")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish()
    }
}

/// `POST /v1/device/token` request, as JSON or as the RFC's form-encoded body.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceTokenRequest {
    /// Must be `urn:ietf:params:oauth:grant-type:device_code` when given.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_string"
    )]
    #[cfg_attr(
        feature = "openapi",
        schema(
            nullable = false,
            pattern = "^urn:ietf:params:oauth:grant-type:device_code$"
        )
    )]
    pub grant_type: Option<String>,
    /// The `device_code` from `/v1/device/authorize`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_-]{43}$"))]
    pub device_code: String,
}

impl fmt::Debug for DeviceTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceTokenRequest")
            .field("grant_type", &self.grant_type)
            .field("device_code", &"<redacted>")
            .finish()
    }
}

/// `POST /v1/device/token` success: the new token, handed out exactly once.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceAccessToken {
    /// The bearer secret, starting with `sct_live_`.
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: String,
    /// The token's scopes, space-separated.
    pub scope: String,
}

impl fmt::Debug for DeviceAccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceAccessToken")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Where a device login stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeviceLoginState {
    /// Waiting for the operator.
    Pending,
    /// Approved; the token is made when the client collects it.
    Approved,
    Denied,
    Expired,
}

/// `GET /v1/admin/device/{user_code}` response: what the operator decides on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceLoginView {
    /// `XXXX-XXXX`.
    pub user_code: String,
    /// The scopes asked for, which an approved token gets exactly.
    pub scopes: Vec<Scope>,
    pub state: DeviceLoginState,
    /// Where the request came from (an IPv4 address or an IPv6 /64).
    pub source: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds.
    pub expires: u64,
}

/// `GET /v1/admin/device` response: every device login the relay holds, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeviceLoginList {
    pub logins: Vec<DeviceLoginView>,
}

/// `POST /v1/admin/device/{user_code}/approve` request; every field is optional,
/// and what is left out comes from `[device_login]` in relay.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApproveDevice {
    /// The token's name; left out: `device-XXXX-XXXX`.
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
        deserialize_with = "crate::whole_number::option_u32"
    )]
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub max_peers: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole_number::option_u32"
    )]
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub max_ipv4: Option<u32>,
    /// Per-peer cap in Mbit/s; 0: none.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::whole_number::option_u32"
    )]
    #[cfg_attr(feature = "openapi", schema(format = Int64, maximum = 4294967295_u64))]
    pub bandwidth_mbps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolate_peers: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_machine: Option<bool>,
}
