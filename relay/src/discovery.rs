//! The discovery documents of this relay, filled in with its own URL and pin: the OAuth
//! metadata (RFC 8414, RFC 9728), the agent installer's contract and an A2A agent card.
//!
//! The onboarding contract restates what config/install.sh does; the relay's tests run
//! the installer and compare its messages with the errors listed here.

use axum::http::HeaderValue;
use sidecar_proto::device::DEVICE_CODE_GRANT;
use sidecar_proto::discovery::{
    AgentCapabilities, AgentCard, AgentInterface, AgentProvider, AgentSkill,
    AuthorizationServerMetadata, Onboarding, OnboardingCheck, OnboardingError, OnboardingFile,
    OnboardingRelay, OnboardingStep, OnboardingVariable, ProtectedResourceMetadata,
};
use sidecar_proto::Scope;

pub const PROTECTED_RESOURCE_PATH: &str = "/.well-known/oauth-protected-resource";
pub const AUTHORIZATION_SERVER_PATH: &str = "/.well-known/oauth-authorization-server";
pub const ONBOARDING_PATH: &str = "/.well-known/agent-onboarding.json";
pub const AGENT_CARD_PATH: &str = "/.well-known/agent-card.json";

/// Where this relay is reached, as clients must write it.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// `https://host:port`, no trailing slash.
    url: String,
    pin: String,
    version: &'static str,
    challenge: HeaderValue,
}

impl Discovery {
    /// `url` is the relay's base URL (`https://host:port`), `pin` its `sha256//` pin.
    /// Fails when `url` cannot be put in a header (a quote or a control character).
    pub fn new(url: &str, pin: &str, version: &'static str) -> Result<Discovery, String> {
        let url = url.trim_end_matches('/').to_owned();
        if url.contains('"') || url.contains('\\') {
            return Err(format!(
                "the relay URL {url:?} cannot be quoted in a header"
            ));
        }
        let challenge = HeaderValue::from_str(&format!(
            r#"Bearer realm="sidecar", resource_metadata="{url}{PROTECTED_RESOURCE_PATH}""#
        ))
        .map_err(|_| format!("the relay URL {url:?} cannot be put in a header"))?;
        Ok(Discovery {
            url,
            pin: pin.to_owned(),
            version,
            challenge,
        })
    }

    /// `WWW-Authenticate` for every 401: where the resource metadata is (RFC 9728 §5.1).
    pub fn challenge(&self) -> &HeaderValue {
        &self.challenge
    }

    fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    fn scopes() -> Vec<String> {
        Scope::ALL.iter().map(|s| s.as_str().to_owned()).collect()
    }

    pub fn authorization_server(&self) -> AuthorizationServerMetadata {
        AuthorizationServerMetadata {
            issuer: self.url.clone(),
            device_authorization_endpoint: self.at("/v1/device/authorize"),
            token_endpoint: self.at("/v1/device/token"),
            grant_types_supported: vec![DEVICE_CODE_GRANT.to_owned()],
            response_types_supported: Vec::new(),
            token_endpoint_auth_methods_supported: vec!["none".to_owned()],
            scopes_supported: Self::scopes(),
            service_documentation: self.at("/api/openapi.json"),
        }
    }

    pub fn protected_resource(&self) -> ProtectedResourceMetadata {
        ProtectedResourceMetadata {
            resource: self.url.clone(),
            authorization_servers: vec![self.url.clone()],
            scopes_supported: Self::scopes(),
            bearer_methods_supported: vec!["header".to_owned()],
            resource_name: "Sidecar relay control API".to_owned(),
            resource_documentation: self.at("/api/openapi.json"),
        }
    }

