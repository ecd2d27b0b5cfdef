//! The relay's Prometheus text on `/metrics`: peers registered and on the data plane,
//! handshakes and bytes per token (the engine's per-peer counters summed, so the
//! number of series follows the tokens, not the peers), the engine's drops by
//! reason, API requests by route and status with their latency, rate-limit
//! rejections and neighbour answers.
//!
//! Served over plain HTTP on its own address ([`crate::config::MetricsSection`]),
//! never on the API's port.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use parking_lot::Mutex;
use sidecar::wg::DropReason;

use crate::dataplane::RelayDataPlane;
use crate::histogram::Histogram;
use crate::limits::ApiLimits;
use crate::neighbor::NeighborResponder;
use crate::store::{CommitLatency, Store};

/// The route label of a request no route matched (404s, and requests refused
/// before routing): one series for all of them, whatever path a client sent.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// API requests by method, route template and status, and their latency by method
/// and route. Keys are route templates (`/v1/peers/{key}`), never raw paths, so a
/// client cannot grow the series.
#[derive(Default)]
pub struct ApiMetrics {
    inner: Mutex<ApiCounts>,
}

#[derive(Default)]
struct ApiCounts {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<(String, String), Histogram>,
}

impl ApiMetrics {
    /// Counts one answered request. `method` is one of the few HTTP methods the
    /// caller lets through; others should be passed as "other".
    pub fn record(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let mut inner = self.inner.lock();
        *inner
            .requests
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        inner
            .latency
            .entry((method.to_owned(), route.to_owned()))
            .or_default()
            .observe(elapsed.as_secs_f64());
    }

    /// Requests counted for `method`, `route` and `status` so far.
    pub fn requests(&self, method: &str, route: &str, status: u16) -> u64 {
        let key = (method.to_owned(), route.to_owned(), status);
        self.inner.lock().requests.get(&key).copied().unwrap_or(0)
    }
}

/// A method label with bounded values: anything unusual is "other".
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// What `/metrics` reads from.
#[derive(Clone)]
pub struct Sources {
    pub store: Store,
    pub dataplane: Arc<RelayDataPlane>,
    pub api: Arc<ApiMetrics>,
    pub limits: ApiLimits,
    /// `None` when no prefix is on-link.
    pub neighbor: Option<Arc<NeighborResponder>>,
}

/// The whole text, families in a fixed order.
pub fn render(s: &Sources) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "sidecar_relay_peers_registered",
        "gauge",
        "Peers registered in the store.",
    );
    let _ = writeln!(
        out,
        "sidecar_relay_peers_registered {}",
        s.store.peer_count()
    );

    let totals = s.dataplane.token_totals();
    header(
        &mut out,
        "sidecar_relay_peers_dataplane",
        "gauge",
        "Peers on the WireGuard data plane.",
    );
    let _ = writeln!(
        out,
        "sidecar_relay_peers_dataplane {}",
        totals.values().map(|t| t.peers).sum::<u64>()
    );
    write_token_totals(&mut out, &totals);

    header(
        &mut out,
        "sidecar_relay_dropped_total",
        "counter",
        "Packets and datagrams the data plane dropped, by reason.",
    );
    let device = s.dataplane.device();
    for reason in DropReason::ALL {
        let _ = writeln!(
            out,
            "sidecar_relay_dropped_total{{reason=\"{}\"}} {}",
            reason.as_str(),
            device.dropped(reason)
        );
    }

    write_api(&mut out, &s.api);
    write_store_commits(&mut out, s.store.commit_latency());

    let requests = &s.limits.requests;
    let connections = &s.limits.connections;
    for (name, kind, help, value) in [
        (
            "sidecar_relay_api_rate_limited_total",
            "counter",
            "API requests refused with 429 (over a token's or a source's rate).",
            requests.rate_limited_total(),
        ),
        (
            "sidecar_relay_api_overloaded_total",
            "counter",
            "API requests refused with 503 (too many in flight).",
            requests.overloaded_total(),
        ),
        (
            "sidecar_relay_api_connections_refused_total",
            "counter",
            "API connections closed at once (over the total or per-source bound).",
            connections.refused_total(),
        ),
        (
            "sidecar_relay_api_connections_open",
            "gauge",
            "API connections open now.",
            connections.open() as u64,
        ),
    ] {
        header(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }

    if let Some(n) = &s.neighbor {
        let stats = n.stats();
        header(
            &mut out,
            "sidecar_relay_neighbor_requests_total",
            "counter",
            "Neighbor Solicitations (ndp) and ARP requests (arp) seen on the uplink, for any target.",
        );
        let _ = writeln!(
            out,
            "sidecar_relay_neighbor_requests_total{{protocol=\"ndp\"}} {}",
            stats.solicitations
        );
        let _ = writeln!(
            out,
            "sidecar_relay_neighbor_requests_total{{protocol=\"arp\"}} {}",
            stats.arp_requests
        );
        header(
            &mut out,
            "sidecar_relay_neighbor_answers_total",
            "counter",
            "Neighbor Advertisements (ndp) and ARP replies (arp) sent for peers' addresses.",
        );
        let _ = writeln!(
            out,
            "sidecar_relay_neighbor_answers_total{{protocol=\"ndp\"}} {}",
            stats.answered
        );
        let _ = writeln!(
            out,
            "sidecar_relay_neighbor_answers_total{{protocol=\"arp\"}} {}",
            stats.arp_answered
        );
        header(
            &mut out,
            "sidecar_relay_neighbor_send_errors_total",
            "counter",
            "Neighbour answers the kernel refused to send.",
        );
        let _ = writeln!(
            out,
            "sidecar_relay_neighbor_send_errors_total {}",
            stats.send_errors
        );
    }
    out
}

