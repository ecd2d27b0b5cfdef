//! The endpoint a container asks about itself, as test instances ask their
//! sidecar: `http://127.0.0.1:9530` inside the container (label `sidecar.api=true`).
//!
//! The listening socket is made in the container's own network namespace, bound to
//! its loopback, so only that container (and containers sharing its namespace) can
//! reach it, and whatever reaches it speaks for that container alone: no address or
//! token has to be checked, and no request can name another container.
//!
//! - `GET /v1/self`: its public addresses, mode, whether its network is initialized
//!   (tunnel up, handshake done) and its emulated conditions.
//! - `PUT /v1/self/conditions` with `{"latency": "80ms", "jitter": "0ms", "loss": "1%"}`
//!   (fields left out are zero; the same reader as the labels): changes its
//!   emulated network at once, as `sidecar-agent shape` does; `DELETE` clears it.
//!   POST is taken as PUT for clients (busybox wget) that cannot send PUT.
//!
//! The container is not trusted: bodies are bounded, slow clients are cut off, and
//! it holds at most a few connections at once.

use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sidecar::netem::Conditions;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::conditions;
use crate::shared::{short, Shared};

/// Where the endpoint listens inside the container.
pub const PORT: u16 = 9530;
/// A request body larger than this is refused.
const MAX_BODY: usize = 4096;
/// How much of a refused body is still read, so the client gets the refusal.
const MAX_DRAIN: usize = 64 * 1024;
/// A client must send its request's head, and then its body, this soon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one container may hold open at once; more are closed at once, so a
/// container cannot spend the agent's file descriptors.
const MAX_CONNECTIONS: usize = 8;
/// A tunnel counts as up with a handshake this recent (WireGuard's reject-after time).
const UP_WITHIN: Duration = Duration::from_secs(180);
const USAGE: &str = "GET /v1/self; PUT or DELETE /v1/self/conditions";

/// Stops serving, and ends every open connection, when dropped (with the
/// container's tunnel).
pub struct ContainerApi(JoinHandle<()>);

impl Drop for ContainerApi {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds 127.0.0.1:[`PORT`] in the namespace `netns` and serves container `id`.
pub fn start(netns: &File, shared: Arc<Shared>, id: String) -> io::Result<ContainerApi> {
    if same_namespace(netns, &File::open("/proc/self/ns/net")?)? {
        // Host networking: the loopback there is every host process's, and each of
        // them could change this container's network.
        return Err(io::Error::other(
            "the container shares the agent's network namespace (host networking), where any process could reach the endpoint",
        ));
    }
    let listener = bind_in(netns, SocketAddr::from((Ipv4Addr::LOCALHOST, PORT)))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(ContainerApi(tokio::spawn(serve(listener, shared, id))))
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, id: String) {
    // Owned here, so aborting this task drops (and so aborts) every connection.
    let mut connections = JoinSet::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "container endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(container = %short(&id), "container endpoint: too many connections");
            continue;
        };
        let (shared, id) = (shared.clone(), id.clone());
        connections.spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let (shared, id) = (shared.clone(), id.clone());
                async move { Ok::<_, Infallible>(answer(req, &shared, &id).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                // Simple clients (`printf ... | nc`) shut their side once the request
                // is sent; they still wait for the answer.
                .half_close(true)
                .header_read_timeout(REQUEST_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "container endpoint connection failed");
            }
        });
    }
}

/// Whether two namespace files name the same namespace.
fn same_namespace(a: &File, b: &File) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let (a, b) = (a.metadata()?, b.metadata()?);
    Ok((a.dev(), a.ino()) == (b.dev(), b.ino()))
}

