//! Bounded cost per caller on the control API.
//!
//! Three gates, cheapest first:
//!
//! 1. connections, counted when TCP is accepted and before any TLS work: at most
//!    `max_connections` open at once, and at most `max_connections_per_source` from one
//!    source. An excess connection is closed at once; the client sees a reset or EOF.
//! 2. request rates (GCRA, governor): every request is charged to its source first,
//!    so callers without a valid token are held back before any token lookup; a request
//!    carrying a bearer token is then charged to that token. Over either limit the
//!    answer is a JSON 429 `rate_limited` with `Retry-After` in whole seconds.
//! 3. requests in flight: past `max_requests_in_flight` a request waits briefly for a
//!    slot, then gets a 503 `overloaded`.
//!
//! A "source" is an IPv4 address or an IPv6 /64: one host usually owns a whole /64, so
//! counting /128s would let it mint fresh limits at will.
//!
//! The keyed limiters forget a key once its state is indistinguishable from a fresh one
//! (`retain_recent`), at least every [`PRUNE_INTERVAL`] and whenever a map holds more
//! than [`PRUNE_ABOVE_KEYS`]: memory stays proportional to the callers seen in the last
//! few seconds, whose rate the connection limits and the TLS handshake already bound.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use axum_server::accept::Accept;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;
use sidecar_proto::{codes, ApiError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::config::LimitsSection;

/// How often idle keys are dropped from the rate limiters.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// A map larger than this is pruned at once rather than at the next interval.
pub const PRUNE_ABOVE_KEYS: usize = 50_000;
/// How long a request may wait for a slot when `max_requests_in_flight` are running.
pub const IN_FLIGHT_WAIT: Duration = Duration::from_secs(2);

/// One caller's source: an IPv4 address, or the /64 an IPv6 address belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4([u8; 4]),
    V6Net([u8; 8]),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip.to_canonical() {
            IpAddr::V4(a) => SourceKey::V4(a.octets()),
            IpAddr::V6(a) => {
                let mut net = [0u8; 8];
                net.copy_from_slice(&a.octets()[..8]);
                SourceKey::V6Net(net)
            }
        }
    }
}

/// A bearer secret, reduced to a digest so the limiter never holds secrets.
type TokenKey = [u8; 16];

fn token_key(secret: &str) -> TokenKey {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest.as_ref()[..16]);
    key
}

/// Who went over a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Source,
    Token,
}

/// A refused request: who was over and when to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    /// Whole seconds, at least 1 (a `Retry-After` of 0 invites an immediate retry).
    pub retry_after_secs: u64,
}

type Keyed<K, C> = RateLimiter<K, DashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Per-source and per-token request rates, and the requests-in-flight bound.
pub struct RequestLimits<C: Clock = DefaultClock> {
    by_source: Keyed<SourceKey, C>,
    by_token: Keyed<TokenKey, C>,
    clock: C,
    last_prune: Mutex<C::Instant>,
    in_flight: Arc<Semaphore>,
    rate_limited: AtomicU64,
    overloaded: AtomicU64,
}

