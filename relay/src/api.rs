//! The control API: agents register WireGuard peers here and get addresses back.
//!
//! HTTP only: parsing, authentication, status codes and JSON. Every change to
//! peers goes through [`crate::service::PeerService`], which sequences it against
//! racing changes and keeps the data plane equal to the store.
//!
//! HTTPS only (see [`crate::tls`]), bearer tokens from the store, JSON in and out.
//! Every error, including axum's own rejections and unknown routes, leaves as
//! `{"error": code, "message": text}` with a stable code from
//! [`sidecar_proto::codes`]. The OpenAPI document at `/api/openapi.json` is
//! generated from the handler annotations below, so it cannot drift from the code.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use sidecar::{Endpoint, Key};
use sidecar_proto::{
    codes, Allocation, ApiError, ContainerPeer, CreateToken, CreatedToken, DeletePeer, Health,
    Limits, PeerList, PeerView, RegisterRequest, Registered, RevokeToken, Status, TokenInfo,
    TokenList, UpdateToken, Usage, TOKEN_PREFIX,
};

mod body_limit;
mod canary_route;
mod common_responses;
mod device_routes;
mod discovery_routes;
mod pq_routes;
mod scopes;
pub use device_routes::DeviceLogin;
pub use scopes::{Admin, PeersAdder, PeersReader};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::limits::{self, ApiLimits, LimitedAcceptor};
use crate::machine::MachineKeys;
use crate::metrics::ApiMetrics;
use crate::service::PeerService;
use crate::store::{
    PeerRecord, Registration, Scope, Store, StoreError, TokenChange, TokenRecord, TokenSpec,
};

/// Request bodies are a few hundred bytes; anything much larger is a mistake or abuse.
pub const BODY_LIMIT: usize = 16 * 1024;
/// How long in-flight requests get to finish once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A connection must send its first request this soon after the TLS handshake,
/// so idle connections cannot pile up.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const BEARER_CHALLENGE: &str = r#"Bearer realm="sidecar""#;

/// What every allocation tells the agent about this relay.
#[derive(Debug, Clone)]
pub struct RelayInfo {
    pub public_key: Key,
    /// Where the agent sends WireGuard packets.
    pub endpoint: Endpoint,
    pub keepalive: u16,
    pub mtu: u16,
    pub version: &'static str,
}

/// Shared by all handlers.
pub struct ApiState {
    service: PeerService,
    info: RelayInfo,
    started: Instant,
    draining: AtomicBool,
    /// The relay's own echo probe through the data path, for by-container.
    prober: Option<Arc<crate::probe::Prober>>,
    machine_keys: Option<Arc<MachineKeys>>,
    /// Where the signed warrant canary is (`GET /v1/canary`).
    canary: Option<PathBuf>,
    /// The relay's public URL and pin, for `/.well-known/` and the 401 challenge.
    discovery: Option<Arc<crate::discovery::Discovery>>,
    /// When each token last authenticated (Unix seconds), since this start. Only
    /// valid tokens get an entry, so it is bounded by the number of tokens.
    last_used: parking_lot::Mutex<foldhash::HashMap<String, u64>>,
    /// Device logins waiting for an operator, and how approved ones are made.
    device: DeviceLogin,
}

/// `up` in by-container: a handshake within this long.
pub const UP_WITHIN: Duration = Duration::from_secs(180);

impl ApiState {
    pub fn new(service: PeerService, info: RelayInfo) -> ApiState {
        ApiState {
            service,
            info,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            prober: None,
            machine_keys: None,
            canary: None,
            discovery: None,
            last_used: Default::default(),
            device: DeviceLogin::default(),
        }
    }

    /// A token as the admin routes show it: its usage and last use, never its secret.
    fn token_info(&self, record: TokenRecord) -> Result<TokenInfo, ErrorResponse> {
        let usage = self.store().usage(&record.id).map_err(|e| match e {
            StoreError::NotFound => ErrorResponse::new(
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
                "no token with this id",
            ),
            other => other.into(),
        })?;
        let last_used = self.last_used.lock().get(&record.id).copied();
        Ok(TokenInfo {
            limits: Limits {
                max_peers: record.max_peers,
                max_ipv4: record.max_ipv4,
                bandwidth_mbps: record.bandwidth_mbps,
            },
            usage: Usage {
                peers: usage.peers,
                ipv4: usage.ipv4,
            },
            admin: record.has_scope(Scope::Admin),
            scopes: record.scopes(),
            isolate_peers: record.isolate_peers,
            bind_machine: record.bind_machine,
            bound: record.machine.is_some(),
            created: record.created,
            last_used,
            id: record.id,
            name: record.name,
        })
    }

