//! The relay's web page: `GET /ui` (sign in with an admin token, then tokens, peers and
//! device approvals) and `GET /device` (the same page opened on the approval view, the
//! device flow's `verification_uri`), with its one script and one style sheet.
//!
//! The files are compiled into the binary, so the page needs nothing but the relay:
//! no external assets, no build step. The page holds no secret; it calls the JSON API
//! with the token the operator pastes, kept in the tab's `sessionStorage`.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Only the relay's own files and API: no inline script or style (so an injected
/// string cannot run), no other origin, no framing, no form posts elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `/ui`, `/ui/`, `/device` (the page) and `/ui/app.js`, `/ui/app.css`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/device", get(index))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    page("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> Response {
    page("text/css; charset=utf-8", APP_CSS)
}

/// `body` with its type and the headers every file of the page carries. Nothing is
/// cached: the page shows live state, and after an upgrade the script must match the
/// relay's API.
fn page(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 7] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_script_and_style() {
        assert!(INDEX_HTML.contains(r#"<script src="/ui/app.js" defer></script>"#));
        assert!(INDEX_HTML.contains(r#"<link rel="stylesheet" href="/ui/app.css">"#));
        // The policy forbids inline code; a `<script>` with a body or a `style=` or
        // `on...=` attribute would be refused by the browser, so none may be written.
        assert_eq!(INDEX_HTML.matches("<script").count(), 1);
        assert!(!INDEX_HTML.contains("style="));
        assert!(!INDEX_HTML.contains(" onclick=") && !INDEX_HTML.contains(" onsubmit="));
        let field = INDEX_HTML
            .lines()
            .find(|l| l.contains(r#"id="signin-token""#))
            .expect("the token field");
        assert!(
            !field.contains("name="),
            "a named token field could be submitted: {field}"
        );
        for file in [INDEX_HTML, APP_JS, APP_CSS] {
            assert!(!file.contains("http://") && !file.contains("https://"));
        }
    }
}
