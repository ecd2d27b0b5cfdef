//! `GET /v1/canary`: the operator's signed warrant canary, for anyone to check.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use sidecar_proto::{codes, ApiError};

use super::{ApiState, ErrorResponse};
use crate::canary::Canary;

#[utoipa::path(
    get, path = "/v1/canary", tag = "relay",
    summary = "The operator's warrant canary, signed with the relay's Ed25519 canary key (no authentication)",
    description = "The signature covers `sidecar-canary-v1\\n{signed}\\n{statement}`. \
        Check it with `sidecar-relay canary verify` or `openssl pkeyutl -verify -rawin` \
        (see the README), against a canary key you learnt before.",
    security(()),
    responses(
        (status = 200, description = "The current statement and its signature", body = Canary),
        (status = 404, description = "The operator has not signed a canary", body = ApiError),
    ),
)]
pub(super) async fn canary(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Canary>, ErrorResponse> {
    let none = || {
        ErrorResponse::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "the operator has not signed a warrant canary (sidecar-relay canary sign)",
        )
    };
    let path = state.canary.as_ref().ok_or_else(none)?;
    match Canary::load(path) {
        Ok(Some(canary)) => Ok(Json(canary)),
        Ok(None) => Err(none()),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the warrant canary");
            Err(ErrorResponse::internal())
        }
    }
}