    /// Serves the warrant canary kept at `path` (re-read on each request, so
    /// `sidecar-relay canary sign` takes effect without a restart).
    pub fn with_canary(self, path: PathBuf) -> ApiState {
        ApiState {
            canary: Some(path),
            ..self
        }
    }

    /// Device login as `device` sets it up (by default: `[device_login]`'s defaults,
    /// the verification URL from each request's `Host`).
    pub fn with_device_login(self, device: DeviceLogin) -> ApiState {
        ApiState { device, ..self }
    }

    /// Serves the discovery documents and names the resource metadata in every 401.
    pub fn with_discovery(self, discovery: crate::discovery::Discovery) -> ApiState {
        ApiState {
            discovery: Some(Arc::new(discovery)),
            ..self
        }
    }

    /// Answers by-container's `externally_reachable` with `prober`.
    pub fn with_prober(mut self, prober: Option<Arc<crate::probe::Prober>>) -> ApiState {
        self.prober = prober;
        self
    }

    /// Hands out per-token machine keys from `keys` (`GET /v1/machine`).
    pub fn with_machine_keys(self, keys: Arc<MachineKeys>) -> ApiState {
        ApiState {
            machine_keys: Some(keys),
            ..self
        }
    }

    pub fn machine_keys(&self) -> Option<&Arc<MachineKeys>> {
        self.machine_keys.as_ref()
    }

    /// From now on, refuse new registrations (503 `draining`) and report
    /// `draining` on `/v1/health`, so load balancers and agents move elsewhere
    /// while existing peers keep working.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn store(&self) -> &Store {
        self.service.store()
    }

    pub fn service(&self) -> &PeerService {
        &self.service
    }

    pub fn info(&self) -> &RelayInfo {
        &self.info
    }
}

/// An error response: an HTTP status plus the JSON body clients see.
#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ErrorResponse {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ErrorResponse {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ErrorResponse {
        ErrorResponse {
            status,
            code,
            message: message.into(),
        }
    }

    fn unauthorized(message: impl Into<String>) -> ErrorResponse {
        ErrorResponse::new(StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED, message)
    }

    fn invalid_pubkey(message: impl Into<String>) -> ErrorResponse {
        ErrorResponse::new(StatusCode::BAD_REQUEST, codes::INVALID_PUBKEY, message)
    }

    /// The client learns nothing about the cause; the log gets the details.
    fn internal() -> ErrorResponse {
        ErrorResponse::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            "internal error; see the relay's log",
        )
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn code(&self) -> &'static str {
        self.code
    }
}

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let body = ApiError {
            error: self.code.to_owned(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ErrorResponse {
    fn from(err: StoreError) -> ErrorResponse {
        match err {
            StoreError::Quota { limit, max } => ErrorResponse::new(
                StatusCode::FORBIDDEN,
                codes::QUOTA_EXCEEDED,
                format!("quota exceeded: this token's {limit} limit is {max}"),
            ),
            StoreError::Ipv4Unavailable => ErrorResponse::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::IPV4_UNAVAILABLE,
                err.to_string(),
            ),
            StoreError::PoolExhausted { family } => ErrorResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::POOL_EXHAUSTED,
                format!("this relay has no free {family} address left"),
            ),
            StoreError::Conflict => {
                ErrorResponse::new(StatusCode::CONFLICT, codes::CONFLICT, err.to_string())
            }
            StoreError::NotFound => {
                ErrorResponse::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, err.to_string())
            }
            // Revoked between authentication and the store call.
            StoreError::UnknownToken => ErrorResponse::unauthorized("unknown or revoked token"),
            StoreError::Invalid(message) => ErrorResponse::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::INVALID_REQUEST,
                message,
            ),
            other => {
                tracing::error!(error = %other, "store failure");
                ErrorResponse::internal()
            }
        }
    }
}

