//! `sidecar-agent login`: gets an agent token by device login (RFC 8628). The agent
//! asks the relay for a login, prints the code an admin of the relay approves, polls
//! by the RFC's rules, and writes the token where `run` looks for it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use sidecar_proto::device::{
    DeviceAccessToken, DeviceAuthorization, DeviceAuthorizeRequest, DeviceTokenRequest,
    DEVICE_CODE_GRANT,
};

use crate::relay_client::{check_token, ClientError, RelayClient};

/// Where `login` writes the token and `run` reads it when given none.
pub const DEFAULT_TOKEN_FILE: &str = "/etc/sidecar/agent.token";
/// What an agent needs: register its containers and look them up.
pub const DEFAULT_SCOPE: &str = "peers:read peers:add";
/// Added to the interval at each `slow_down` (RFC 8628 section 3.5), and the wait
/// after a failure that may pass (the relay restarting, a lost connection).
const BACKOFF_STEP: Duration = Duration::from_secs(5);

pub struct Login {
    pub relay: String,
    pub pin: String,
    pub scope: String,
    pub token_file: PathBuf,
}

/// How a poll came out, as the loop acts on it.
#[derive(Debug, PartialEq, Eq)]
enum Poll {
    Token(String),
    Wait,
    SlowDown,
    /// Worth asking again after a pause (connection failures, 5xx, rate limits).
    Retry(String),
}

fn classify(result: Result<DeviceAccessToken, ClientError>) -> anyhow::Result<Poll> {
    let err = match result {
        Ok(t) => return Ok(Poll::Token(t.access_token)),
        Err(e) => e,
    };
    if let ClientError::Api { status, code, .. } = &err {
        match code.as_str() {
            "authorization_pending" => return Ok(Poll::Wait),
            "slow_down" => return Ok(Poll::SlowDown),
            "access_denied" => bail!("the relay's admin denied this login; no token was written"),
            "expired_token" => bail!(
                "the login expired before an admin approved it; run `sidecar-agent login` again"
            ),
            "invalid_grant" => bail!(
                "the relay no longer knows this login (it restarted, or the code was used); run `sidecar-agent login` again"
            ),
            _ if *status == 429 || *status >= 500 => return Ok(Poll::Retry(err.to_string())),
            _ => {}
        }
    }
    match err {
        ClientError::Connect { .. } | ClientError::Timeout(_) | ClientError::Http(_) => {
            Ok(Poll::Retry(err.to_string()))
        }
        other => Err(other).context("the relay refused the login"),
    }
}

/// Writes the token 0600 (by rename, so `run` never reads half a token), making its
/// directory 0700 when it does not exist yet.
fn save(path: &Path, token: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    crate::state::write_atomically(path, format!("{token}\n").as_bytes())
        .with_context(|| format!("cannot write the token to {}", path.display()))
}

/// Runs the whole login; returns once the token is written, or with the reason it
/// was not.
pub async fn run(login: &Login) -> anyhow::Result<()> {
    let client = RelayClient::without_token(&login.relay, &login.pin)?;
    let started: DeviceAuthorization = client
        .post(
            "/v1/device/authorize",
            &DeviceAuthorizeRequest {
                scope: Some(login.scope.clone()),
            },
        )
        .await
        .context("cannot start a device login")?;
    let deadline = Instant::now() + Duration::from_secs(started.expires_in);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "To approve this login, an admin of the relay opens")?;
        writeln!(out, "  {}", started.verification_uri_complete)?;
        writeln!(
            out,
            "or approves code {} with the admin API:",
            started.user_code
        )?;
        writeln!(
            out,
            "  curl --pinnedpubkey '{}' -X POST -H \"Authorization: Bearer $ADMIN\" {}/v1/admin/device/{}/approve",
            login.pin,
            client.url(),
            started.user_code
        )?;
        writeln!(out, "user code: {}", started.user_code)?;
        writeln!(
            out,
            "waiting for approval (expires in {} s)...",
            started.expires_in
        )?;
        out.flush()?;
    }
    let request = DeviceTokenRequest {
        grant_type: Some(DEVICE_CODE_GRANT.to_owned()),
        device_code: started.device_code,
    };
    let mut interval = Duration::from_secs(started.interval.max(1));
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            bail!("the login expired before an admin approved it; run `sidecar-agent login` again");
        }
        let polled = client.post("/v1/device/token", &request).await;
        match classify(polled)? {
            Poll::Token(token) => {
                check_token(&token)?;
                save(&login.token_file, &token)?;
                println!("approved; the token is in {}", login.token_file.display());
                return Ok(());
            }
            Poll::Wait => {}
            Poll::SlowDown => {
                interval += BACKOFF_STEP;
                tracing::info!(
                    interval_secs = interval.as_secs(),
                    "the relay asked to poll more slowly"
                );
            }
            Poll::Retry(why) => {
                tracing::warn!(error = %why, "polling the relay failed; trying again");
                tokio::time::sleep(BACKOFF_STEP).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn api(status: u16, code: &str) -> Result<DeviceAccessToken, ClientError> {
        Err(ClientError::Api {
            status,
            code: code.into(),
            message: "m".into(),
        })
    }

    #[test]
    fn poll_answers_map_to_what_the_loop_does() {
        assert_eq!(
            classify(api(428, "authorization_pending")).unwrap(),
            Poll::Wait
        );
        assert_eq!(classify(api(429, "slow_down")).unwrap(), Poll::SlowDown);
        assert!(matches!(
            classify(api(429, "rate_limited")).unwrap(),
            Poll::Retry(_)
        ));
        assert!(matches!(
            classify(api(503, "overloaded")).unwrap(),
            Poll::Retry(_)
        ));
        let denied = classify(api(400, "access_denied")).unwrap_err().to_string();
        assert!(denied.contains("denied"), "{denied}");
        let expired = classify(api(400, "expired_token")).unwrap_err().to_string();
        assert!(expired.contains("expired"), "{expired}");
        assert!(classify(api(404, "not_found")).is_err());
    }

    #[test]
    fn the_token_is_written_private_in_a_private_directory() {
        let dir = std::env::temp_dir().join(format!("sidecar-login-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("etc/sidecar/agent.token");
        save(&path, "sct_live_abc").unwrap();
        assert_eq!(
            crate::secrets::read_token_file(&path).unwrap(),
            "sct_live_abc"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        save(&path, "sct_live_def").unwrap();
        assert_eq!(
            crate::secrets::read_token_file(&path).unwrap(),
            "sct_live_def"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
