//! The userspace API socket, `/var/run/wireguard/NAME.sock`, served with tokio.
//!
//! Each connection runs in its own task and may carry several requests in a row
//! (`wg(8)` sends one and closes; wireguard-go's own clients loop). A request is read
//! completely, within [`UapiLimits`], before anything is applied. Whatever a client
//! sends, it can only get an error reply and a closed connection: it cannot make the
//! server panic or hold up other clients beyond [`UapiLimits::max_connections`].
//!
//! Replies end with `errno=N` and an empty line (see [`format_errno`] for the sign).
//! The `metrics=1` reply is the Prometheus text with blank lines and `errno=` lines
//! dropped, then `errno=0` and the empty line; after it the server closes the
//! connection. A client can therefore stop at the first empty line, or read to EOF;
//! [`query`] does the former.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, error, info, warn};

use super::protocol::{format_errno, format_get, parse_request, Operation, ProtocolError, Request};
use crate::wg::{DeviceControl, DeviceUpdate};

/// Where `wg(8)` looks for userspace interfaces.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// How long [`query`] waits for a whole reply.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// [`query`] refuses replies larger than this rather than exhaust memory.
const MAX_REPLY_BYTES: usize = 256 << 20;

/// Why a name cannot be an interface name (the kernel's `dev_valid_name` rules).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InterfaceNameError {
    #[error("interface name is empty")]
    Empty,
    #[error("interface name {0:?} is longer than 15 bytes")]
    TooLong(String),
    #[error("interface name {0:?} is not allowed")]
    Reserved(String),
    #[error("interface name {0:?} contains '/' or ':'")]
    Separator(String),
    #[error("interface name {0:?} contains whitespace or control characters")]
    Whitespace(String),
}

/// Checks that `name` is a valid Linux interface name: 1 to 15 bytes, not `.` or
/// `..`, without `/`, `:` or whitespace. The socket is named after the interface,
/// so this also keeps the socket path inside [`SOCKET_DIR`].
pub fn validate_interface_name(name: &str) -> Result<(), InterfaceNameError> {
    if name.is_empty() {
        return Err(InterfaceNameError::Empty);
    }
    // IFNAMSIZ is 16 including the terminating NUL.
    if name.len() > 15 {
        return Err(InterfaceNameError::TooLong(name.escape_debug().to_string()));
    }
    if name == "." || name == ".." {
        return Err(InterfaceNameError::Reserved(name.to_string()));
    }
    if name.contains(['/', ':']) {
        return Err(InterfaceNameError::Separator(name.to_string()));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InterfaceNameError::Whitespace(
            name.escape_debug().to_string(),
        ));
    }
    Ok(())
}

/// `/var/run/wireguard/NAME.sock`. This does not check the name: call
/// [`validate_interface_name`] first when it comes from a user ([`UapiServer::bind`]
/// does).
pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{interface}.sock"))
}