/// `Json<T>` whose rejections use the API's error shape and codes.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ErrorResponse;

    async fn from_request(req: Request, state: &S) -> Result<Self, ErrorResponse> {
        // Two steps so the body is still at hand when decoding fails: axum checks
        // the content type, the size and the syntax, then the typed decode runs.
        let Json(raw) = Json::<Box<RawValue>>::from_request(req, state)
            .await
            .map_err(json_rejection)?;
        let body = raw.get().as_bytes();
        match Json::<T>::from_bytes(body) {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                Err(bad_pubkey(&rejection, body).unwrap_or_else(|| json_rejection(rejection)))
            }
        }
    }
}

/// A body whose `pubkey` is a string but not a WireGuard key gets `invalid_pubkey`
/// (400) rather than the generic `invalid_request` (422): agents tell "my key is
/// wrong" apart from "my request is wrong". Only looked at once decoding failed;
/// when another field is wrong too, the key is what gets reported.
fn bad_pubkey(rejection: &JsonRejection, body: &[u8]) -> Option<ErrorResponse> {
    if !matches!(rejection, JsonRejection::JsonDataError(_)) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = value.get("pubkey")?.as_str()?;
    let err = Key::from_base64(text).err()?;
    Some(ErrorResponse::invalid_pubkey(format!(
        "pubkey must be base64 of 32 bytes: {err}"
    )))
}

fn json_rejection(rejection: JsonRejection) -> ErrorResponse {
    let status = rejection.status();
    let code = match &rejection {
        JsonRejection::JsonDataError(_) => codes::INVALID_REQUEST,
        JsonRejection::JsonSyntaxError(_) => codes::BAD_REQUEST,
        JsonRejection::MissingJsonContentType(_) => codes::UNSUPPORTED_MEDIA_TYPE,
        // Body read failures: the length limit (413) or a broken connection.
        _ => code_for_status(status),
    };
    ErrorResponse::new(status, code, rejection.body_text())
}

/// Codes for errors that did not come from our own handlers (axum rejections,
/// routing), keyed by their status.
fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => codes::UNAUTHORIZED,
        StatusCode::FORBIDDEN => codes::FORBIDDEN,
        StatusCode::NOT_FOUND => codes::NOT_FOUND,
        StatusCode::METHOD_NOT_ALLOWED => codes::METHOD_NOT_ALLOWED,
        StatusCode::CONFLICT => codes::CONFLICT,
        StatusCode::PAYLOAD_TOO_LARGE => codes::PAYLOAD_TOO_LARGE,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => codes::UNSUPPORTED_MEDIA_TYPE,
        StatusCode::UNPROCESSABLE_ENTITY => codes::INVALID_REQUEST,
        s if s.is_server_error() => codes::INTERNAL,
        _ => codes::BAD_REQUEST,
    }
}

/// Where the auth extractor leaves the token id for the request log, which
/// otherwise never sees who the caller was.
#[derive(Clone, Default)]
struct TokenSlot(Arc<OnceLock<String>>);

/// The authenticated caller's token.
pub struct Caller(pub TokenRecord);

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ErrorResponse;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ErrorResponse> {
        let secret = bearer_secret(&parts.headers)?;
        let token = state
            .store()
            .authenticate(secret)?
            .ok_or_else(|| ErrorResponse::unauthorized("unknown or revoked token"))?;
        if let Some(slot) = parts.extensions.get::<TokenSlot>() {
            let _ = slot.0.set(token.id.clone());
        }
        state
            .last_used
            .lock()
            .insert(token.id.clone(), crate::service::unix_now());
        Ok(Caller(token))
    }
}

fn bearer_secret(headers: &HeaderMap) -> Result<&str, ErrorResponse> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ErrorResponse::unauthorized("missing bearer token"))?
        .to_str()
        .map_err(|_| ErrorResponse::unauthorized("the authorization header is not valid text"))?;
    let (scheme, secret) = value.split_once(' ').ok_or_else(|| {
        ErrorResponse::unauthorized("the authorization header must be 'Bearer <token>'")
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ErrorResponse::unauthorized(
            "the authorization header must be 'Bearer <token>'",
        ));
    }
    let secret = secret.trim();
    if !secret.starts_with(TOKEN_PREFIX) {
        return Err(ErrorResponse::unauthorized(format!(
            "token must start with {TOKEN_PREFIX}"
        )));
    }
    Ok(secret)
}