fn quota(rate: u32, burst: u32) -> Quota {
    // Validation rejects zeros; clamping keeps an unvalidated section from panicking.
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

impl RequestLimits<DefaultClock> {
    pub fn new(settings: &LimitsSection) -> RequestLimits<DefaultClock> {
        RequestLimits::with_clock(settings, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RequestLimits<C> {
    pub fn with_clock(settings: &LimitsSection, clock: C) -> RequestLimits<C> {
        RequestLimits {
            by_source: RateLimiter::dashmap_with_clock(
                quota(settings.source_rate, settings.source_burst),
                clock.clone(),
            ),
            by_token: RateLimiter::dashmap_with_clock(
                quota(settings.token_rate, settings.token_burst),
                clock.clone(),
            ),
            last_prune: Mutex::new(clock.now()),
            clock,
            in_flight: Arc::new(Semaphore::new(
                settings.max_requests_in_flight.max(1) as usize
            )),
            rate_limited: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
        }
    }

    fn limited(&self, scope: Scope, wait: Duration) -> Limited {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
        let nanos = wait.as_nanos();
        let secs = nanos.div_ceil(1_000_000_000).max(1);
        Limited {
            scope,
            retry_after_secs: u64::try_from(secs).unwrap_or(u64::MAX),
        }
    }

    /// Charges one request to `ip`'s source.
    pub fn check_source(&self, ip: IpAddr) -> Result<(), Limited> {
        self.maybe_prune();
        self.by_source
            .check_key(&SourceKey::of(ip))
            .map_err(|not_until| {
                self.limited(Scope::Source, not_until.wait_time_from(self.clock.now()))
            })
    }

    /// Charges one request to the token whose secret is `secret` (valid or not: an
    /// unknown secret gets a bucket of its own, which pruning soon drops).
    pub fn check_token(&self, secret: &str) -> Result<(), Limited> {
        self.by_token
            .check_key(&token_key(secret))
            .map_err(|not_until| {
                self.limited(Scope::Token, not_until.wait_time_from(self.clock.now()))
            })
    }

    /// Drops every key whose bucket is full again, and gives the memory back.
    pub fn prune(&self) {
        self.by_source.retain_recent();
        self.by_source.shrink_to_fit();
        self.by_token.retain_recent();
        self.by_token.shrink_to_fit();
    }

    fn maybe_prune(&self) {
        // Whoever holds the lock prunes; everyone else goes on.
        let Some(mut last) = self.last_prune.try_lock() else {
            return;
        };
        let now = self.clock.now();
        let due = now.duration_since(*last) >= PRUNE_INTERVAL.into()
            || self.by_source.len() > PRUNE_ABOVE_KEYS
            || self.by_token.len() > PRUNE_ABOVE_KEYS;
        if due {
            *last = now;
            self.prune();
        }
    }

    /// Keys currently held: (sources, tokens).
    pub fn tracked_keys(&self) -> (usize, usize) {
        (self.by_source.len(), self.by_token.len())
    }

    /// Requests refused with 429 so far.
    pub fn rate_limited_total(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    /// Requests refused with 503 because too many were in flight.
    pub fn overloaded_total(&self) -> u64 {
        self.overloaded.load(Ordering::Relaxed)
    }
}

/// Open connections, in total and per source.
pub struct ConnectionLimits {
    max_total: usize,
    max_per_source: u32,
    // Only sources with an open connection have an entry, so the map is bounded by
    // `max_total`.
    open: Mutex<(usize, HashMap<SourceKey, u32>)>,
    refused: AtomicU64,
}

/// Held by an open connection; closing it frees the slot.
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    source: SourceKey,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock();
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.source);
            }
        }
    }
}

impl ConnectionLimits {
    pub fn new(settings: &LimitsSection) -> ConnectionLimits {
        ConnectionLimits {
            max_total: settings.max_connections.max(1) as usize,
            max_per_source: settings.max_connections_per_source.max(1),
            open: Mutex::new((0, HashMap::new())),
            refused: AtomicU64::new(0),
        }
    }