    pub fn onboarding(&self) -> Onboarding {
        let fetch = format!(
            "curl -fsSL -k --pinnedpubkey '{}' {}",
            self.pin,
            self.at("/install")
        );
        let check = |id: &str, description: &str, command: &str, error: &str| OnboardingCheck {
            id: id.to_owned(),
            description: description.to_owned(),
            command: command.to_owned(),
            error: error.to_owned(),
        };
        let file = |path: &str, mode: &str| OnboardingFile {
            path: path.to_owned(),
            mode: mode.to_owned(),
        };
        let step = |id: &str, description: &str, writes: Vec<OnboardingFile>| OnboardingStep {
            id: id.to_owned(),
            description: description.to_owned(),
            writes,
        };
        let error = |code: &str, message: &str, fix: &str| OnboardingError {
            code: code.to_owned(),
            message: message.to_owned(),
            fix: fix.to_owned(),
        };
        Onboarding {
            relay: OnboardingRelay {
                url: self.url.clone(),
                pin: self.pin.clone(),
                version: self.version.to_owned(),
            },
            install_command: format!("{fetch} | sh"),
            print_only_command: format!("{fetch} | sh -s -- --print-only"),
            environment: vec![OnboardingVariable {
                name: "SIDECAR_TOKEN".to_owned(),
                required: false,
                description: "An agent token from this relay (sct_live_...), with the \
                              peers:add and peers:read scopes; written 0600, never logged. \
                              Unset, the installer runs the device login instead"
                    .to_owned(),
            }],
            preflight: vec![
                check("root", "Runs as root", r#"[ "$(id -u)" = 0 ]"#, "not_root"),
                check(
                    "docker",
                    "Docker 24 or newer, and its daemon answers",
                    r#"[ "$(docker version --format '{{.Server.Version}}' | cut -d. -f1)" -ge 24 ]"#,
                    "docker_missing",
                ),
                check(
                    "tun",
                    "/dev/net/tun exists",
                    "[ -c /dev/net/tun ]",
                    "no_tun",
                ),
                check(
                    "systemd",
                    "systemctl is there to run the agent's unit",
                    "command -v systemctl",
                    "no_systemd",
                ),
                check(
                    "curl",
                    "curl downloads the agent",
                    "command -v curl",
                    "no_curl",
                ),
            ],
            steps: vec![
                step(
                    "check_token",
                    "SIDECAR_TOKEN, when set, is checked before anything changes: it must \
                     start with sct_live_ and hold only the characters a token has",
                    Vec::new(),
                ),
                step(
                    "download_agent",
                    "The agent binary is downloaded from the relay over the pinned \
                     connection and its SHA-256 compared with the one in the installer; \
                     it is put in place only after the device login, if one runs",
                    Vec::new(),
                ),
                step(
                    "device_login",
                    "Only without SIDECAR_TOKEN: the downloaded agent runs `sidecar-agent \
                     login` against this relay, printing a user code and the URL where an \
                     admin approves it, and polls until the relay issues a token; denied \
                     or expired, the installer stops before installing the agent or any \
                     token",
                    Vec::new(),
                ),
                step(
                    "install_agent",
                    "The checked agent replaces any installed one (rename)",
                    vec![file("/usr/local/bin/sidecar-agent", "0755")],
                ),
                step(
                    "write_token",
                    "The token and the agent's settings are written whole (temporary \
                     file, then rename)",
                    vec![
                        file("/etc/sidecar/agent.token", "0600"),
                        file("/etc/sidecar/agent.env", "0600"),
                    ],
                ),
                step(
                    "install_unit",
                    "The hardened systemd unit is installed, enabled and started",
                    vec![file("/etc/systemd/system/sidecar-agent.service", "0644")],
                ),
            ],
            rollback: vec![
                "systemctl disable --now sidecar-agent.service".to_owned(),
                "rm -f /etc/systemd/system/sidecar-agent.service /usr/local/bin/sidecar-agent"
                    .to_owned(),
                "systemctl daemon-reload".to_owned(),
                "rm -rf /etc/sidecar".to_owned(),
            ],
            errors: vec![
                error("usage", "unknown option", "Run the installer with --help"),
                error(
                    "usage",
                    "--root needs a directory",
                    "Give --root a directory",
                ),
                error(
                    "token_invalid",
                    "SIDECAR_TOKEN does not start with sct_live_",
                    "Use the token the relay printed, not its id or the pin",
                ),
                error(
                    "token_invalid",
                    "SIDECAR_TOKEN holds characters no Sidecar token has",
                    "Copy the token again, without quotes or spaces",
                ),
                error(
                    "not_root",
                    "run as root",
                    "Run the installer with sudo, or as root",
                ),
                error(
                    "docker_missing",
                    "docker is not installed",
                    "Install Docker 24 or newer",
                ),
                error(
                    "docker_missing",
                    "cannot reach the Docker daemon",
                    "Start the Docker daemon (systemctl start docker)",
                ),
                error(
                    "docker_missing",
                    "cannot read the Docker version",
                    "Check that `docker version` prints the server's version",
                ),
                error(
                    "docker_old",
                    "is too old: 24 or newer is needed",
                    "Upgrade Docker",
                ),
                error(
                    "no_tun",
                    "/dev/net/tun is missing",
                    "modprobe tun, or give the host a TUN device",
                ),
                error(
                    "no_systemd",
                    "systemctl is missing",
                    "Run the agent by hand or as a container (see the README)",
                ),
                error("no_curl", "curl is missing", "Install curl"),
                error(
                    "no_checksum_tool",
                    "neither sha256sum nor openssl is available",
                    "Install coreutils or openssl",
                ),
                error(
                    "download_failed",
                    "cannot download the agent",
                    "Check that this host reaches the relay's URL; the pin must match",
                ),
                error(
                    "checksum_mismatch",
                    "the downloaded agent has SHA-256",
                    "Download the installer again: the relay was upgraded in between, or \
                     something on the path changed the download",
                ),
                error(
                    "login_failed",
                    "the device login did not issue a token",
                    "Have an admin of the relay approve the printed code (at the URL shown, \
                     or with POST /v1/admin/device/CODE/approve) before it expires, then run \
                     the installer again; or create an agent token and set SIDECAR_TOKEN",
                ),
                error(
                    "login_failed",
                    "the device login wrote no agent token",
                    "Run the installer again; if it persists, the relay and the installer \
                     disagree on the token format (download the installer again)",
                ),
            ],
            resume: "Every step replaces its files whole and the installer starts again from \
                     the preflight checks, so after fixing the error that stopped it, run the \
                     same install command again."
                .to_owned(),
        }
    }

    pub fn agent_card(&self) -> AgentCard {
        let skill = |id: &str, name: &str, description: &str, examples: &[&str]| AgentSkill {
            id: id.to_owned(),
            name: name.to_owned(),
            description: description.to_owned(),
            tags: vec!["wireguard".to_owned(), "ipv6".to_owned()],
            examples: examples.iter().map(|e| (*e).to_owned()).collect(),
        };
        AgentCard {
            name: "Sidecar relay".to_owned(),
            description: format!(
                "Gives Docker containers their own routable IPv6 /128 (optionally an IPv4 /32) \
                 as WireGuard peers of this relay. TLS pin: {}",
                self.pin
            ),
            version: self.version.to_owned(),
            supported_interfaces: vec![AgentInterface {
                url: self.at("/api/openapi.json"),
                protocol_binding: "OpenAPI-3.1".to_owned(),
                protocol_version: "v1".to_owned(),
            }],
            provider: AgentProvider {
                organization: "Sidecar".to_owned(),
                url: self.url.clone(),
            },
            documentation_url: self.at("/api/openapi.json"),
            capabilities: AgentCapabilities {
                streaming: false,
                push_notifications: false,
            },
            default_input_modes: vec!["application/json".to_owned()],
            default_output_modes: vec!["application/json".to_owned()],
            skills: vec![
                skill(
                    "register_peer",
                    "Register a WireGuard peer",
                    "POST /v1/peers with a public key: the relay allocates an IPv6 /128 (and an \
                     IPv4 /32 on request) and forwards its traffic; DELETE /v1/peers gives it back",
                    &["POST /v1/peers {\"pubkey\": \"...\", \"ipv4\": true}"],
                ),
                skill(
                    "list_peers",
                    "List peers and their traffic",
                    "GET /v1/peers: addresses, last handshake and bytes of the token's peers",
                    &["GET /v1/peers"],
                ),
                skill(
                    "device_login",
                    "Get a token by device login",
                    "POST /v1/device/authorize, then poll POST /v1/device/token while the \
                     operator approves the code (RFC 8628)",
                    &["POST /v1/device/authorize {\"scope\": \"peers:add peers:read\"}"],
                ),
                skill(
                    "install_agent",
                    "Install the agent on a Docker host",
                    &format!(
                        "GET /install: a POSIX sh installer for this relay; its contract is at {}",
                        self.at(ONBOARDING_PATH)
                    ),
                    &["curl -fsSL -k --pinnedpubkey PIN https://HOST:PORT/install | sh"],
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTALLER: &str = include_str!("../../config/install.sh");

    fn messages_in_installer() -> Vec<&'static str> {
        INSTALLER
            .split("die \"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            // The definition of `die` itself.
            .filter(|m| !m.starts_with('$'))
            .collect()
    }

    #[test]
    fn every_error_the_installer_can_stop_with_is_in_the_contract() {
        let d = Discovery::new("https://192.0.2.2:8443", "sha256//x", "1").unwrap();
        let errors = d.onboarding().errors;
        let messages = messages_in_installer();
        assert!(messages.len() > 10, "{messages:?}");
        for message in &messages {
            assert!(
                errors.iter().any(|e| message.contains(&e.message)),
                "the installer stops with {message:?}, which the contract does not list"
            );
        }
        for e in &errors {
            assert!(
                messages.iter().any(|m| m.contains(&e.message)),
                "the contract lists {:?}, which the installer never prints",
                e.message
            );
        }
        for check in d.onboarding().preflight {
            assert!(
                errors.iter().any(|e| e.code == check.error),
                "{check:?} fails with an unlisted error"
            );
        }
    }

    #[test]
    fn the_challenge_names_the_resource_metadata_of_this_relay() {
        let d = Discovery::new("https://192.0.2.2:8443/", "sha256//x", "1").unwrap();
        assert_eq!(
            d.challenge().to_str().unwrap(),
            r#"Bearer realm="sidecar", resource_metadata="https://192.0.2.2:8443/.well-known/oauth-protected-resource""#
        );
        assert_eq!(d.protected_resource().resource, "https://192.0.2.2:8443");
    }

    #[test]
    fn a_url_that_cannot_be_quoted_is_refused() {
        assert!(Discovery::new("https://a\".example", "sha256//x", "1").is_err());
        assert!(Discovery::new("https://a\n.example", "sha256//x", "1").is_err());
    }
}