/// What a well-formed key must still be to name a peer of this relay.
fn check_pubkey(key: Key, info: &RelayInfo) -> Result<Key, ErrorResponse> {
    if key.is_zero() {
        return Err(ErrorResponse::invalid_pubkey(
            "pubkey must not be all zeros",
        ));
    }
    if key == info.public_key {
        return Err(ErrorResponse::invalid_pubkey(
            "pubkey is the relay's own key",
        ));
    }
    Ok(key)
}

fn allocation(peer: &PeerRecord, info: &RelayInfo, created: bool) -> Allocation {
    Allocation {
        pubkey: peer.public_key,
        ipv6: peer.ipv6,
        ipv4: peer.ipv4,
        relay_public_key: info.public_key,
        relay_endpoint: info.endpoint.clone(),
        keepalive: info.keepalive,
        mtu: info.mtu,
        created,
    }
}

/// The stored view, with the data plane's live counters when it has them (the
/// store only holds what was last persisted).
fn peer_view(peer: &PeerRecord, state: &ApiState) -> PeerView {
    let (last_handshake, rx_bytes, tx_bytes) = state
        .service
        .peer_stats(&peer.public_key)
        .unwrap_or((peer.last_handshake, peer.rx_bytes, peer.tx_bytes));
    let Allocation {
        pubkey,
        ipv6,
        ipv4,
        relay_public_key,
        relay_endpoint,
        keepalive,
        mtu,
        ..
    } = allocation(peer, &state.info, false);
    PeerView {
        pubkey,
        ipv6,
        ipv4,
        relay_public_key,
        relay_endpoint,
        keepalive,
        mtu,
        name: peer.name.clone(),
        container: peer.container.clone(),
        created: peer.created,
        last_handshake,
        rx_bytes,
        tx_bytes,
    }
}

/// by-container's plain view: `up` from the latest handshake, `externally_reachable`
/// from the relay's own echo probe (skipped while the peer is not up: no reply can
/// come through a tunnel without a session).
async fn container_peer(peer: &PeerRecord, state: &ApiState) -> ContainerPeer {
    let v = peer_view(peer, state);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let up = v
        .last_handshake
        .is_some_and(|t| now.saturating_sub(t) <= UP_WITHIN.as_secs());
    let externally_reachable = match (&state.prober, up) {
        (Some(p), true) => p.reachable(v.ipv6).await,
        _ => false,
    };
    ContainerPeer {
        pubkey: v.pubkey,
        ipv6: v.ipv6,
        ipv4: v.ipv4,
        relay_public_key: v.relay_public_key,
        relay_endpoint: v.relay_endpoint,
        keepalive: v.keepalive,
        mtu: v.mtu,
        name: v.name,
        container: v.container,
        created: v.created,
        last_handshake: v.last_handshake,
        rx_bytes: v.rx_bytes,
        tx_bytes: v.tx_bytes,
        up,
        externally_reachable,
    }
}

#[utoipa::path(
    get, path = "/v1/health", tag = "relay",
    summary = "Liveness and drain state (no authentication)",
    security(()),
    responses((status = 200, description = "The relay is up", body = Health)),
)]
async fn health(State(state): State<Arc<ApiState>>) -> Json<Health> {
    let status = if state.is_draining() {
        "draining"
    } else {
        "ok"
    };
    Json(Health {
        status: status.to_owned(),
        version: state.info.version.to_owned(),
        peers: state.store().peer_count(),
        uptime_secs: state.started.elapsed().as_secs(),
    })
}

#[utoipa::path(
    get, path = "/v1/status", tag = "relay",
    summary = "The calling token's limits and usage",
    security(("bearer" = ["peers:read"])),
    responses(
        (status = 200, description = "Limits and usage", body = Status),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the peers:read scope", body = ApiError),
    ),
)]
async fn status(
    State(state): State<Arc<ApiState>>,
    PeersReader(token): PeersReader,
) -> Result<Json<Status>, ErrorResponse> {
    let usage = state.store().usage(&token.id).map_err(|e| match e {
        // Revoked since authentication.
        StoreError::NotFound => ErrorResponse::unauthorized("unknown or revoked token"),
        other => other.into(),
    })?;
    Ok(Json(Status {
        token_id: token.id,
        name: token.name,
        limits: Limits {
            max_peers: token.max_peers,
            max_ipv4: token.max_ipv4,
            bandwidth_mbps: token.bandwidth_mbps,
        },
        usage: Usage {
            peers: usage.peers,
            ipv4: usage.ipv4,
        },
    }))
}

