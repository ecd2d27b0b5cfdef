//! `/.well-known/`: the discovery documents of [`crate::discovery`], without
//! authentication. A relay started without its public URL (a router built in a test)
//! has none and answers 404.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use sidecar_proto::discovery::{
    AgentCard, AuthorizationServerMetadata, Onboarding, ProtectedResourceMetadata,
};
use sidecar_proto::{codes, ApiError};

use super::{ApiState, ErrorResponse};
use crate::discovery::Discovery;

fn discovery(state: &ApiState) -> Result<&Discovery, ErrorResponse> {
    state.discovery.as_deref().ok_or_else(|| {
        ErrorResponse::new(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            "this relay was started without its public URL",
        )
    })
}

#[utoipa::path(
    get, path = "/.well-known/oauth-authorization-server", tag = "discovery",
    summary = "OAuth 2.0 authorization server metadata (RFC 8414): device login",
    security(()),
    responses(
        (status = 200, description = "Where to start a device login and poll for its token", body = AuthorizationServerMetadata),
        (status = 404, description = "The relay does not know its public URL", body = ApiError),
    ),
)]
pub(super) async fn authorization_server(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<AuthorizationServerMetadata>, ErrorResponse> {
    Ok(Json(discovery(&state)?.authorization_server()))
}

#[utoipa::path(
    get, path = "/.well-known/oauth-protected-resource", tag = "discovery",
    summary = "OAuth 2.0 protected resource metadata (RFC 9728): the API and its scopes",
    security(()),
    responses(
        (status = 200, description = "The API, its scopes and who issues its tokens", body = ProtectedResourceMetadata),
        (status = 404, description = "The relay does not know its public URL", body = ApiError),
    ),
)]
pub(super) async fn protected_resource(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<ProtectedResourceMetadata>, ErrorResponse> {
    Ok(Json(discovery(&state)?.protected_resource()))
}

#[utoipa::path(
    get, path = "/.well-known/agent-onboarding.json", tag = "discovery",
    summary = "Installing the agent from this relay, as data: preflight checks, steps, rollback, errors",
    security(()),
    responses(
        (status = 200, description = "The installer's contract for this relay", body = Onboarding),
        (status = 404, description = "The relay does not know its public URL", body = ApiError),
    ),
)]
pub(super) async fn onboarding(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Onboarding>, ErrorResponse> {
    Ok(Json(discovery(&state)?.onboarding()))
}

#[utoipa::path(
    get, path = "/.well-known/agent-card.json", tag = "discovery",
    summary = "An A2A agent card: what this relay offers and where",
    security(()),
    responses(
        (status = 200, description = "The relay's capabilities and endpoints", body = AgentCard),
        (status = 404, description = "The relay does not know its public URL", body = ApiError),
    ),
)]
pub(super) async fn agent_card(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<AgentCard>, ErrorResponse> {
    Ok(Json(discovery(&state)?.agent_card()))
}
