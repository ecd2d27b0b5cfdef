//! `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1 on a local address, for
//! service managers, container health checks and Prometheus.
//!
//! - `/healthz`: 200 while the agent runs.
//! - `/readyz`: 200 once the agent follows Docker and has reconciled with it; 503
//!   with the reason before that (or while Docker is away).
//! - `/metrics`: see [`crate::metrics`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::shared::Shared;

/// The default address: loopback only, since the metrics name every container.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9531";
/// A client must send its request this soon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` (failing now, so a taken port is reported at start) and serves it.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve health and metrics on {addr} (--health-listen)"))?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "health listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &shared)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "health connection failed");
                }
            });
        }
    }))
}

fn answer<B>(req: &Request<B>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match not_ready(shared) {
            None => text(StatusCode::OK, "ready\n".into()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        },
        "/metrics" => {
            let mut r = text(StatusCode::OK, crate::metrics::render(shared));
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /readyz, /metrics\n".into(),
        ),
    }
}

fn not_ready(shared: &Shared) -> Option<&'static str> {
    if !shared.docker_connected.load(Ordering::Relaxed) {
        Some("not following Docker events (reconnecting)")
    } else if !shared.reconciled.load(Ordering::Relaxed) {
        Some("first reconcile with Docker not done yet")
    } else {
        None
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// `sidecar-agent health`: asks a running agent's `/readyz` (for a container
/// HEALTHCHECK, where no curl exists). `Ok` only for a 200.
pub async fn probe(addr: SocketAddr) -> Result<()> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("no agent answers on {addr}"))?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        anyhow::Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            anyhow::anyhow!("the agent on {addr} did not answer within {REQUEST_TIMEOUT:?}")
        })??;
    let status = reply.lines().next().unwrap_or_default();
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
    if status.split_whitespace().nth(1) == Some("200") {
        println!("{body}");
        Ok(())
    } else {
        anyhow::bail!("not ready: {body} ({status})")
    }
}