#[utoipa::path(
    post, path = "/v1/peers", tag = "peers",
    summary = "Register a WireGuard public key (idempotent)",
    security(("bearer" = ["peers:add"])),
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered; addresses allocated", body = Registered),
        (status = 200, description = "Already registered; the existing allocation", body = Registered),
        (status = 400, description = "Malformed JSON or public key", body = ApiError),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the peers:add scope; quota_exceeded: max_peers or max_ipv4 reached; pq_required: no X-Wing ciphertext on a relay that requires one; machine_mismatch / machine_required: the token is bound to another machine", body = ApiError),
        (status = 409, description = "The key or container belongs to another registration", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 415, description = "Body is not application/json", body = ApiError),
        (status = 422, description = "Missing or invalid field, or no IPv4 on this relay", body = ApiError),
        (status = 503, description = "draining, or an address pool is exhausted", body = ApiError),
    ),
)]
async fn register_peer(
    State(state): State<Arc<ApiState>>,
    PeersAdder(token): PeersAdder,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<Registered>), ErrorResponse> {
    if state.is_draining() {
        return Err(ErrorResponse::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::DRAINING,
            "this relay is shutting down and accepts no new peers",
        ));
    }
    let extras = pq_routes::extras(&state, &req)?;
    let req = req.peer;
    let registration = Registration {
        public_key: check_pubkey(req.pubkey, &state.info)?,
        ipv4: req.ipv4,
        name: req.name,
        container: req.container,
    };
    let (peer, created) = state
        .service
        .register_with(&token, registration, extras)
        .await
        .map_err(|e| pq_routes::machine_error(&e, &token.id).unwrap_or_else(|| e.into()))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let pq = pq_routes::grant(&state, &peer);
    Ok((
        status,
        Json(Registered {
            allocation: allocation(&peer, &state.info, created),
            pq,
        }),
    ))
}

#[utoipa::path(
    get, path = "/v1/peers", tag = "peers",
    summary = "This token's peers (an admin token sees every peer)",
    security(("bearer" = ["peers:read"])),
    responses(
        (status = 200, description = "Peers with live counters", body = PeerList),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the peers:read scope", body = ApiError),
    ),
)]
async fn list_peers(
    State(state): State<Arc<ApiState>>,
    PeersReader(token): PeersReader,
) -> Result<Json<PeerList>, ErrorResponse> {
    let scope = (!token.has_scope(Scope::Admin)).then_some(token.id.as_str());
    let peers = state.store().peers(scope)?;
    Ok(Json(PeerList {
        peers: peers.iter().map(|p| peer_view(p, &state)).collect(),
    }))
}

#[utoipa::path(
    get, path = "/v1/peers/by-container/{id}", tag = "peers",
    summary = "This token's peer registered for a container",
    security(("bearer" = ["peers:read"])),
    params(("id" = String, Path, description = "Container id given at registration")),
    responses(
        (status = 200, description = "The peer, its bare addresses, and whether it is up and reachable", body = ContainerPeer),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the peers:read scope", body = ApiError),
        (status = 404, description = "No peer for this container and token", body = ApiError),
    ),
)]
async fn peer_by_container(
    State(state): State<Arc<ApiState>>,
    PeersReader(token): PeersReader,
    Path(id): Path<String>,
) -> Result<Json<ContainerPeer>, ErrorResponse> {
    match state.store().peer_by_container(&token.id, &id)? {
        Some(peer) => Ok(Json(container_peer(&peer, &state).await)),
        None => Err(ErrorResponse::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "no peer is registered for this container",
        )),
    }
}

#[utoipa::path(
    delete, path = "/v1/peers", tag = "peers",
    summary = "Remove one of this token's peers and free its addresses",
    security(("bearer" = ["peers:add"])),
    request_body = DeletePeer,
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "Malformed JSON or public key", body = ApiError),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the peers:add scope", body = ApiError),
        (status = 404, description = "This token has no such peer", body = ApiError),
    ),
)]
async fn delete_peer(
    State(state): State<Arc<ApiState>>,
    PeersAdder(token): PeersAdder,
    ApiJson(req): ApiJson<DeletePeer>,
) -> Result<StatusCode, ErrorResponse> {
    let key = check_pubkey(req.pubkey, &state.info)?;
    match state.service.delete(&token.id, &key).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ErrorResponse::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "this token has no peer with that public key",
        )),
    }
}

