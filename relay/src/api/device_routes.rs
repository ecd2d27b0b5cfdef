//! Device login over HTTP (RFC 8628): `/v1/device/authorize` and `/v1/device/token`
//! without a token, the operator's view, approval and denial under `/v1/admin/device`.
//! The state machine is [`crate::device`]; this module maps it to statuses and JSON.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, HOST};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use serde::de::DeserializeOwned;
use sidecar_proto::device::{
    ApproveDevice, DeviceAccessToken, DeviceAuthorization, DeviceAuthorizeRequest, DeviceLoginList,
    DeviceLoginView, DeviceTokenRequest, DEVICE_CODE_GRANT,
};
use sidecar_proto::{codes, ApiError, Scope};

use super::{Admin, ApiJson, ApiState, ErrorResponse};
use crate::config::DeviceLoginSection;
use crate::device::{Approval, AuthorizeError, DecideError, DeviceLogins, PollError};
use crate::limits::SourceKey;
use crate::store::{StoreError, TokenSpec};

/// Where the operator approves: `/device` on the relay's API address.
pub const VERIFICATION_PATH: &str = "/device";

/// Device login's part of [`ApiState`].
pub struct DeviceLogin {
    section: DeviceLoginSection,
    /// `https://HOST:PORT` as clients reach the relay; `None`: taken from the
    /// request's `Host`.
    public_url: Option<String>,
    logins: parking_lot::Mutex<DeviceLogins>,
    rng: ring::rand::SystemRandom,
}

impl DeviceLogin {
    pub fn new(section: DeviceLoginSection, public_url: Option<String>) -> DeviceLogin {
        DeviceLogin {
            logins: parking_lot::Mutex::new(DeviceLogins::new(section.settings())),
            section,
            public_url: public_url.map(|u| u.trim_end_matches('/').to_owned()),
            rng: ring::rand::SystemRandom::new(),
        }
    }
}

impl Default for DeviceLogin {
    fn default() -> DeviceLogin {
        DeviceLogin::new(DeviceLoginSection::default(), None)
    }
}

fn enabled(state: &ApiState) -> Result<&DeviceLogin, ErrorResponse> {
    let device = &state.device;
    if device.section.enabled {
        Ok(device)
    } else {
        Err(ErrorResponse::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "device login is turned off on this relay ([device_login] enabled = false)",
        ))
    }
}

/// A body as JSON or, as OAuth clients send it, `application/x-www-form-urlencoded`.
pub struct JsonOrForm<T>(pub T);

impl<S, T> FromRequest<S> for JsonOrForm<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ErrorResponse;

    async fn from_request(req: Request, state: &S) -> Result<Self, ErrorResponse> {
        let form = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form {
            return ApiJson::from_request(req, state)
                .await
                .map(|ApiJson(v)| JsonOrForm(v));
        }
        match Form::<T>::from_request(req, state).await {
            Ok(Form(v)) => Ok(JsonOrForm(v)),
            Err(rejection) => {
                let status = rejection.status();
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    codes::PAYLOAD_TOO_LARGE
                } else {
                    codes::BAD_REQUEST
                };
                let status = if code == codes::BAD_REQUEST {
                    StatusCode::BAD_REQUEST
                } else {
                    status
                };
                Err(ErrorResponse::new(status, code, rejection.body_text()))
            }
        }
    }
}

/// Token responses must not be cached (RFC 6749 section 5.1).
fn no_store(response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The scope string as asked (space-separated); unknown names are `invalid_scope`.
fn parse_scopes(scope: Option<&str>) -> Result<Vec<Scope>, ErrorResponse> {
    let Some(text) = scope.filter(|s| !s.trim().is_empty()) else {
        return Ok(crate::store::DEFAULT_SCOPES.to_vec());
    };
    let mut scopes = Vec::new();
    for name in text.split_whitespace() {
        let scope = Scope::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or_else(|| {
                ErrorResponse::new(
                    StatusCode::BAD_REQUEST,
                    codes::INVALID_SCOPE,
                    format!(
                        "unknown scope {:?}; scopes are: {}",
                        name.chars().take(40).collect::<String>(),
                        Scope::join(&Scope::ALL)
                    ),
                )
            })?;
        scopes.push(scope);
    }
    Ok(Scope::normalize(scopes))
}

/// `https://HOST:PORT` from the request's `Host`, which must look like one
/// (it ends up in a URL the client shows its user).
fn url_from_host(headers: &HeaderMap) -> Result<String, ErrorResponse> {
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .ok_or_else(|| {
            ErrorResponse::new(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST,
                "the request has no usable Host header to build the verification URL from",
            )
        })?;
    Ok(format!("https://{host}"))
}

/// The caller's source address, as the rate limits count it.
pub struct Source(SourceKey);

impl<S: Send + Sync> FromRequestParts<S> for Source {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Without connection info (a router driven in-process) every caller shares one source.
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |c| c.0.ip());
        Ok(Source(SourceKey::of(ip)))
    }
}

