//! The answers every route can give besides its own: written once here rather than
//! on each handler, so a new route cannot forget them and the document says exactly
//! what the middleware in front of the handlers does.
//!
//! - every route: 429 (the request-rate gates, with `Retry-After`) and 503 (too many
//!   requests in flight, with `Retry-After`), from [`crate::limits::enforce`];
//! - routes that take a bearer token: 401 (every token is checked) and 500 (the token
//!   lookup reads the store, which can fail);
//! - routes that take a JSON body: 400 (not JSON), 413 (over [`super::BODY_LIMIT`]),
//!   415 (not `application/json`) and 422 (a missing or mistyped field), from
//!   [`super::ApiJson`].
//!
//! A handler's own description of one of these codes is kept.

use utoipa::openapi::path::Operation;
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, ObjectBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder,
    Type,
};

/// Adds the common answers to every operation of `doc`.
pub fn add(doc: &mut OpenApi) {
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in operations.into_iter().flatten() {
            add_to(op);
        }
    }
}

fn add_to(op: &mut Operation) {
    let mut codes: Vec<(u16, &str, bool)> = vec![
        (
            429,
            "rate_limited: too many requests from this source address or token",
            true,
        ),
        (
            503,
            "overloaded: too many requests in flight on the relay",
            true,
        ),
    ];
    if needs_token(op) {
        codes.push((401, "Missing or invalid token", false));
        codes.push((500, "internal: the relay could not read its store", false));
    }
    if op.request_body.is_some() {
        codes.extend([
            (400, "bad_request: the body is not JSON", false),
            (413, "payload_too_large: the body is over 16 KiB", false),
            (
                415,
                "unsupported_media_type: the body is not application/json",
                false,
            ),
            (
                422,
                "invalid_request: a field is missing, mistyped or out of range",
                false,
            ),
        ]);
    }
    for (status, description, retry_after) in codes {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::T(error_response(description, retry_after)));
    }
}

/// An operation needs a token unless its only security requirement is the empty one
/// (`security(())`).
fn needs_token(op: &Operation) -> bool {
    op.security.as_ref().is_some_and(|reqs| {
        reqs.iter().any(|r| {
            serde_json::to_value(r).is_ok_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        })
    })
}

fn error_response(description: &str, retry_after: bool) -> Response {
    let body = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ApiError")))
        .build();
    let mut response = ResponseBuilder::new()
        .description(description)
        .content("application/json", body);
    if retry_after {
        let seconds = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0));
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(seconds)
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    response.build()
}