#[utoipa::path(
    post, path = "/v1/admin/tokens", tag = "admin",
    summary = "Create an API token with its scopes (the secret is returned only once)",
    security(("bearer" = ["admin"])),
    request_body = CreateToken,
    responses(
        (status = 201, description = "Created", body = CreatedToken),
        (status = 400, description = "Malformed JSON", body = ApiError),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 415, description = "Body is not application/json", body = ApiError),
        (status = 422, description = "Missing or invalid field, unknown scope, or no scope", body = ApiError),
    ),
)]
async fn create_token(
    State(state): State<Arc<ApiState>>,
    Admin(_admin): Admin,
    ApiJson(req): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ErrorResponse> {
    let bind_machine = req.bind_machine;
    let scopes = req.scopes.clone();
    let (record, token) = state
        .store()
        .create_scoped_token(TokenSpec::from(req), bind_machine, scopes)
        .await?;
    tracing::info!(token_id = %record.id, name = %record.name, scopes = %Scope::join(&record.scopes()), "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: record.id,
            token,
        }),
    ))
}

#[utoipa::path(
    get, path = "/v1/admin/tokens", tag = "admin",
    summary = "Every token with its scopes, limits, usage and last use (never a secret)",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "All tokens, oldest first", body = TokenList),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
    ),
)]
async fn list_tokens(
    State(state): State<Arc<ApiState>>,
    Admin(_admin): Admin,
) -> Result<Json<TokenList>, ErrorResponse> {
    let mut tokens = Vec::new();
    for record in state.store().tokens()? {
        match state.token_info(record) {
            Ok(info) => tokens.push(info),
            // Revoked while we listed.
            Err(e) if e.status() == StatusCode::NOT_FOUND => continue,
            Err(e) => return Err(e),
        }
    }
    tokens.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    Ok(Json(TokenList { tokens }))
}

#[utoipa::path(
    patch, path = "/v1/admin/tokens", tag = "admin",
    summary = "Change a token's name, limits, isolation or scopes (its live peers follow at once)",
    security(("bearer" = ["admin"])),
    request_body = UpdateToken,
    responses(
        (status = 200, description = "The token as it is now", body = TokenInfo),
        (status = 400, description = "Malformed JSON", body = ApiError),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
        (status = 404, description = "No such token", body = ApiError),
        (status = 409, description = "A token cannot take the admin scope from itself", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 415, description = "Body is not application/json", body = ApiError),
        (status = 422, description = "Missing or invalid field, unknown scope, or no scope", body = ApiError),
    ),
)]
async fn update_token(
    State(state): State<Arc<ApiState>>,
    Admin(admin): Admin,
    ApiJson(req): ApiJson<UpdateToken>,
) -> Result<Json<TokenInfo>, ErrorResponse> {
    // As with revocation: the last admin token must not lock every operator out.
    if req.id == admin.id
        && req
            .scopes
            .as_ref()
            .is_some_and(|s| !s.contains(&Scope::Admin))
    {
        return Err(ErrorResponse::new(
            StatusCode::CONFLICT,
            codes::CONFLICT,
            "a token cannot take the admin scope from itself",
        ));
    }
    let change = TokenChange {
        name: req.name,
        max_peers: req.max_peers,
        max_ipv4: req.max_ipv4,
        bandwidth_mbps: req.bandwidth_mbps,
        isolate_peers: req.isolate_peers,
        scopes: req.scopes,
    };
    let record = state
        .service
        .update_token(&req.id, change)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ErrorResponse::new(
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
                "no token with this id",
            ),
            other => other.into(),
        })?;
    tracing::info!(token_id = %record.id, name = %record.name, max_peers = record.max_peers, max_ipv4 = record.max_ipv4, bandwidth_mbps = ?record.bandwidth_mbps, isolate_peers = record.isolate_peers, scopes = %Scope::join(&record.scopes()), "token changed");
    Ok(Json(state.token_info(record)?))
}