/// A listening socket made on a thread of its own that enters `netns` (setns
/// changes only the calling thread, and no tokio worker may be moved); the socket
/// stays in that namespace wherever it is used from.
fn bind_in(netns: &File, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let fd = netns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: fd is an open namespace file for the duration of the call,
                // and setns only affects this thread, which ends right after.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                std::net::TcpListener::bind(addr)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    shared: &Shared,
    id: &str,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    match (req.uri().path(), method) {
        ("/v1/self", Method::GET) => reply(StatusCode::OK, describe(shared, id)),
        ("/v1/self/conditions", Method::PUT | Method::POST) => {
            let declared = not_json(&req);
            // Read (bounded) before answering even a refusal: a reply sent over an
            // unread body is lost to the reset that closing over it sends.
            let body = match tokio::time::timeout(REQUEST_TIMEOUT, read_body(req.into_body())).await
            {
                Ok(Ok(b)) => b,
                Ok(Err(BodyRead::TooLarge)) => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!("the body is larger than {MAX_BODY} bytes"),
                    )
                }
                Ok(Err(BodyRead::Failed)) => {
                    return error(StatusCode::BAD_REQUEST, "the body could not be read")
                }
                Err(_) => {
                    return error(
                        StatusCode::REQUEST_TIMEOUT,
                        &format!("the body did not arrive within {REQUEST_TIMEOUT:?}"),
                    )
                }
            };
            if let Some(why) = declared {
                return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &why);
            }
            match read_conditions(&body) {
                Ok(wanted) => set(shared, id, wanted),
                Err(BodyError::NotJson(e)) => error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &e),
                Err(BodyError::Invalid(e)) => error(StatusCode::BAD_REQUEST, &e),
            }
        }
        ("/v1/self/conditions", Method::DELETE) => set(shared, id, None),
        ("/v1/self" | "/v1/self/conditions", _) => error(StatusCode::METHOD_NOT_ALLOWED, USAGE),
        _ => error(StatusCode::NOT_FOUND, USAGE),
    }
}

enum BodyRead {
    TooLarge,
    Failed,
}

/// The body, up to [`MAX_BODY`] bytes. A longer one is refused, but read on up to
/// [`MAX_DRAIN`] bytes first so the refusal reaches the client.
async fn read_body<B>(mut body: B) -> Result<Vec<u8>, BodyRead>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| BodyRead::Failed)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > MAX_DRAIN {
            break;
        }
        if seen <= MAX_BODY {
            kept.extend_from_slice(&data);
        }
    }
    if seen > MAX_BODY {
        return Err(BodyRead::TooLarge);
    }
    Ok(kept)
}

/// Why the request's declared body is not JSON, if it says it is something else.
fn not_json<B>(req: &Request<B>) -> Option<String> {
    let value = req.headers().get(CONTENT_TYPE)?;
    let media = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let json = media == "application/json"
        || (media.starts_with("application/") && media.ends_with("+json"));
    (!json).then(|| {
        format!(
            "Content-Type {:?} is not JSON: send application/json",
            String::from_utf8_lossy(value.as_bytes())
        )
    })
}

fn set(shared: &Shared, id: &str, wanted: Option<Conditions>) -> Response<Full<Bytes>> {
    match shared.shape_id(id, wanted) {
        Ok(()) => {
            tracing::info!(container = %short(id), conditions = %conditions::describe(wanted.as_ref()), "emulated network conditions changed from inside the container");
            reply(StatusCode::OK, describe(shared, id))
        }
        Err(e) => error(StatusCode::CONFLICT, &e),
    }
}

#[derive(Debug, PartialEq)]
enum BodyError {
    /// Not JSON at all (415).
    NotJson(String),
    /// JSON, but not conditions we accept (400).
    Invalid(String),
}

/// `{"latency": "80ms", "jitter": "0ms", "loss": "1%"}`, every field optional.
fn read_conditions(body: &[u8]) -> Result<Option<Conditions>, BodyError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| BodyError::NotJson(format!("the body is not JSON: {e}")))?;
    let invalid = BodyError::Invalid;
    let obj = v.as_object().ok_or_else(|| {
        invalid(r#"expected an object such as {"latency": "80ms", "loss": "1%"}"#.into())
    })?;
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "latency" | "jitter" | "loss"))
    {
        return Err(invalid(format!(
            "unknown field {k:?}: expected latency, jitter, loss"
        )));
    }
    let field = |name: &str| -> Result<Option<&str>, BodyError> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(invalid(format!(
                "{name} must be a string such as \"50ms\" or \"1%\""
            ))),
        }
    };
    let named = |name: &'static str| move |e: String| invalid(format!("{name}: {e}"));
    let latency = field("latency")?
        .map(|v| conditions::parse_delay(v).map_err(named("latency")))
        .transpose()?;
    let jitter = field("jitter")?
        .map(|v| conditions::parse_delay(v).map_err(named("jitter")))
        .transpose()?;
    let loss = field("loss")?
        .map(|v| conditions::parse_loss(v).map_err(named("loss")))
        .transpose()?;
    conditions::build(latency, jitter, loss).map_err(invalid)
}