#[utoipa::path(
    post, path = "/v1/device/authorize", tag = "device",
    summary = "Start a device login (RFC 8628): a device code to poll with and a user code for the operator (no authentication)",
    security(()),
    request_body(content(
        (DeviceAuthorizeRequest = "application/json"),
        (DeviceAuthorizeRequest = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "Started; show the user code and poll /v1/device/token", body = DeviceAuthorization),
        (status = 400, description = "invalid_scope: an unknown scope; or a malformed body", body = ApiError),
        (status = 404, description = "Device login is turned off on this relay", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 415, description = "Body is neither JSON nor form-encoded", body = ApiError),
        (status = 422, description = "A field has the wrong type", body = ApiError),
        (status = 429, description = "rate_limited: too many logins from this source are waiting, or too many requests", body = ApiError),
        (status = 503, description = "device_logins_full: too many logins are waiting for an operator", body = ApiError),
    ),
)]
pub(super) async fn authorize(
    State(state): State<Arc<ApiState>>,
    Source(source): Source,
    headers: HeaderMap,
    JsonOrForm(req): JsonOrForm<DeviceAuthorizeRequest>,
) -> Result<Response, ErrorResponse> {
    let device = enabled(&state)?;
    let scopes = parse_scopes(req.scope.as_deref())?;
    let base = match &device.public_url {
        Some(url) => url.clone(),
        None => url_from_host(&headers)?,
    };
    let started = device
        .logins
        .lock()
        .authorize(scopes.clone(), source, SystemTime::now(), &device.rng)
        .map_err(|e| match e {
            AuthorizeError::Full => ErrorResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::DEVICE_LOGINS_FULL,
                e.to_string(),
            ),
            AuthorizeError::SourceFull => ErrorResponse::new(
                StatusCode::TOO_MANY_REQUESTS,
                codes::RATE_LIMITED,
                e.to_string(),
            ),
            AuthorizeError::Random => {
                tracing::error!("no random numbers for a device code");
                ErrorResponse::internal()
            }
        })?;
    tracing::info!(user_code = %started.user_code, scopes = %Scope::join(&scopes), "device login started");
    let verification_uri = format!("{base}{VERIFICATION_PATH}");
    Ok(no_store(Json(DeviceAuthorization {
        verification_uri_complete: format!("{verification_uri}?code={}", started.user_code),
        verification_uri,
        device_code: started.device_code,
        user_code: started.user_code,
        expires_in: started.expires_in.as_secs(),
        interval: started.interval.as_secs(),
    })))
}