#[utoipa::path(
    delete, path = "/v1/admin/tokens", tag = "admin",
    summary = "Revoke a token and remove all of its peers at once",
    security(("bearer" = ["admin"])),
    request_body = RevokeToken,
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "Malformed JSON", body = ApiError),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
        (status = 404, description = "No such token", body = ApiError),
        (status = 409, description = "A token cannot revoke itself", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 415, description = "Body is not application/json", body = ApiError),
        (status = 422, description = "Missing or invalid field", body = ApiError),
    ),
)]
async fn revoke_token(
    State(state): State<Arc<ApiState>>,
    Admin(admin): Admin,
    ApiJson(req): ApiJson<RevokeToken>,
) -> Result<StatusCode, ErrorResponse> {
    // Revoking the last admin token would lock every operator out until someone
    // edits the store by hand.
    if req.id == admin.id {
        return Err(ErrorResponse::new(
            StatusCode::CONFLICT,
            codes::CONFLICT,
            "a token cannot revoke itself",
        ));
    }
    let removed = state
        .service
        .revoke_token(&req.id)
        .await
        .map_err(|e| match e {
            StoreError::NotFound => ErrorResponse::new(
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
                "no token with this id",
            ),
            other => other.into(),
        })?;
    state.last_used.lock().remove(&req.id);
    tracing::info!(token_id = %req.id, peers_removed = removed.len(), "token revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// The serialized OpenAPI document, built once with the router.
#[derive(Clone)]
struct OpenApiJson(Bytes);

#[utoipa::path(
    get, path = "/api/openapi.json", tag = "relay",
    summary = "This document",
    security(()),
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")),
)]
async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], doc.0)
}

