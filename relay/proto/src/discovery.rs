//! The relay's discovery documents under `/.well-known/`: what an automated installer
//! or an OAuth client reads before it talks to the relay.

use serde::{Deserialize, Serialize};

/// `GET /.well-known/oauth-authorization-server` (RFC 8414): how a client gets a token.
/// The relay issues tokens only through the device authorization grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuthorizationServerMetadata {
    /// The relay's base URL, `https://host:port`.
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub issuer: String,
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub device_authorization_endpoint: String,
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub token_endpoint: String,
    /// Only the device code grant.
    pub grant_types_supported: Vec<String>,
    /// Empty: there is no authorization endpoint, so no response types.
    pub response_types_supported: Vec<String>,
    /// `none`: device clients are public clients without a secret.
    pub token_endpoint_auth_methods_supported: Vec<String>,
    pub scopes_supported: Vec<String>,
    /// The OpenAPI document of the relay's API.
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub service_documentation: String,
}

/// `GET /.well-known/oauth-protected-resource` (RFC 9728): the API these tokens open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProtectedResourceMetadata {
    /// The relay's base URL, `https://host:port`.
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub resource: String,
    /// Issuer identifiers of the servers that hand out tokens for it: the relay itself.
    pub authorization_servers: Vec<String>,
    pub scopes_supported: Vec<String>,
    /// `header`: `Authorization: Bearer`, never a query parameter or a form field.
    pub bearer_methods_supported: Vec<String>,
    pub resource_name: String,
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub resource_documentation: String,
}

/// `GET /.well-known/agent-onboarding.json`: installing the agent on a Docker host from
/// this relay, as data, so a program can run, check and undo each step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Onboarding {
    /// The relay this document describes.
    pub relay: OnboardingRelay,
    /// Runs every step below, after the preflight checks.
    pub install_command: String,
    /// Prints every file and unit the installer would write, and changes nothing.
    pub print_only_command: String,
    /// Environment the installer reads.
    pub environment: Vec<OnboardingVariable>,
    /// Checked before anything changes; each fails with one of `errors`.
    pub preflight: Vec<OnboardingCheck>,
    /// What the installer does, in order.
    pub steps: Vec<OnboardingStep>,
    /// Undoes the installation, in order.
    pub rollback: Vec<String>,
    /// What can go wrong, with the fix.
    pub errors: Vec<OnboardingError>,
    /// How to carry on after a failure.
    pub resume: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OnboardingRelay {
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub url: String,
    /// The relay's TLS public key pin, `sha256//` and base64, for curl's
    /// `--pinnedpubkey` and the agent's `--pin`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^sha256//[A-Za-z0-9+/]{43}=$"))]
    pub pin: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OnboardingVariable {
    pub name: String,
    pub required: bool,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OnboardingCheck {
    pub id: String,
    pub description: String,
    /// A POSIX sh command that exits 0 when the check passes.
    pub command: String,
    /// The `errors` code it fails with.
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OnboardingStep {
    pub id: String,
    pub description: String,
    /// Files the step writes, with their mode.
    pub writes: Vec<OnboardingFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OnboardingFile {
    pub path: String,
    /// Octal, `0600`.
    #[cfg_attr(feature = "openapi", schema(pattern = "^0[0-7]{3}$"))]
    pub mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OnboardingError {
    pub code: String,
    /// Part of the message the installer prints after `sidecar-install: error: `.
    pub message: String,
    pub fix: String,
}

/// `GET /.well-known/agent-card.json`: an A2A agent card naming what the relay offers and
/// where. The relay is not an A2A task server: its one interface is the HTTPS JSON API
/// its OpenAPI document describes, and each skill names the routes that perform it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(rename_all = "camelCase"))]
pub struct AgentCard {
    pub name: String,
    pub description: String,
    pub version: String,
    pub supported_interfaces: Vec<AgentInterface>,
    pub provider: AgentProvider,
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub documentation_url: String,
    pub capabilities: AgentCapabilities,
    pub default_input_modes: Vec<String>,
    pub default_output_modes: Vec<String>,
    pub skills: Vec<AgentSkill>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(rename_all = "camelCase"))]
pub struct AgentInterface {
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub url: String,
    /// `OpenAPI-3.1`: HTTPS with JSON bodies as the OpenAPI document at `url` describes,
    /// not one of A2A's own bindings.
    pub protocol_binding: String,
    /// The API's version, `v1`.
    pub protocol_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentProvider {
    pub organization: String,
    #[cfg_attr(feature = "openapi", schema(format = "uri"))]
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(rename_all = "camelCase"))]
pub struct AgentCapabilities {
    pub streaming: bool,
    pub push_notifications: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentSkill {
    pub id: String,
    pub name: String,
    /// What it does and the routes that do it.
    pub description: String,
    pub tags: Vec<String>,
    pub examples: Vec<String>,
}