/// Bounds on what one client may cost the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UapiLimits {
    /// Longest line, without its newline. Real lines are under 100 bytes.
    pub max_line_bytes: usize,
    /// Most lines in one request. `wg setconf` sends about six per peer, so the
    /// default allows some 40 000 peers in one go.
    pub max_request_lines: usize,
    /// Largest request in bytes.
    pub max_request_bytes: usize,
    /// Longest silence allowed while waiting for the next line.
    pub idle_timeout: Duration,
    /// Longest time one request may take to arrive once its first line has.
    pub request_timeout: Duration,
    /// Longest time a reply may take to be written (a client that does not read).
    pub write_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for UapiLimits {
    fn default() -> UapiLimits {
        UapiLimits {
            max_line_bytes: 4096,
            max_request_lines: 256 * 1024,
            max_request_bytes: 32 << 20,
            idle_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// A bound userspace API socket, ready to [`run`](UapiServer::run).
///
/// The socket file is removed when the server stops: when `run` returns, or when
/// the `UapiServer` is dropped without running (including during a panic). It is
/// only removed if it is still the file this server created, so a newer server on
/// the same path is left alone. A process killed outright leaves a stale file
/// behind; the next `bind` (and `wg(8)`) clears it.
pub struct UapiServer {
    listener: UnixListener,
    socket: SocketFile,
    control: Arc<dyn DeviceControl>,
    limits: UapiLimits,
}

impl std::fmt::Debug for UapiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UapiServer")
            .field("path", &self.socket.path)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl UapiServer {
    /// Binds `/var/run/wireguard/INTERFACE.sock`, creating the directory (mode 0755)
    /// if needed. Fails if another process is serving that interface.
    pub async fn bind(interface: &str, control: Arc<dyn DeviceControl>) -> io::Result<UapiServer> {
        validate_interface_name(interface)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        create_socket_dir(Path::new(SOCKET_DIR))
            .map_err(|e| in_context(e, Path::new(SOCKET_DIR)))?;
        bind_socket(
            &socket_path(interface),
            &format!("interface {interface}"),
            control,
        )
        .await
    }

    /// Binds an explicit socket path (tests, or a non-standard directory). The
    /// parent directory must exist.
    pub async fn bind_path(
        path: impl AsRef<Path>,
        control: Arc<dyn DeviceControl>,
    ) -> io::Result<UapiServer> {
        let path = path.as_ref();
        bind_socket(path, &format!("socket {}", path.display()), control).await
    }

    /// Replaces the default [`UapiLimits`].
    pub fn with_limits(mut self, limits: UapiLimits) -> UapiServer {
        self.limits = limits;
        self
    }

    pub fn path(&self) -> &Path {
        &self.socket.path
    }

    /// Serves connections until `shutdown` completes (its output is ignored, so
    /// `tokio::signal::ctrl_c()` or a channel receiver will do), then aborts the
    /// connections still open and removes the socket file before returning.
    pub async fn run(self, shutdown: impl Future) {
        let UapiServer {
            listener,
            socket,
            control,
            limits,
        } = self;
        let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        info!(path = %socket.path.display(), "uapi: listening");
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            error!("uapi: connection task panicked");
                        }
                    }
                }
                accepted = accept(&listener, &permits) => match accepted {
                    Ok((stream, permit)) => {
                        let control = Arc::clone(&control);
                        let limits = limits.clone();
                        connections.spawn(async move {
                            serve_connection(stream, control, &limits).await;
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning, and
                        // keep serving once descriptors are free again.
                        warn!(error = %e, "uapi: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        connections.shutdown().await;
        drop(listener);
        info!(path = %socket.path.display(), "uapi: stopped");
        drop(socket);
    }
}

async fn accept(
    listener: &UnixListener,
    permits: &Arc<Semaphore>,
) -> io::Result<(UnixStream, tokio::sync::OwnedSemaphorePermit)> {
    let permit = Arc::clone(permits)
        .acquire_owned()
        .await
        .map_err(|_| io::Error::other("connection limiter closed"))?;
    let (stream, _) = listener.accept().await?;
    Ok((stream, permit))
}

fn create_socket_dir(dir: &Path) -> io::Result<()> {
    // An existing directory is left as its owner made it.
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    // The umask may have narrowed the mode; 0755 is what wireguard-go uses, and
    // lets `wg show interfaces` list sockets for unprivileged users too.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

async fn bind_socket(
    path: &Path,
    what: &str,
    control: Arc<dyn DeviceControl>,
) -> io::Result<UapiServer> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Ok(_) => {
            if socket_is_live(path).await? {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{what} is already in use"),
                ));
            }
            debug!(path = %path.display(), "uapi: removing stale socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(in_context(e, path)),
                _ => {}
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(in_context(e, path)),
    }
    let listener = bind_private(path).map_err(|e| in_context(e, path))?;
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    let meta = std::fs::metadata(path).map_err(|e| in_context(e, path))?;
    Ok(UapiServer {
        listener,
        socket: SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
        control,
        limits: UapiLimits::default(),
    })
}

/// Names the path in an I/O error, which the OS message alone does not.
fn in_context(e: io::Error, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Whether a server answers on `path`. Refused means a stale file; a full backlog
/// (`WouldBlock`) means a live but busy server.
async fn socket_is_live(path: &Path) -> io::Result<bool> {
    match timeout(Duration::from_secs(2), UnixStream::connect(path)).await {
        // No answer within the timeout: something holds the path, even if wedged.
        Err(_) | Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => match e.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => Ok(false),
            io::ErrorKind::WouldBlock => Ok(true),
            _ => Err(in_context(e, path)),
        },
    }
}

/// Binds the socket so that it is never reachable with a wider mode than 0600.
///
/// A socket is created with the process umask applied, and changing the umask is
/// process-wide (it would race with other threads creating files). Instead bind
/// inside a fresh 0700 directory, chmod there, and rename the socket into place;
/// the rename also replaces a stale file atomically.
fn bind_private(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let staging = parent.join(format!(
        ".uapi-{}-{}",
        std::process::id(),
        STAGING_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let temp = staging.join("s");
    let result = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&temp)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&temp, path)?;
        Ok(listener)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    let _ = std::fs::remove_dir(&staging);
    result
}

/// The socket file this server created; removed on drop if it is still ours.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "uapi: could not remove socket");
                }
            }
            _ => debug!(path = %self.path.display(), "uapi: socket already gone or replaced"),
        }
    }
}