/// An address without its prefix length: `2001:db8::5/128` is `2001:db8::5`.
fn bare(prefix: &Option<String>) -> Option<&str> {
    prefix.as_deref().and_then(|a| a.split('/').next())
}

/// The container as it should know itself.
fn describe(shared: &Shared, id: &str) -> Value {
    let rows = shared.rows.lock();
    let Some(entry) = rows.get(id) else {
        return json!({"container": id, "initialized": false});
    };
    let row = &entry.row;
    let (initialized, conditions) = match &entry.live {
        Some((device, key)) => {
            let up = device.peer(key).is_some_and(|p| {
                device
                    .last_handshake(&p, Instant::now(), SystemTime::now())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age < UP_WITHIN)
            });
            (up, device.peer_conditions(key))
        }
        None => (false, None),
    };
    json!({
        "container": id,
        "name": row.name,
        "state": row.state,
        "ipv6": bare(&row.ipv6),
        "ipv4": bare(&row.ipv4),
        "mode": row.mode,
        "initialized": initialized,
        "conditions": conditions.map(|c| {
            let [latency, jitter, loss] = conditions::fields(&c);
            json!({"latency": latency, "jitter": jitter, "loss": loss})
        }),
    })
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, why: &str) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": why }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_bodies_are_read_strictly() {
        let c = read_conditions(br#"{"latency": "80ms", "loss": "0.5%"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(c.latency(), Duration::from_millis(80));
        assert!((c.loss() - 0.005).abs() < 1e-12);
        assert_eq!(read_conditions(b"{}"), Ok(None));
        assert_eq!(
            read_conditions(br#"{"latency": "0ms", "jitter": null}"#),
            Ok(None)
        );
        for not_json in [&b"not json"[..], b"", b"latency=80ms", b"{\"latency\": "] {
            assert!(
                matches!(read_conditions(not_json), Err(BodyError::NotJson(_))),
                "{}",
                String::from_utf8_lossy(not_json)
            );
        }
        for (bad, reason) in [
            (&b"[]"[..], "expected an object"),
            (br#"{"latency": 80}"#, "must be a string"),
            (br#"{"latency": "80"}"#, "latency: expected a duration"),
            (
                br#"{"jitter": "11s"}"#,
                "jitter: \"11s\" is above the maximum",
            ),
            (br#"{"delay": "80ms"}"#, "unknown field \"delay\""),
            (br#"{"loss": "200%"}"#, "loss: \"200%\" is above 100%"),
        ] {
            match read_conditions(bad) {
                Err(BodyError::Invalid(e)) => assert!(e.contains(reason), "{e}"),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(bad)),
            }
        }
    }

    #[test]
    fn the_agents_own_namespace_is_recognised() {
        let own = File::open("/proc/self/ns/net").unwrap();
        assert!(same_namespace(&own, &File::open("/proc/self/ns/net").unwrap()).unwrap());
        let mount = File::open("/proc/self/ns/mnt").unwrap();
        assert!(!same_namespace(&own, &mount).unwrap());
    }

    #[tokio::test]
    async fn bodies_are_bounded() {
        let body = |n: usize| Full::new(Bytes::from(vec![b' '; n]));
        assert_eq!(
            read_body(body(MAX_BODY)).await.ok().map(|b| b.len()),
            Some(MAX_BODY)
        );
        assert!(matches!(
            read_body(body(MAX_BODY + 1)).await,
            Err(BodyRead::TooLarge)
        ));
        assert!(matches!(
            read_body(body(10 * MAX_DRAIN)).await,
            Err(BodyRead::TooLarge)
        ));
    }

    #[test]
    fn only_json_media_types_are_read() {
        let with = |ct: Option<&str>| {
            let mut b = Request::builder().method("PUT").uri("/v1/self/conditions");
            if let Some(ct) = ct {
                b = b.header(CONTENT_TYPE, ct);
            }
            not_json(&b.body(()).unwrap())
        };
        assert_eq!(with(None), None, "no Content-Type: the body decides");
        assert_eq!(with(Some("application/json")), None);
        assert_eq!(with(Some("Application/JSON; charset=utf-8")), None);
        assert_eq!(with(Some("application/merge-patch+json")), None);
        for other in ["application/x-www-form-urlencoded", "text/plain", "json"] {
            let why = with(Some(other)).unwrap();
            assert!(why.contains("send application/json"), "{other}: {why}");
        }
    }
}