#[utoipa::path(
    post, path = "/v1/device/token", tag = "device",
    summary = "Poll a device login; the token once approved, exactly once (no authentication)",
    security(()),
    request_body(content(
        (DeviceTokenRequest = "application/json"),
        (DeviceTokenRequest = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "Approved: the new token (never shown again)", body = DeviceAccessToken),
        (status = 400, description = "expired_token, access_denied, invalid_grant (unknown or spent code), unsupported_grant_type; or a malformed body", body = ApiError),
        (status = 404, description = "Device login is turned off on this relay", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 415, description = "Body is neither JSON nor form-encoded", body = ApiError),
        (status = 422, description = "device_code missing or not a string", body = ApiError),
        (status = 428, description = "authorization_pending: not decided yet; poll again after the interval", body = ApiError),
        (status = 429, description = "slow_down: polled faster than the interval, which grew by 5 s; or rate_limited", body = ApiError),
    ),
)]
pub(super) async fn token(
    State(state): State<Arc<ApiState>>,
    JsonOrForm(req): JsonOrForm<DeviceTokenRequest>,
) -> Result<Response, ErrorResponse> {
    let device = enabled(&state)?;
    if let Some(grant_type) = req.grant_type.as_deref() {
        if grant_type != DEVICE_CODE_GRANT {
            return Err(ErrorResponse::new(
                StatusCode::BAD_REQUEST,
                codes::UNSUPPORTED_GRANT_TYPE,
                format!("grant_type must be {DEVICE_CODE_GRANT}"),
            ));
        }
    }
    let polled = device
        .logins
        .lock()
        .poll(&req.device_code, SystemTime::now());
    let grant = polled.map_err(|e| {
        let (status, code) = match e {
            PollError::Pending => (
                StatusCode::PRECONDITION_REQUIRED,
                codes::AUTHORIZATION_PENDING,
            ),
            PollError::SlowDown { .. } => (StatusCode::TOO_MANY_REQUESTS, codes::SLOW_DOWN),
            PollError::Expired => (StatusCode::BAD_REQUEST, codes::EXPIRED_TOKEN),
            PollError::Denied => (StatusCode::BAD_REQUEST, codes::ACCESS_DENIED),
            PollError::InvalidGrant => (StatusCode::BAD_REQUEST, codes::INVALID_GRANT),
        };
        ErrorResponse::new(status, code, e.to_string())
    })?;
    let defaults = &device.section;
    let approval = grant.approval;
    let spec = TokenSpec {
        name: approval
            .name
            .unwrap_or_else(|| format!("device-{}", grant.user_code)),
        max_peers: approval.max_peers.unwrap_or(defaults.max_peers),
        max_ipv4: approval.max_ipv4.unwrap_or(defaults.max_ipv4),
        bandwidth_mbps: Some(approval.bandwidth_mbps.unwrap_or(defaults.bandwidth_mbps))
            .filter(|m| *m > 0),
        isolate_peers: approval.isolate_peers.unwrap_or(defaults.isolate_peers),
        admin: false,
    };
    let bind_machine = approval.bind_machine.unwrap_or(defaults.bind_machine);
    // The code is spent from here on: if the store fails, the client starts over.
    let (record, secret) = state
        .store()
        .create_scoped_token(spec, bind_machine, Some(grant.scopes))
        .await?;
    let scope = Scope::join(&record.scopes());
    tracing::info!(token_id = %record.id, name = %record.name, scopes = %scope, user_code = %grant.user_code, "token issued by device login");
    Ok(no_store(Json(DeviceAccessToken {
        access_token: secret,
        token_type: "bearer".to_owned(),
        scope,
    })))
}

fn decide_error(e: DecideError) -> ErrorResponse {
    let (status, code) = match e {
        DecideError::Unknown => (StatusCode::NOT_FOUND, codes::NOT_FOUND),
        DecideError::Expired => (StatusCode::GONE, codes::EXPIRED_TOKEN),
        DecideError::Decided => (StatusCode::CONFLICT, codes::CONFLICT),
    };
    ErrorResponse::new(status, code, e.to_string())
}

#[utoipa::path(
    get, path = "/v1/admin/device", tag = "admin",
    summary = "Every device login waiting for (or past) a decision, oldest first",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The logins", body = DeviceLoginList),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
        (status = 404, description = "Device login is off", body = ApiError),
    ),
)]
pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
    Admin(_admin): Admin,
) -> Result<Json<DeviceLoginList>, ErrorResponse> {
    let device = enabled(&state)?;
    let logins = device.logins.lock().list(SystemTime::now());
    Ok(Json(DeviceLoginList { logins }))
}

#[utoipa::path(
    get, path = "/v1/admin/device/{user_code}", tag = "admin",
    summary = "A device login as the operator decides on it: the scopes asked for, its state, when it expires",
    security(("bearer" = ["admin"])),
    params(("user_code" = String, Path, description = "The user code the client shows, any case, dash optional", example = "BCDF-GHJK")),
    responses(
        (status = 200, description = "The login", body = DeviceLoginView),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
        (status = 404, description = "No login with this user code (or device login is off)", body = ApiError),
    ),
)]
pub(super) async fn view(
    State(state): State<Arc<ApiState>>,
    Admin(_admin): Admin,
    Path(user_code): Path<String>,
) -> Result<Json<DeviceLoginView>, ErrorResponse> {
    let device = enabled(&state)?;
    let view = device.logins.lock().view(&user_code, SystemTime::now());
    view.map(Json)
        .ok_or_else(|| decide_error(DecideError::Unknown))
}

