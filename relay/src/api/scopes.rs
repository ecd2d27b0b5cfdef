//! Per-route scope checks: each extractor authenticates the caller and lets the
//! request through only if its token has the one scope the route needs; otherwise
//! 403 `insufficient_scope`, naming that scope in the message and, as RFC 6750
//! section 3.1 has it, in the bearer challenge.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header::WWW_AUTHENTICATE;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sidecar_proto::codes;

use super::{ApiState, Caller, ErrorResponse};
use crate::store::{Scope, TokenRecord};

/// Why a scoped extractor refused: the caller is not authenticated (401), or its
/// token lacks the route's scope (403).
pub enum ScopeRejection {
    Unauthenticated(ErrorResponse),
    Insufficient { needed: Scope, has: Vec<Scope> },
}

impl IntoResponse for ScopeRejection {
    fn into_response(self) -> Response {
        let (needed, has) = match self {
            ScopeRejection::Unauthenticated(e) => return e.into_response(),
            ScopeRejection::Insufficient { needed, has } => (needed, has),
        };
        let mut response = ErrorResponse::new(
            StatusCode::FORBIDDEN,
            codes::INSUFFICIENT_SCOPE,
            format!(
                "this route needs a token with the {needed} scope; this token has: {}",
                Scope::join(&has)
            ),
        )
        .into_response();
        // Scope names are fixed ASCII, so the header value is always valid.
        let challenge = format!(
            r#"{}, error="insufficient_scope", scope="{needed}""#,
            super::BEARER_CHALLENGE
        );
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// `token` may use a route that needs `scope`, or the 403 that names the scope.
pub fn require(token: &TokenRecord, scope: Scope) -> Result<(), ScopeRejection> {
    if token.has_scope(scope) {
        return Ok(());
    }
    Err(ScopeRejection::Insufficient {
        needed: scope,
        has: token.scopes(),
    })
}

macro_rules! scoped_extractor {
    ($(#[$doc:meta])* $name:ident, $scope:expr) => {
        $(#[$doc])*
        pub struct $name(pub TokenRecord);

        impl FromRequestParts<Arc<ApiState>> for $name {
            type Rejection = ScopeRejection;

            async fn from_request_parts(
                parts: &mut Parts,
                state: &Arc<ApiState>,
            ) -> Result<Self, ScopeRejection> {
                let Caller(token) = Caller::from_request_parts(parts, state)
                    .await
                    .map_err(ScopeRejection::Unauthenticated)?;
                require(&token, $scope)?;
                Ok($name(token))
            }
        }
    };
}

scoped_extractor!(
    /// The caller's token, which has the `peers:read` scope.
    PeersReader,
    Scope::PeersRead
);
scoped_extractor!(
    /// The caller's token, which has the `peers:add` scope.
    PeersAdder,
    Scope::PeersAdd
);
scoped_extractor!(
    /// The caller's token, which has the `admin` scope.
    Admin,
    Scope::Admin
);