fn write_token_totals(out: &mut String, totals: &BTreeMap<String, crate::dataplane::TokenTotals>) {
    type Family = (
        &'static str,
        &'static str,
        &'static str,
        fn(&crate::dataplane::TokenTotals) -> u64,
    );
    let families: [Family; 4] = [
        (
            "sidecar_relay_token_peers",
            "gauge",
            "Peers of the token on the data plane.",
            |t| t.peers,
        ),
        (
            "sidecar_relay_token_handshakes_total",
            "counter",
            "WireGuard handshakes completed with the token's peers.",
            |t| t.handshakes,
        ),
        (
            "sidecar_relay_token_rx_bytes_total",
            "counter",
            "WireGuard bytes received from the token's peers.",
            |t| t.rx_bytes,
        ),
        (
            "sidecar_relay_token_tx_bytes_total",
            "counter",
            "WireGuard bytes sent to the token's peers.",
            |t| t.tx_bytes,
        ),
    ];
    for (name, kind, help, value) in families {
        header(out, name, kind, help);
        for (token, t) in totals {
            let _ = writeln!(out, "{name}{{token=\"{}\"}} {}", escape(token), value(t));
        }
    }
}

fn write_api(out: &mut String, api: &ApiMetrics) {
    let inner = api.inner.lock();
    header(
        out,
        "sidecar_relay_api_requests_total",
        "counter",
        "API requests answered, by method, route template and status.",
    );
    for ((method, route, status), n) in &inner.requests {
        let _ = writeln!(
            out,
            "sidecar_relay_api_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
            escape(route)
        );
    }
    let name = "sidecar_relay_api_request_duration_seconds";
    header(
        out,
        name,
        "histogram",
        "Time to answer an API request, by method and route template.",
    );
    for ((method, route), h) in &inner.latency {
        let labels = format!("method=\"{method}\",route=\"{}\"", escape(route));
        h.write(out, name, &labels);
    }
}

fn write_store_commits(out: &mut String, commits: &CommitLatency) {
    let name = "sidecar_relay_store_commit_duration_seconds";
    header(
        out,
        name,
        "histogram",
        "Time for a durable store commit (transaction and flush), by operation.",
    );
    for (operation, h) in commits.snapshot() {
        h.write(out, name, &format!("operation=\"{operation}\""));
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value as the text format wants it: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Binds `addr` now (so a taken port fails the start) and serves `/metrics` until
/// `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving Prometheus /metrics");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(sources));
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!(error = %e, "metrics listener failed");
        }
    }))
}

async fn metrics(State(sources): State<Arc<Sources>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        render(&sources),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_the_count() {
        let api = ApiMetrics::default();
        api.record("GET", "/v1/peers", 200, Duration::from_millis(3));
        api.record("GET", "/v1/peers", 200, Duration::from_millis(70));
        api.record("GET", "/v1/peers", 500, Duration::from_secs(60));
        let mut out = String::new();
        write_api(&mut out, &api);
        let line = |needle: &str| {
            out.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("no {needle} in\n{out}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let b =
            "sidecar_relay_api_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/peers\",";
        assert_eq!(line(&format!("{b}le=\"0.005\"}}")), "1");
        assert_eq!(line(&format!("{b}le=\"0.1\"}}")), "2");
        assert_eq!(line(&format!("{b}le=\"10\"}}")), "2");
        assert_eq!(line(&format!("{b}le=\"+Inf\"}}")), "3");
        assert_eq!(
            line("sidecar_relay_api_requests_total{method=\"GET\",route=\"/v1/peers\",status=\"500\"}"),
            "1"
        );
        assert_eq!(api.requests("GET", "/v1/peers", 200), 2);
    }
}