/// How reading a request can fail.
enum ReadFailure {
    /// The client hung up or broke the connection: nothing to answer.
    Gone(&'static str),
    /// The client stopped sending in the middle of a request.
    TimedOut,
    /// The request is malformed: answer with its errno, then close (the stream can
    /// no longer be split into requests reliably).
    Bad(ProtocolError),
}

async fn serve_connection(
    stream: UnixStream,
    control: Arc<dyn DeviceControl>,
    limits: &UapiLimits,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let (reply, keep_open) = match read_request(&mut reader, limits).await {
            // wg(8) connects and hangs up at once to check the socket is alive.
            Ok(None) => return,
            Ok(Some(text)) => match parse_request(&text) {
                Ok(request) => handle(request, &control).await,
                Err(e) => {
                    // Framing was complete, so the connection can carry on.
                    warn!(error = %e, "uapi: request refused");
                    (format_errno(e.errno()), true)
                }
            },
            Err(ReadFailure::Gone(why)) => {
                debug!(why, "uapi: connection closed");
                return;
            }
            Err(ReadFailure::TimedOut) => {
                warn!("uapi: request not completed in time, closing connection");
                return;
            }
            Err(ReadFailure::Bad(e)) => {
                warn!(error = %e, "uapi: malformed request, closing connection");
                (format_errno(e.errno()), false)
            }
        };
        match timeout(limits.write_timeout, write.write_all(reply.as_bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "uapi: could not write reply");
                return;
            }
            Err(_) => {
                warn!("uapi: client does not read its reply, closing connection");
                return;
            }
        }
        if !keep_open {
            return;
        }
    }
}

