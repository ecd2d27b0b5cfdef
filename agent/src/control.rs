//! The running agent's local control socket, `control.sock` in the state
//! directory: mode 0600 and answering only root (or the agent's own user), so
//! only the host's administrator changes what containers get.
//!
//! One request per connection, one line each way:
//! `shape CONTAINER latency=80ms jitter=0ms loss=0.5%` (or `... none`) is answered
//! `ok ID latency=...` or `error REASON`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::conditions;
use crate::shared::Shared;

/// The socket's name in the state directory.
pub const SOCKET: &str = "control.sock";

/// The longest request line read; anything longer is refused.
const MAX_LINE: u64 = 1024;
/// A client that says nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// Listens on `control.sock` in `state_dir` until the task is aborted.
pub fn serve(state_dir: &Path, shared: Arc<Shared>) -> Result<JoinHandle<()>> {
    let path = socket_path(state_dir);
    // A socket left by an agent that did not exit cleanly; nothing else is ours to remove.
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove the old {}", path.display()))?;
        }
    }
    // The state directory is private (0700), so nobody else reaches the socket in
    // the moment before its own mode is set.
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    tracing::info!(path = %path.display(), "control socket listening");
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &shared).await {
                            tracing::debug!(error = %e, "control request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn answer(stream: UnixStream, shared: &Shared) -> Result<()> {
    // SAFETY: geteuid only reads the process's effective user id.
    let own = unsafe { libc::geteuid() };
    let allowed = stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == own);
    let (read, mut write) = stream.into_split();
    if !allowed {
        write
            .write_all(b"error only root may use the control socket\n")
            .await?;
        return Ok(());
    }
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE));
    tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("no request in time")??;
    let reply = match line.strip_suffix('\n') {
        Some(request) => handle(request, shared),
        None => Err("a request is one line of at most 1024 bytes".to_string()),
    };
    let text = match reply {
        Ok(ok) => format!("ok {ok}\n"),
        Err(e) => format!("error {}\n", e.replace('\n', " ")),
    };
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

fn handle(request: &str, shared: &Shared) -> Result<String, String> {
    let mut words = request.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("shape"), Some(container), Some(spec)) if !container.is_empty() => {
            let wanted = conditions::parse_spec(spec)?;
            let id = shared.shape(container, wanted)?;
            let text = conditions::describe(wanted.as_ref());
            tracing::info!(container = %crate::shared::short(&id), conditions = %text, "emulated network conditions changed");
            Ok(format!("{id} {text}"))
        }
        _ => Err("unknown request: expected shape CONTAINER CONDITIONS".into()),
    }
}

/// Sends one request to the agent whose state directory is `state_dir`; the text
/// after `ok`, or the agent's error.
pub async fn request(state_dir: &Path, line: &str) -> Result<String> {
    let path = socket_path(state_dir);
    let mut stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `sidecar-agent run` running with this --state-dir, and are you root?)",
            path.display()
        )
    })?;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(stream.take(MAX_LINE * 4)).read_line(&mut reply),
    )
    .await
    .context("the agent did not answer in time")??;
    let reply = reply.trim_end();
    if let Some(ok) = reply.strip_prefix("ok ") {
        return Ok(ok.to_string());
    }
    match reply.strip_prefix("error ") {
        Some(e) => bail!("{e}"),
        None => bail!("the agent answered {reply:?}"),
    }
}
