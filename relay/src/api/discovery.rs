//! Machine-readable descriptions of the relay for OAuth clients and automated
//! installers: RFC 8414 authorization server metadata and RFC 9728 protected
//! resource metadata, both naming this relay's own URL.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use sidecar_proto::device::{
    AuthorizationServerMetadata, ProtectedResourceMetadata, DEVICE_CODE_GRANT,
};
use sidecar_proto::{ApiError, Scope};

use super::{ApiState, ErrorResponse};

pub const PROTECTED_RESOURCE_PATH: &str = "/.well-known/oauth-protected-resource";

#[utoipa::path(
    get, path = "/.well-known/oauth-authorization-server", tag = "device",
    summary = "RFC 8414 authorization server metadata: the device login endpoints (no authentication)",
    security(()),
    responses(
        (status = 200, description = "This relay as an OAuth authorization server", body = AuthorizationServerMetadata),
        (status = 400, description = "No usable Host header and no configured URL", body = ApiError),
    ),
)]
pub(super) async fn authorization_server(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<AuthorizationServerMetadata>, ErrorResponse> {
    let base = state.device.base_url(&headers)?;
    Ok(Json(AuthorizationServerMetadata {
        device_authorization_endpoint: format!("{base}/v1/device/authorize"),
        token_endpoint: format!("{base}/v1/device/token"),
        grant_types_supported: vec![DEVICE_CODE_GRANT.to_owned()],
        response_types_supported: Vec::new(),
        token_endpoint_auth_methods_supported: vec!["none".to_owned()],
        scopes_supported: Scope::ALL.to_vec(),
        issuer: base,
    }))
}

#[utoipa::path(
    get, path = "/.well-known/oauth-protected-resource", tag = "relay",
    summary = "RFC 9728 protected resource metadata: the API's scopes and where its tokens come from (no authentication)",
    security(()),
    responses(
        (status = 200, description = "This relay's API as a protected resource", body = ProtectedResourceMetadata),
        (status = 400, description = "No usable Host header and no configured URL", body = ApiError),
    ),
)]
pub(super) async fn protected_resource(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<ProtectedResourceMetadata>, ErrorResponse> {
    let base = state.device.base_url(&headers)?;
    Ok(Json(ProtectedResourceMetadata {
        authorization_servers: vec![base.clone()],
        resource: base,
        scopes_supported: Scope::ALL.to_vec(),
        bearer_methods_supported: vec!["header".to_owned()],
        resource_name: "sidecar relay control API".to_owned(),
    }))
}
