//! The routes and checks for post-quantum preshared keys and machine binding.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use sidecar_proto::{codes, ApiError, MachineKey, PqGrant, PqInfo, RegisterRequest, UnbindMachine};

use super::{Admin, ApiJson, ApiState, ErrorResponse, PeersAdder};
use crate::store::{PeerRecord, RegisterExtras, StoreError};

/// The post-quantum and machine fields of a registration, checked.
pub(super) fn extras(
    state: &ApiState,
    req: &RegisterRequest,
) -> Result<RegisterExtras, ErrorResponse> {
    let pq = state.service().pq();
    let pq_ciphertext = match (&req.pq_ciphertext, pq) {
        (Some(text), Some(_)) => {
            sidecar_proto::pq::decode_ciphertext(text).map_err(|e| {
                ErrorResponse::new(StatusCode::UNPROCESSABLE_ENTITY, codes::INVALID_REQUEST, format!("pq_ciphertext: {e}"))
            })?;
            Some(text.clone())
        }
        (Some(_), None) => {
            return Err(ErrorResponse::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::INVALID_REQUEST,
                "this relay has no X-Wing key; register without pq_ciphertext",
            ))
        }
        (None, Some(pq)) if pq.required => {
            return Err(ErrorResponse::new(
                StatusCode::FORBIDDEN,
                codes::PQ_REQUIRED,
                "this relay requires a post-quantum preshared key: register with a current sidecar-agent, \
                 or encapsulate to the key from GET /v1/pq and send pq_ciphertext (`sidecar-agent psk` does both \
                 for plain WireGuard clients)",
            ))
        }
        (None, _) => None,
    };
    if let Some(m) = &req.machine {
        if m.is_empty() || m.chars().count() > 128 {
            return Err(ErrorResponse::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::INVALID_REQUEST,
                "machine must be a fingerprint of 1 to 128 characters",
            ));
        }
    }
    Ok(RegisterExtras {
        pq_ciphertext,
        machine: req.machine.clone(),
    })
}

/// The grant a registration's answer carries.
pub(super) fn grant(state: &ApiState, peer: &PeerRecord) -> Option<PqGrant> {
    let pq = state.service().pq()?;
    peer.pq_ciphertext.as_ref().map(|_| PqGrant {
        counter: peer.pq_counter,
        rotate_secs: pq.rotate.as_secs(),
    })
}

/// Machine binding failures, with what the operator can do about them.
pub(super) fn machine_error(err: &StoreError, token_id: &str) -> Option<ErrorResponse> {
    let how = format!(
        "an operator resets the binding with POST /v1/admin/tokens/unbind-machine {{\"id\": \"{token_id}\"}} \
         (tokens created with \"bind_machine\": false work from any machine)"
    );
    match err {
        StoreError::MachineMismatch => Some(ErrorResponse::new(
            StatusCode::FORBIDDEN,
            codes::MACHINE_MISMATCH,
            format!("this token is bound to another machine; {how}"),
        )),
        StoreError::MachineRequired => Some(ErrorResponse::new(
            StatusCode::FORBIDDEN,
            codes::MACHINE_REQUIRED,
            format!("this token is bound to a machine and the registration sent no machine fingerprint (update the agent); {how}"),
        )),
        _ => None,
    }
}

#[utoipa::path(
    get, path = "/v1/pq", tag = "relay",
    summary = "The relay's X-Wing public key and post-quantum policy (no authentication)",
    security(()),
    responses(
        (status = 200, description = "Encapsulate to this key for a post-quantum preshared key", body = PqInfo),
        (status = 404, description = "This relay has no X-Wing key", body = ApiError),
    ),
)]
pub(super) async fn pq_info(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<PqInfo>, ErrorResponse> {
    let pq = state.service().pq().ok_or_else(|| {
        ErrorResponse::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "this relay has no X-Wing key",
        )
    })?;
    Ok(Json(PqInfo {
        xwing_public_key: pq.public_key_base64(),
        relay_public_key: pq.relay_public_key(),
        required: pq.required,
        rotate_secs: pq.rotate.as_secs(),
    }))
}

#[utoipa::path(
    get, path = "/v1/machine", tag = "relay",
    summary = "The calling token's machine key and binding",
    security(("bearer" = ["peers:add"])),
    responses(
        (status = 200, description = "Fingerprint the host with this key", body = MachineKey),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the peers:add scope", body = ApiError),
        (status = 404, description = "This relay does not bind tokens to machines", body = ApiError),
    ),
)]
pub(super) async fn machine_key(
    State(state): State<Arc<ApiState>>,
    PeersAdder(token): PeersAdder,
) -> Result<Json<MachineKey>, ErrorResponse> {
    let keys = state.machine_keys().ok_or_else(|| {
        ErrorResponse::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "this relay does not bind tokens to machines",
        )
    })?;
    Ok(Json(MachineKey {
        machine_key: keys.token_key(&token.id),
        bind_machine: token.bind_machine,
        bound: token.machine.is_some(),
    }))
}

#[utoipa::path(
    post, path = "/v1/admin/tokens/unbind-machine", tag = "admin",
    summary = "Forget the machine a token is bound to; its next registration binds it again",
    security(("bearer" = ["admin"])),
    request_body = UnbindMachine,
    responses(
        (status = 204, description = "Unbound"),
        (status = 400, description = "Malformed JSON", body = ApiError),
        (status = 401, description = "Missing or invalid token", body = ApiError),
        (status = 403, description = "insufficient_scope: the token lacks the admin scope", body = ApiError),
        (status = 404, description = "No such token", body = ApiError),
        (status = 413, description = "Body too large", body = ApiError),
        (status = 415, description = "Body is not application/json", body = ApiError),
        (status = 422, description = "Missing or invalid field", body = ApiError),
    ),
)]
pub(super) async fn unbind_machine(
    State(state): State<Arc<ApiState>>,
    Admin(_admin): Admin,
    ApiJson(req): ApiJson<UnbindMachine>,
) -> Result<StatusCode, ErrorResponse> {
    match state.store().unbind_machine(&req.id).await {
        Ok(_) => {
            tracing::info!(token_id = %req.id, "token's machine binding reset");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(StoreError::NotFound) => Err(ErrorResponse::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "no token with this id",
        )),
        Err(e) => Err(e.into()),
    }
}