/// Reads one complete request: the operation line and everything up to and
/// including its empty line. `None` means the client hung up between requests.
async fn read_request<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limits: &UapiLimits,
) -> Result<Option<String>, ReadFailure> {
    let mut line = Vec::new();
    let first_deadline = Instant::now() + limits.idle_timeout;
    match next_line(reader, &mut line, limits.max_line_bytes, first_deadline).await {
        Ok(false) => return Ok(None),
        Ok(true) => {}
        // Silence between requests is a client that is done, not an error.
        Err(ReadFailure::TimedOut) => return Err(ReadFailure::Gone("idle")),
        Err(e) => return Err(e),
    }
    let request_deadline = Instant::now() + limits.request_timeout;
    let first =
        std::str::from_utf8(&line).map_err(|_| ReadFailure::Bad(ProtocolError::InvalidUtf8))?;
    let op = Operation::from_line(first).map_err(ReadFailure::Bad)?;
    let mut text = String::with_capacity(64);
    text.push_str(first);
    text.push('\n');
    let mut lines = 1;
    loop {
        let deadline = request_deadline.min(Instant::now() + limits.idle_timeout);
        if !next_line(reader, &mut line, limits.max_line_bytes, deadline).await? {
            return Err(ReadFailure::Bad(ProtocolError::Unterminated));
        }
        lines += 1;
        if lines > limits.max_request_lines {
            return Err(ReadFailure::Bad(ProtocolError::TooManyLines(
                limits.max_request_lines,
            )));
        }
        let line =
            std::str::from_utf8(&line).map_err(|_| ReadFailure::Bad(ProtocolError::InvalidUtf8))?;
        text.push_str(line);
        text.push('\n');
        if text.len() > limits.max_request_bytes {
            return Err(ReadFailure::Bad(ProtocolError::TooLarge(
                limits.max_request_bytes,
            )));
        }
        match op {
            // A set body may use CRLF, as in protocol.rs.
            Operation::Set if line.is_empty() || line == "\r" => return Ok(Some(text)),
            Operation::Set => {}
            _ if line.is_empty() => return Ok(Some(text)),
            // wireguard-go answers this too, but then reads the rest of the line as
            // the next request; closing is the only way to stay in step.
            Operation::Get => return Err(ReadFailure::Bad(ProtocolError::TrailingData("get"))),
            Operation::Metrics => {
                return Err(ReadFailure::Bad(ProtocolError::TrailingData("metrics")))
            }
        }
    }
}

/// Reads one line into `line`, without its newline. `Ok(false)` is EOF before any
/// byte of the line.
async fn next_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
    deadline: Instant,
) -> Result<bool, ReadFailure> {
    line.clear();
    // Reading at most max+1 bytes bounds memory whatever the client sends.
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut bounded = (&mut *reader).take(limit);
    match timeout_at(deadline, bounded.read_until(b'\n', line)).await {
        Err(_) => Err(ReadFailure::TimedOut),
        Ok(Err(_)) => Err(ReadFailure::Gone("read error")),
        Ok(Ok(0)) => Ok(false),
        Ok(Ok(_)) if line.last() == Some(&b'\n') => {
            line.pop();
            Ok(true)
        }
        Ok(Ok(_)) if line.len() > max => Err(ReadFailure::Bad(ProtocolError::LineTooLong(max))),
        // EOF in the middle of a line: a request cut short is never applied.
        Ok(Ok(_)) => Err(ReadFailure::Bad(ProtocolError::Unterminated)),
    }
}

/// Runs `f` on the blocking pool: the engine may take locks or bind sockets, and a
/// slow call must not stall the runtime's other tasks (other clients included).
async fn call<T: Send + 'static>(
    control: &Arc<dyn DeviceControl>,
    f: impl FnOnce(&dyn DeviceControl) -> T + Send + 'static,
) -> Option<T> {
    let control = Arc::clone(control);
    match tokio::task::spawn_blocking(move || f(control.as_ref())).await {
        Ok(v) => Some(v),
        Err(e) => {
            error!(error = %e, "uapi: device control call failed");
            None
        }
    }
}

/// Answers a parsed request. The flag says whether the connection stays open.
async fn handle(request: Request, control: &Arc<dyn DeviceControl>) -> (String, bool) {
    let failed = || (format_errno(libc::EIO), false);
    match request {
        Request::Get => match call(control, |c| format_get(&c.info())).await {
            Some(reply) => {
                debug!("uapi: get");
                (reply, true)
            }
            None => failed(),
        },
        Request::Set(update) => {
            let summary = Summary::of(&update);
            match call(control, move |c| c.update(update)).await {
                Some(Ok(())) => {
                    info!(
                        peers_updated = summary.peers_updated,
                        peers_removed = summary.peers_removed,
                        replace_peers = summary.replace_peers,
                        private_key = summary.private_key,
                        listen_port = ?summary.listen_port,
                        fwmark = ?summary.fwmark,
                        "uapi: set applied"
                    );
                    (format_errno(0), true)
                }
                Some(Err(e)) => {
                    warn!(error = %e, "uapi: set refused by the device");
                    (format_errno(e.errno()), true)
                }
                None => failed(),
            }
        }
        Request::Metrics => match call(control, |c| c.metrics()).await {
            Some(text) => {
                debug!("uapi: metrics");
                (metrics_reply(&text), false)
            }
            None => failed(),
        },
    }
}