/// The approval's body: optional, and JSON when present.
fn approval_body(headers: &HeaderMap, body: &Bytes) -> Result<ApproveDevice, ErrorResponse> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ApproveDevice::default());
    }
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ErrorResponse::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            codes::UNSUPPORTED_MEDIA_TYPE,
            "the approval's body, when given, must be application/json",
        ));
    }
    match serde_json::from_slice::<ApproveDevice>(body) {
        Ok(v) => Ok(v),
        Err(e) if e.is_syntax() || e.is_eof() => Err(ErrorResponse::new(
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )),
        Err(e) => Err(ErrorResponse::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::INVALID_REQUEST,
            format!("invalid approval: {e}"),
        )),
    }
}

#[utoipa::path(
    post, path = "/v1/admin/device/{user_code}/approve", tag = "admin",
    summary = "Approve a device login: its next poll gets a token with exactly the scopes asked for",
    description = "Limits left out of the body come from `[device_login]` in relay.toml. \
        The token is made when the client collects it.",
    security(("bearer" = ["admin"])),
    params(("user_code" = String, Path, description = "The user code the client shows, any case, dash optional", example = "BCDF-GHJK")),
    request_body(content((ApproveDevice = "application/json")), description = "Optional: the token's name and limits"),
    responses(
        (status = 200, description = "Approved", body = DeviceLoginView),
        (status = 400, description = "Malformed JSON", body = ApiError),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
        (status = 404, description = "No login with this user code (or device login is off)", body = ApiError),
        (status = 409, description = "Already approved or denied", body = ApiError),
        (status = 410, description = "expired_token: the login expired", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 415, description = "A body that is not application/json", body = ApiError),
        (status = 422, description = "An unknown or invalid field (such as an unprintable name)", body = ApiError),
    ),
)]
pub(super) async fn approve(
    State(state): State<Arc<ApiState>>,
    Admin(admin): Admin,
    Path(user_code): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<DeviceLoginView>, ErrorResponse> {
    let device = enabled(&state)?;
    let req = approval_body(&headers, &body)?;
    if let Some(name) = &req.name {
        // Checked now, not when the client collects the token, so the operator
        // hears about a bad name.
        crate::store::validate_label("name", name).map_err(|e| match e {
            StoreError::Invalid(m) => {
                ErrorResponse::new(StatusCode::UNPROCESSABLE_ENTITY, codes::INVALID_REQUEST, m)
            }
            other => other.into(),
        })?;
    }
    let approval = Approval {
        name: req.name,
        max_peers: req.max_peers,
        max_ipv4: req.max_ipv4,
        bandwidth_mbps: req.bandwidth_mbps,
        isolate_peers: req.isolate_peers,
        bind_machine: req.bind_machine,
    };
    let view = device
        .logins
        .lock()
        .approve(&user_code, approval, SystemTime::now())
        .map_err(decide_error)?;
    tracing::info!(user_code = %view.user_code, scopes = %Scope::join(&view.scopes), approved_by = %admin.id, "device login approved");
    Ok(Json(view))
}

#[utoipa::path(
    post, path = "/v1/admin/device/{user_code}/deny", tag = "admin",
    summary = "Deny a device login: its polls answer access_denied",
    security(("bearer" = ["admin"])),
    params(("user_code" = String, Path, description = "The user code the client shows, any case, dash optional", example = "BCDF-GHJK")),
    responses(
        (status = 200, description = "Denied", body = DeviceLoginView),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
        (status = 404, description = "No login with this user code (or device login is off)", body = ApiError),
        (status = 409, description = "Already approved or denied", body = ApiError),
        (status = 410, description = "expired_token: the login expired", body = ApiError),
    ),
)]
pub(super) async fn deny(
    State(state): State<Arc<ApiState>>,
    Admin(admin): Admin,
    Path(user_code): Path<String>,
) -> Result<Json<DeviceLoginView>, ErrorResponse> {
    let device = enabled(&state)?;
    let view = device
        .logins
        .lock()
        .deny(&user_code, SystemTime::now())
        .map_err(decide_error)?;
    tracing::info!(user_code = %view.user_code, denied_by = %admin.id, "device login denied");
    Ok(Json(view))
}