async fn not_found(uri: Uri) -> ErrorResponse {
    ErrorResponse::new(
        StatusCode::NOT_FOUND,
        codes::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sidecar relay control API",
        description = "Register WireGuard peers and get a routable IPv6 /128 (and optionally an IPv4 /32) for each. \
                       Every error is `{\"error\": code, \"message\": text}`."
    ),
    modifiers(&BearerScheme),
    tags(
        (name = "relay", description = "Relay state"),
        (name = "peers", description = "WireGuard peers and their addresses"),
        (name = "device", description = "Device login (RFC 8628): ask for a token, an admin approves it"),
        (name = "admin", description = "Token management and device approvals (admin tokens only)"),
        (name = "discovery", description = "Documents for automated installers and OAuth clients"),
    ),
)]
struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(format!("An API token starting with {TOKEN_PREFIX}")))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document for the routes [`router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes_and_document().1
}

fn routes_and_document() -> (Router<Arc<ApiState>>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = api_routes().split_for_parts();
    common_responses::add(&mut doc);
    (router, doc)
}

fn api_routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health))
        .routes(routes!(status))
        .routes(routes!(register_peer, list_peers, delete_peer))
        .routes(routes!(peer_by_container))
        .routes(routes!(
            create_token,
            list_tokens,
            update_token,
            revoke_token
        ))
        .routes(routes!(pq_routes::pq_info))
        .routes(routes!(pq_routes::machine_key))
        .routes(routes!(pq_routes::unbind_machine))
        .routes(routes!(canary_route::canary))
        .routes(routes!(device_routes::authorize))
        .routes(routes!(device_routes::token))
        .routes(routes!(device_routes::list))
        .routes(routes!(device_routes::view))
        .routes(routes!(device_routes::approve))
        .routes(routes!(device_routes::deny))
        .routes(routes!(openapi_json))
        .routes(routes!(discovery_routes::authorization_server))
        .routes(routes!(discovery_routes::protected_resource))
        .routes(routes!(discovery_routes::onboarding))
        .routes(routes!(discovery_routes::agent_card))
}

/// The control API with all its middleware and the default [`ApiLimits`], ready for
/// [`serve`].
pub fn router(state: Arc<ApiState>) -> Router {
    router_with_limits(state, &ApiLimits::default())
}

/// The control API with all its middleware, its request rates and in-flight bound
/// from `limits`; serve it with [`serve_with_limits`] and the same `limits`.
pub fn router_with_limits(state: Arc<ApiState>, limits: &ApiLimits) -> Router {
    router_with_metrics(state, limits, Arc::default())
}

/// [`router_with_limits`] counting every request into `metrics` (by route template
/// and status, with its latency), 429s and 404s included.
pub fn router_with_metrics(
    state: Arc<ApiState>,
    limits: &ApiLimits,
    metrics: Arc<ApiMetrics>,
) -> Router {
    let (router, doc) = routes_and_document();
    // Only a matched route knows its template; it hands it to `count` outside.
    let router = router.route_layer(middleware::from_fn(note_route));
    // Serializing our own static document cannot fail; if it ever did, the
    // relay must not start with a broken API description.
    let doc = serde_json::to_vec(&doc).expect("the OpenAPI document serializes");
    router
        .merge(crate::install::routes())
        .merge(crate::ui::routes())
        .fallback(not_found)
        .layer(Extension(OpenApiJson(Bytes::from(doc))))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(body_limit::read_bounded))
        .layer(middleware::from_fn_with_state(
            limits.requests.clone(),
            limits::enforce,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), outcome))
        .layer(middleware::from_fn_with_state(metrics, count))
        .with_state(state)
}

/// The route template of the request, filled in once routing matched one.
#[derive(Clone, Default)]
struct RouteSlot(Arc<OnceLock<String>>);

async fn note_route(matched: MatchedPath, req: Request, next: Next) -> Response {
    if let Some(slot) = req.extensions().get::<RouteSlot>() {
        let _ = slot.0.set(matched.as_str().to_owned());
    }
    next.run(req).await
}

/// Outside every other layer, so requests refused by the limits count too.
async fn count(State(metrics): State<Arc<ApiMetrics>>, mut req: Request, next: Next) -> Response {
    let method = crate::metrics::method_label(req.method());
    let slot = RouteSlot::default();
    req.extensions_mut().insert(slot.clone());
    let started = Instant::now();
    let response = next.run(req).await;
    let route = slot
        .0
        .get()
        .map_or(crate::metrics::UNMATCHED_ROUTE, String::as_str);
    metrics.record(method, route, response.status().as_u16(), started.elapsed());
    response
}

/// Outermost layer: gives every error the JSON shape and the bearer challenge,
/// and logs one line per request (never the token secret, only its id).
async fn outcome(State(state): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let slot = TokenSlot::default();
    req.extensions_mut().insert(slot.clone());
    let started = Instant::now();

    let mut response = json_errors(next.run(req).await).await;
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED {
        let challenge = state.discovery.as_ref().map_or_else(
            || HeaderValue::from_static(BEARER_CHALLENGE),
            |d| d.challenge().clone(),
        );
        response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
    }

    let token_id = slot.0.get().map_or("-", String::as_str);
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    if status.is_server_error() {
        tracing::warn!(%method, %path, status = status.as_u16(), %token_id, elapsed_ms, "api request");
    } else {
        tracing::info!(%method, %path, status = status.as_u16(), %token_id, elapsed_ms, "api request");
    }
    response
}

/// Rewrites error responses that are not JSON yet (axum's plain-text
/// rejections, the empty 405) into the API's error shape, keeping their status
/// and headers such as `Allow`.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Rejection texts are one line; the cap only guards against surprises.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    parts.headers.remove(CONTENT_TYPE);
    parts.headers.remove(CONTENT_LENGTH);
    let body = ApiError {
        error: code_for_status(status).to_owned(),
        message,
    };
    (parts, Json(body)).into_response()
}

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish for up to [`SHUTDOWN_GRACE`] before closing.
/// Connections are bounded by the default [`ApiLimits`].
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with_limits(listener, tls, router, &ApiLimits::default(), shutdown).await
}

/// [`serve`], with the connection limits of `limits`.
pub async fn serve_with_limits(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: &ApiLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let handle = axum_server::Handle::<SocketAddr>::new();
    // Connections over the limit are closed before their TLS handshake costs anything.
    let acceptor = crate::tls::KeyExchangeLog::new(
        RustlsAcceptor::new(RustlsConfig::from_config(tls))
            .acceptor(LimitedAcceptor::new(limits.connections.clone())),
    );
    let server = axum_server::from_tcp(listener)?
        .acceptor(acceptor)
        .handle(handle.clone())
        .first_request_timeout(FIRST_REQUEST_TIMEOUT)
        // Failed handshakes are routine on a public port (scanners); keep them
        // out of the default log level.
        .accept_error_handler(|addr, err| {
            tracing::debug!(peer = ?addr, error = %err, "TLS accept failed");
        });
    let watcher = tokio::spawn(async move {
        shutdown.await;
        handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
    });
    // The source address reaches the rate limits as `ConnectInfo`.
    let result = server
        .serve(router.into_make_service_with_connect_info::<SocketAddr>())
        .await;
    watcher.abort();
    result
}