/// The metrics reply: the exposition text cannot contain the reply's terminator
/// (an empty line) nor a status line, so that a client can find the end.
fn metrics_reply(text: &str) -> String {
    let mut reply = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        // Blank lines carry no meaning in the Prometheus text format, and a line
        // starting with "errno=" is not valid exposition.
        if line.trim().is_empty() || line.starts_with("errno=") {
            continue;
        }
        reply.push_str(line);
        reply.push('\n');
    }
    reply.push_str(&format_errno(0));
    reply
}

/// What a set request changes, for the log (never key material).
struct Summary {
    peers_updated: usize,
    peers_removed: usize,
    replace_peers: bool,
    private_key: &'static str,
    listen_port: Option<u16>,
    fwmark: Option<u32>,
}

impl Summary {
    fn of(update: &DeviceUpdate) -> Summary {
        let peers_removed = update.peers.iter().filter(|p| p.remove).count();
        Summary {
            peers_updated: update.peers.len() - peers_removed,
            peers_removed,
            replace_peers: update.replace_peers,
            private_key: match update.private_key {
                None => "unchanged",
                Some(k) if k.is_zero() => "removed",
                Some(_) => "set",
            },
            listen_port: update.listen_port,
            fwmark: update.fwmark,
        }
    }
}

/// Sends `request` to the userspace API socket at `path` (ours or wireguard-go's)
/// and returns the reply up to and including the empty line that ends it, or
/// everything up to EOF if the server closes first. Use
/// [`split_reply`](super::protocol::split_reply) to separate the body and errno.
///
/// Gives up with `TimedOut` after 30 seconds and with `InvalidData` if the reply is
/// not UTF-8 or exceeds 256 MiB.
pub async fn query(path: &Path, request: &str) -> io::Result<String> {
    let exchange = async {
        let mut stream = UnixStream::connect(path).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(n) => n,
                // A server that closes with our bytes unread resets the connection
                // after its reply; what arrived is still the answer.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !reply.is_empty() => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            let scanned = reply.len();
            reply.extend_from_slice(&chunk[..n]);
            if let Some(end) = find_reply_end(&reply, scanned) {
                reply.truncate(end);
                break;
            }
            if reply.len() > MAX_REPLY_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "userspace API reply is too large",
                ));
            }
        }
        String::from_utf8(reply).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "userspace API reply is not UTF-8",
            )
        })
    };
    timeout(QUERY_TIMEOUT, exchange).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no complete reply from {}", path.display()),
        )
    })?
}

