//! `GET /install`: a POSIX sh installer for the agent with this relay's URL, its
//! certificate pin and the agent binary's SHA-256 filled in, and
//! `GET /install/sidecar-agent`: that binary. Both need no token: the script holds
//! no secret (the token comes from the host that runs it), and the binary is what
//! anyone can build from the source.
//!
//! The relay serves the `sidecar-agent` next to its own executable (the one it was
//! built and installed with); without one, both routes answer 404 saying so.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};

use crate::api::ErrorResponse;

/// The installer template; `@NAME@` marks what [`Installer::new`] fills in.
const TEMPLATE: &str = include_str!("../../config/install.sh");
/// The systemd unit the installer writes.
const AGENT_UNIT: &str = include_str!("../../config/sidecar-agent.service");

/// What `/install` serves, built once at start.
#[derive(Debug)]
pub enum Installer {
    Ready {
        script: String,
        agent: Bytes,
    },
    /// Why there is nothing to serve, for the 404.
    Unavailable(String),
}

/// The `sidecar-agent` beside the running relay executable, if the relay can find its
/// own executable.
pub fn agent_next_to_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.join("sidecar-agent"))
}

impl Installer {
    /// Reads the agent from `agent_path` and fills in the template. A missing or
    /// unreadable binary, or a URL or pin that cannot be quoted safely, leaves the
    /// installer unavailable (the relay still starts: it is an optional service).
    pub fn new(relay_url: &str, pin: &str, agent_path: Option<&Path>) -> Installer {
        let Some(path) = agent_path else {
            return Installer::Unavailable(
                "this relay cannot locate its own executable, so it has no sidecar-agent to serve"
                    .into(),
            );
        };
        let agent = match std::fs::read(path) {
            Ok(bytes) if !bytes.is_empty() => bytes,
            Ok(_) => {
                return Installer::Unavailable(format!(
                    "{} is empty; install the sidecar-agent built with this relay there",
                    path.display()
                ))
            }
            Err(e) => {
                return Installer::Unavailable(format!(
                    "this relay has no agent binary to serve ({}: {e}); install the \
                     sidecar-agent built with this relay next to sidecar-relay",
                    path.display()
                ))
            }
        };
        match render(relay_url, pin, &sha256_hex(&agent)) {
            Ok(script) => Installer::Ready {
                script,
                agent: Bytes::from(agent),
            },
            Err(why) => Installer::Unavailable(why),
        }
    }
}

/// The installer with `relay_url`, `pin` and `sha256` filled in. The values land in
/// single quotes, so they must not hold a quote (or anything else a URL and a
/// `sha256//BASE64` pin never hold).
fn render(relay_url: &str, pin: &str, sha256: &str) -> Result<String, String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/:.[]-_+=%".contains(&b))
    };
    if !plain(relay_url) {
        return Err(format!(
            "the relay URL {relay_url:?} cannot be put in the installer"
        ));
    }
    if !plain(pin) {
        return Err(format!("the pin {pin:?} cannot be put in the installer"));
    }
    Ok(TEMPLATE
        .replace("@RELAY_URL@", relay_url)
        .replace("@RELAY_PIN@", pin)
        .replace("@AGENT_SHA256@", sha256)
        .replace("@AGENT_UNIT@", AGENT_UNIT.trim_end()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `/install` and `/install/sidecar-agent`, answered from the [`Installer`] the
/// relay puts in an `Extension`; without one, 404.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/install", get(script))
        .route("/install/sidecar-agent", get(agent))
}

type Shared = Option<Extension<Arc<Installer>>>;

fn unavailable(installer: &Shared) -> Response {
    let message = match installer.as_deref().map(Arc::as_ref) {
        Some(Installer::Unavailable(why)) => why.clone(),
        _ => "this relay serves no installer".to_owned(),
    };
    ErrorResponse::new(StatusCode::NOT_FOUND, "no_installer", message).into_response()
}

async fn script(installer: Shared) -> Response {
    match installer.as_deref().map(Arc::as_ref) {
        Some(Installer::Ready { script, .. }) => (
            [(header::CONTENT_TYPE, "text/x-shellscript; charset=utf-8")],
            script.clone(),
        )
            .into_response(),
        _ => unavailable(&installer),
    }
}

async fn agent(installer: Shared) -> Response {
    match installer.as_deref().map(Arc::as_ref) {
        Some(Installer::Ready { agent, .. }) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"sidecar-agent\"",
                ),
            ],
            agent.clone(),
        )
            .into_response(),
        _ => unavailable(&installer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn script_carries_url_pin_checksum_and_unit() {
        let dir = std::env::temp_dir().join(format!("sidecar-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("sidecar-agent");
        std::fs::write(&bin, b"abc").unwrap();
        let installer = Installer::new("https://[2001:db8::1]:8443", PIN, Some(&bin));
        std::fs::remove_dir_all(&dir).unwrap();
        let Installer::Ready { script, agent } = installer else {
            panic!("installer unavailable: {installer:?}")
        };
        assert_eq!(&agent[..], b"abc");
        assert!(script.contains("RELAY_URL='https://[2001:db8::1]:8443'"));
        assert!(script.contains(&format!("RELAY_PIN='{PIN}'")));
        // SHA-256 of "abc" (FIPS 180-2, appendix B.1).
        assert!(script.contains(
            "AGENT_SHA256='ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'"
        ));
        assert!(script.contains("ExecStart=/usr/local/bin/sidecar-agent run"));
        assert!(!script.contains("@RELAY") && !script.contains("@AGENT_"));
    }

    #[test]
    fn missing_binary_is_unavailable_with_its_path() {
        let path = Path::new("/nonexistent/sidecar-agent");
        match Installer::new("https://relay.example.net:8443", PIN, Some(path)) {
            Installer::Unavailable(why) => assert!(why.contains("/nonexistent/sidecar-agent")),
            other => panic!("expected unavailable, got {other:?}"),
        }
    }

    #[test]
    fn a_quote_in_the_url_is_refused() {
        assert!(render("https://x'; rm -rf /; '", PIN, "00").is_err());
        assert!(render("https://relay.example.net:8443", "sha256//a'b", "00").is_err());
    }
}