    /// A slot for a new connection from `ip`, if one is free.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionPermit> {
        let source = SourceKey::of(ip);
        let mut open = self.open.lock();
        let from_source = open.1.get(&source).copied().unwrap_or(0);
        if open.0 >= self.max_total || from_source >= self.max_per_source {
            drop(open);
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        open.0 += 1;
        *open.1.entry(source).or_insert(0) += 1;
        Some(ConnectionPermit {
            limits: self.clone(),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().0
    }

    /// Connections closed at accept because a limit was reached.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Every limit of the API, built once from `[limits]`.
#[derive(Clone)]
pub struct ApiLimits {
    pub requests: Arc<RequestLimits>,
    pub connections: Arc<ConnectionLimits>,
}

impl ApiLimits {
    pub fn new(settings: &LimitsSection) -> ApiLimits {
        ApiLimits {
            requests: Arc::new(RequestLimits::new(settings)),
            connections: Arc::new(ConnectionLimits::new(settings)),
        }
    }
}

impl Default for ApiLimits {
    fn default() -> ApiLimits {
        ApiLimits::new(&LimitsSection::default())
    }
}

fn error_response(status: StatusCode, code: &str, message: String, retry_after: u64) -> Response {
    let body = ApiError {
        error: code.to_owned(),
        message,
    };
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

impl IntoResponse for Limited {
    fn into_response(self) -> Response {
        let who = match self.scope {
            Scope::Source => "this source address",
            Scope::Token => "this token",
        };
        error_response(
            StatusCode::TOO_MANY_REQUESTS,
            codes::RATE_LIMITED,
            format!(
                "too many requests from {who}; retry in {} s",
                self.retry_after_secs
            ),
            self.retry_after_secs,
        )
    }
}

/// The bearer secret as sent, without judging it (the handlers do that).
fn presented_secret(req: &Request) -> Option<&str> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, secret) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(secret.trim())
        .filter(|s| !s.is_empty())
}

/// Middleware: the request-rate and in-flight gates, in front of every handler.
///
/// Requests without [`ConnectInfo`] (a router driven directly, not through
/// [`crate::api::serve`]) have no source and skip the source check.
pub async fn enforce(
    State(limits): State<Arc<RequestLimits>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(ConnectInfo(addr)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
        if let Err(limited) = limits.check_source(addr.ip()) {
            tracing::debug!(source = %addr.ip(), "request over the source rate limit");
            return limited.into_response();
        }
    }
    if let Some(secret) = presented_secret(&req) {
        if let Err(limited) = limits.check_token(secret) {
            tracing::debug!("request over the token rate limit");
            return limited.into_response();
        }
    }
    let permit = match tokio::time::timeout(
        IN_FLIGHT_WAIT,
        limits.in_flight.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(permit)) => permit,
        // Timed out, or the semaphore was closed (never done; treated alike).
        _ => {
            limits.overloaded.fetch_add(1, Ordering::Relaxed);
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::OVERLOADED,
                "too many requests in flight; retry shortly".into(),
                1,
            );
        }
    };
    let response = next.run(req).await;
    drop(permit);
    response
}

/// Accepts a TCP connection only while the connection limits allow it, before TLS.
#[derive(Clone)]
pub struct LimitedAcceptor {
    limits: Arc<ConnectionLimits>,
}

impl LimitedAcceptor {
    pub fn new(limits: Arc<ConnectionLimits>) -> LimitedAcceptor {
        LimitedAcceptor { limits }
    }
}

impl<S> Accept<TcpStream, S> for LimitedAcceptor {
    type Stream = LimitedStream;
    type Service = S;
    type Future = Ready<io::Result<(LimitedStream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let result = stream.peer_addr().and_then(|addr| {
            match self.limits.try_open(addr.ip()) {
                Some(permit) => Ok((
                    LimitedStream {
                        inner: stream,
                        _permit: permit,
                    },
                    service,
                )),
                // Dropping the stream closes it.
                None => Err(io::Error::other(format!(
                    "connection limit reached; closed the connection from {}",
                    addr.ip()
                ))),
            }
        });
        ready(result)
    }
}

/// A TCP stream that holds its connection slot until it is dropped.
pub struct LimitedStream {
    inner: TcpStream,
    _permit: ConnectionPermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn settings() -> LimitsSection {
        LimitsSection {
            token_rate: 10,
            token_burst: 20,
            source_rate: 50,
            source_burst: 100,
            max_connections: 4,
            max_connections_per_source: 2,
            max_requests_in_flight: 8,
        }
    }