/// The end (exclusive) of the first empty line in `buf`, looking only at newlines
/// from `from` on.
fn find_reply_end(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len())
        .find(|&i| buf[i] == b'\n' && (i == 0 || buf[i - 1] == b'\n'))
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream as StdStream;
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::uapi::protocol::split_reply;
    use crate::wg::{DeviceInfo, UpdateError};

    struct Fake {
        updates: Mutex<Vec<DeviceUpdate>>,
        metrics: String,
        panic_on_get: bool,
    }

    impl Fake {
        fn new() -> Arc<Fake> {
            Arc::new(Fake {
                updates: Mutex::new(Vec::new()),
                metrics: "# TYPE x counter\nx 1\n\n\ny 2\nerrno=5\n".into(),
                panic_on_get: false,
            })
        }
        fn update_count(&self) -> usize {
            self.updates.lock().unwrap().len()
        }
    }

    impl DeviceControl for Fake {
        fn info(&self) -> DeviceInfo {
            assert!(!self.panic_on_get, "test panic");
            DeviceInfo {
                private_key: None,
                listen_port: 7,
                fwmark: 0,
                peers: vec![],
            }
        }
        fn update(&self, update: DeviceUpdate) -> Result<(), UpdateError> {
            if update.listen_port == Some(1) {
                return Err(UpdateError::Port {
                    port: 1,
                    reason: "test".into(),
                });
            }
            self.updates.lock().unwrap().push(update);
            Ok(())
        }
        fn metrics(&self) -> String {
            self.metrics.clone()
        }
    }

    /// A unique scratch directory, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            static N: AtomicU64 = AtomicU64::new(0);
            let dir = std::env::temp_dir().join(format!(
                "uapi-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
        fn sock(&self) -> PathBuf {
            self.0.join("t.sock")
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Running {
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
        path: PathBuf,
    }
    impl Running {
        async fn stop(mut self) {
            let _ = self.stop.take().map(|s| s.send(()));
            (&mut self.task).await.unwrap();
        }
    }

    async fn start(path: &Path, control: Arc<dyn DeviceControl>, limits: UapiLimits) -> Running {
        let server = UapiServer::bind_path(path, control)
            .await
            .unwrap()
            .with_limits(limits);
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            task,
            path: path.to_path_buf(),
        }
    }

    /// Sends raw bytes (ignoring a refused write, since the server may already
    /// have hung up) and reads until EOF.
    async fn raw(path: &Path, bytes: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        let _ = s.write_all(bytes).await;
        // Half-close so the server sees the end of our input.
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => panic!("server neither answered nor closed"),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn interface_names() {
        assert_eq!(validate_interface_name("wg0"), Ok(()));
        assert_eq!(validate_interface_name("a23456789012345"), Ok(()));
        assert_eq!(validate_interface_name(""), Err(InterfaceNameError::Empty));
        assert!(matches!(
            validate_interface_name("a234567890123456"),
            Err(InterfaceNameError::TooLong(_))
        ));
        for bad in ["a/b", "../x", "wg:0"] {
            assert!(
                matches!(
                    validate_interface_name(bad),
                    Err(InterfaceNameError::Separator(_))
                ),
                "{bad}"
            );
        }
        for bad in ["wg 0", "wg\t0", "wg\n", "wg\u{7f}"] {
            assert!(
                matches!(
                    validate_interface_name(bad),
                    Err(InterfaceNameError::Whitespace(_))
                ),
                "{bad:?}"
            );
        }
        assert!(validate_interface_name("..").is_err());
        assert_eq!(
            socket_path("wg0"),
            PathBuf::from("/var/run/wireguard/wg0.sock")
        );
    }

    #[tokio::test]
    async fn bind_refuses_bad_names() {
        let err = UapiServer::bind("../etc", Fake::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("'/'"), "{err}");
    }

    #[tokio::test]
    async fn serves_and_removes_its_socket() {
        let dir = Scratch::new("serve");
        let fake = Fake::new();
        let server = start(&dir.sock(), fake.clone(), UapiLimits::default()).await;
        let mode = std::fs::metadata(&server.path).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        // Nothing left behind by the private bind.
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 1);

        let reply = query(&server.path, "get=1\n\n").await.unwrap();
        assert_eq!(reply, "listen_port=7\nerrno=0\n\n");
        let reply = query(&server.path, "set=1\nlisten_port=9\n\n")
            .await
            .unwrap();
        assert_eq!(reply, "errno=0\n\n");
        assert_eq!(fake.update_count(), 1);
        // The device's own refusal maps to its errno.
        let reply = query(&server.path, "set=1\nlisten_port=1\n\n")
            .await
            .unwrap();
        assert_eq!(reply, format!("errno=-{}\n\n", libc::EADDRINUSE));

        let path = server.path.clone();
        server.stop().await;
        assert!(!path.exists());
        assert_eq!(
            query(&path, "get=1\n\n").await.unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[tokio::test]
    async fn dropping_an_unused_server_removes_the_socket() {
        let dir = Scratch::new("drop");
        let server = UapiServer::bind_path(dir.sock(), Fake::new())
            .await
            .unwrap();
        assert!(dir.sock().exists());
        drop(server);
        assert!(!dir.sock().exists());
    }

    #[tokio::test]
    async fn refuses_a_live_socket_and_replaces_a_stale_one() {
        let dir = Scratch::new("inuse");
        let server = start(&dir.sock(), Fake::new(), UapiLimits::default()).await;
        let err = UapiServer::bind_path(dir.sock(), Fake::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("is already in use"), "{err}");
        // The refused attempt did not disturb the running server.
        assert!(query(&dir.sock(), "get=1\n\n").await.is_ok());
        server.stop().await;

        // A socket file nobody listens on, as left by a killed process.
        drop(std::os::unix::net::UnixListener::bind(dir.sock()).unwrap());
        assert!(dir.sock().exists());
        let server = start(&dir.sock(), Fake::new(), UapiLimits::default()).await;
        assert!(query(&dir.sock(), "get=1\n\n").await.is_ok());
        server.stop().await;

        // Anything other than a socket is not ours to delete.
        std::fs::write(dir.sock(), "precious").unwrap();
        let err = UapiServer::bind_path(dir.sock(), Fake::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(dir.sock()).unwrap(), "precious");
    }

    #[tokio::test]
    async fn does_not_remove_a_successors_socket() {
        let dir = Scratch::new("successor");
        let old = UapiServer::bind_path(dir.sock(), Fake::new())
            .await
            .unwrap();
        std::fs::remove_file(dir.sock()).unwrap();
        let new = UapiServer::bind_path(dir.sock(), Fake::new())
            .await
            .unwrap();
        drop(old);
        assert!(dir.sock().exists());
        drop(new);
        assert!(!dir.sock().exists());
    }

    #[tokio::test]
    async fn several_requests_on_one_connection() {
        let dir = Scratch::new("multi");
        let fake = Fake::new();
        let server = start(&dir.sock(), fake.clone(), UapiLimits::default()).await;
        // A refused set leaves the stream aligned, so the next request is served.
        let out = raw(
            &server.path,
            b"get=1\n\nset=1\nbogus=1\n\nset=1\nfwmark=3\n\nget=1\n\n",
        )
        .await;
        assert_eq!(
            out,
            "listen_port=7\nerrno=0\n\nerrno=-22\n\nerrno=0\n\nlisten_port=7\nerrno=0\n\n"
        );
        assert_eq!(fake.update_count(), 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_gets_an_error_and_a_close() {
        let dir = Scratch::new("garbage");
        let fake = Fake::new();
        let limits = UapiLimits {
            max_line_bytes: 64,
            max_request_lines: 4,
            max_request_bytes: 100,
            ..UapiLimits::default()
        };
        let server = start(&dir.sock(), fake.clone(), limits).await;
        let p = &server.path;
        let einval = "errno=-22\n\n";
        assert_eq!(raw(p, b"\x00\xff\xfe garbage\n").await, einval);
        assert_eq!(raw(p, b"hello\n").await, einval);
        assert_eq!(raw(p, b"\n").await, einval);
        assert_eq!(raw(p, b"set=1\nlisten_port=\xff\n\n").await, einval);
        assert_eq!(raw(p, &[b'x'; 100]).await, einval);
        assert_eq!(
            raw(p, format!("set=1\n{}\n\n", "a".repeat(65)).as_bytes()).await,
            einval
        );
        assert_eq!(
            raw(p, b"set=1\nfwmark=1\nfwmark=1\nfwmark=1\n\n").await,
            einval
        );
        let big = format!(
            "set=1\nfwmark={}\nfwmark={}\n\n",
            "1".repeat(50),
            "1".repeat(50)
        );
        assert_eq!(raw(p, big.as_bytes()).await, einval);
        // Trailing garbage after get: answered with an error, then closed.
        assert_eq!(raw(p, b"get=1\nx\nget=1\n\n").await, einval);
        // Protocol errors (no '=') are EPROTO, as in wireguard-go.
        assert_eq!(
            raw(p, b"set=1\nnoequals\n\n").await,
            format!("errno=-{}\n\n", libc::EPROTO)
        );
        // Cut short: never applied.
        assert_eq!(raw(p, b"set=1\nlisten_port=5").await, einval);
        assert_eq!(raw(p, b"set=1\nlisten_port=5\n").await, einval);
        assert_eq!(fake.update_count(), 0);
        // Hang up without a byte, as wg(8) does to probe the socket.
        assert_eq!(raw(p, b"").await, "");
        assert_eq!(
            query(p, "get=1\n\n").await.unwrap(),
            "listen_port=7\nerrno=0\n\n"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn idle_and_slow_clients_time_out_without_blocking_others() {
        let dir = Scratch::new("idle");
        let limits = UapiLimits {
            idle_timeout: Duration::from_millis(200),
            request_timeout: Duration::from_millis(500),
            ..UapiLimits::default()
        };
        let server = start(&dir.sock(), Fake::new(), limits).await;
        let p = server.path.clone();
        let silent = UnixStream::connect(&p).await.unwrap();
        let mut slow = UnixStream::connect(&p).await.unwrap();
        slow.write_all(b"set=1\n").await.unwrap();
        // Others are served meanwhile.
        assert!(query(&p, "get=1\n\n").await.is_ok());
        // The slow client trickles lines within the idle timeout but exceeds the
        // request deadline, and is dropped without an answer.
        let trickle = async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if slow.write_all(b"fwmark=1\n").await.is_err() {
                    break;
                }
            }
            let mut buf = Vec::new();
            let _ = slow.read_to_end(&mut buf).await;
            buf
        };
        let got = timeout(Duration::from_secs(5), trickle).await.unwrap();
        assert!(got.is_empty(), "{got:?}");
        let mut silent = silent;
        let mut buf = Vec::new();
        let n = timeout(Duration::from_secs(5), silent.read_to_end(&mut buf))
            .await
            .unwrap();
        assert_eq!(n.unwrap(), 0);
        server.stop().await;
    }

    #[tokio::test]
    async fn connection_limit_queues_clients() {
        let dir = Scratch::new("limit");
        let limits = UapiLimits {
            max_connections: 1,
            idle_timeout: Duration::from_millis(300),
            ..UapiLimits::default()
        };
        let server = start(&dir.sock(), Fake::new(), limits).await;
        let _hog = StdStream::connect(&server.path).unwrap();
        // Served once the hog's idle timeout frees the only slot.
        let reply = query(&server.path, "get=1\n\n").await.unwrap();
        assert_eq!(reply, "listen_port=7\nerrno=0\n\n");
        server.stop().await;
    }

    #[tokio::test]
    async fn metrics_reply_is_framed_and_closed() {
        let dir = Scratch::new("metrics");
        let server = start(&dir.sock(), Fake::new(), UapiLimits::default()).await;
        let reply = query(&server.path, "metrics=1\n\n").await.unwrap();
        assert_eq!(reply, "# TYPE x counter\nx 1\ny 2\nerrno=0\n\n");
        assert_eq!(
            split_reply(&reply).unwrap(),
            ("# TYPE x counter\nx 1\ny 2\n", 0)
        );
        // The server hangs up after metrics, even with more requests queued.
        let out = raw(&server.path, b"metrics=1\n\nget=1\n\n").await;
        assert_eq!(out, reply);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_panicking_device_does_not_take_the_server_down() {
        let dir = Scratch::new("panic");
        let fake = Arc::new(Fake {
            updates: Mutex::new(Vec::new()),
            metrics: String::new(),
            panic_on_get: true,
        });
        let server = start(&dir.sock(), fake, UapiLimits::default()).await;
        let reply = query(&server.path, "get=1\n\n").await.unwrap();
        assert_eq!(reply, format!("errno=-{}\n\n", libc::EIO));
        let reply = query(&server.path, "set=1\n\n").await.unwrap();
        assert_eq!(reply, "errno=0\n\n");
        server.stop().await;
    }

    #[test]
    fn reply_end() {
        assert_eq!(find_reply_end(b"\n", 0), Some(1));
        assert_eq!(find_reply_end(b"a=1\nerrno=0\n\nrest", 0), Some(13));
        assert_eq!(find_reply_end(b"a=1\nerrno=0\n", 0), None);
        // A terminator split across reads is found from the previous length.
        assert_eq!(find_reply_end(b"errno=0\n\n", 8), Some(9));
    }
}