    fn limits() -> (RequestLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RequestLimits::with_clock(&settings(), clock.clone()), clock)
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_with_a_whole_second_retry_after() {
        let (l, clock) = limits();
        for _ in 0..20 {
            l.check_token("sct_a").unwrap();
        }
        let refused = l.check_token("sct_a").unwrap_err();
        assert_eq!(refused.scope, Scope::Token);
        // One request's worth refills in 100 ms; the header rounds up to a second.
        assert_eq!(refused.retry_after_secs, 1);
        // Another token is not affected.
        l.check_token("sct_b").unwrap();
        clock.advance(Duration::from_millis(100));
        l.check_token("sct_a").unwrap();
        assert!(l.check_token("sct_a").is_err());
        // After a quiet second, ten more.
        clock.advance(Duration::from_secs(1));
        for _ in 0..10 {
            l.check_token("sct_a").unwrap();
        }
        assert!(l.check_token("sct_a").is_err());
        assert_eq!(l.rate_limited_total(), 3);
    }

    #[test]
    fn retry_after_is_whole_seconds_and_never_zero() {
        let s = LimitsSection {
            token_rate: 1,
            token_burst: 1,
            ..settings()
        };
        let clock = FakeRelativeClock::default();
        let l = RequestLimits::with_clock(&s, clock.clone());
        l.check_token("sct_a").unwrap();
        assert_eq!(l.check_token("sct_a").unwrap_err().retry_after_secs, 1);
        // 10 ms left still reads as one second, not zero.
        clock.advance(Duration::from_millis(990));
        assert_eq!(l.check_token("sct_a").unwrap_err().retry_after_secs, 1);
        clock.advance(Duration::from_millis(10));
        l.check_token("sct_a").unwrap();
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_slash_64s() {
        let (l, _clock) = limits();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        for i in 0..100 {
            l.check_source(if i % 2 == 0 { a } else { b }).unwrap();
        }
        assert_eq!(l.check_source(b).unwrap_err().scope, Scope::Source);
        l.check_source(other).unwrap();
        // An IPv4-mapped IPv6 address is the IPv4 source.
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        for _ in 0..100 {
            l.check_source(mapped).unwrap();
        }
        assert!(l.check_source(v4).is_err());
    }

    #[test]
    fn idle_keys_are_pruned_so_the_maps_stay_bounded() {
        let (l, clock) = limits();
        for i in 0..1000u32 {
            l.check_token(&format!("sct_{i}")).unwrap();
            l.check_source(IpAddr::from(i.to_be_bytes())).unwrap();
        }
        assert_eq!(l.tracked_keys(), (1000, 1000));
        // A key whose bucket is still being refilled stays.
        for _ in 0..20 {
            let _ = l.check_token("sct_busy");
        }
        clock.advance(Duration::from_millis(500));
        l.prune();
        assert_eq!(l.tracked_keys(), (0, 1));
        // The interval prunes on its own, driven by requests.
        for i in 0..100u32 {
            l.check_token(&format!("sct_again_{i}")).unwrap();
        }
        clock.advance(PRUNE_INTERVAL);
        l.check_source("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(l.tracked_keys(), (1, 0));
    }

    #[test]
    fn connections_are_bounded_per_source_and_in_total() {
        let c = Arc::new(ConnectionLimits::new(&settings()));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let d: IpAddr = "192.0.2.3".parse().unwrap();
        let a1 = c.try_open(a).unwrap();
        let _a2 = c.try_open(a).unwrap();
        assert!(c.try_open(a).is_none(), "a third from one source");
        let _b1 = c.try_open(b).unwrap();
        let _b2 = c.try_open(b).unwrap();
        assert!(c.try_open(d).is_none(), "a fifth in total");
        assert_eq!(c.refused_total(), 2);
        drop(a1);
        assert_eq!(c.open(), 3);
        let _a3 = c.try_open(a).unwrap();
        assert!(c.try_open(d).is_none());
    }
}
