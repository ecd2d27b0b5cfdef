//! Request bodies are read here, before routing, up to [`BODY_LIMIT`]. A larger one
//! is read on and thrown away up to [`DRAIN_LIMIT`] before the 413 is sent: a server
//! that answers and closes while the client is still sending makes the client's
//! kernel see a reset, and the client then loses the answer that says why. Past the
//! drain bound (or without a body in time) the answer goes with `Connection: close`,
//! because reading more would only serve whoever is sending it.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header::{CONNECTION, CONTENT_LENGTH};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use sidecar_proto::codes;

use super::{ErrorResponse, BODY_LIMIT};

/// How much of an oversized body is read (and discarded) so its sender gets the 413.
pub const DRAIN_LIMIT: usize = 1 << 20;

/// How long a whole body may take to arrive.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What reading a body came to.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Whole(Bytes),
    /// Over the limit, and read to its end (at most [`DRAIN_LIMIT`]).
    TooLargeDrained,
    /// Over the drain bound: the rest is left unread.
    TooLarge,
    /// The connection broke or the body did not arrive in time.
    Broken,
}

pub async fn read_bounded(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return refuse(Read::TooLarge);
    }
    let (parts, body) = req.into_parts();
    let read = match tokio::time::timeout(BODY_TIMEOUT, read(body)).await {
        Ok(read) => read,
        Err(_) => Read::Broken,
    };
    match read {
        Read::Whole(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        other => refuse(other),
    }
}

async fn read(mut body: Body) -> Read {
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Read::Broken;
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing a route reads
        };
        seen = seen.saturating_add(data.len());
        if seen > DRAIN_LIMIT {
            return Read::TooLarge;
        }
        if seen <= BODY_LIMIT {
            kept.extend_from_slice(&data);
        }
    }
    if seen > BODY_LIMIT {
        Read::TooLargeDrained
    } else {
        Read::Whole(Bytes::from(kept))
    }
}

fn refuse(read: Read) -> Response {
    let (status, code, message) = match read {
        Read::Broken => (
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
            format!(
                "the request body did not arrive whole within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        ),
        _ => (
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!("the body is over {} KiB", BODY_LIMIT / 1024),
        ),
    };
    let mut response = ErrorResponse::new(status, code, message).into_response();
    if read != Read::TooLargeDrained {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(n: usize) -> Body {
        Body::from(vec![b'x'; n])
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_kept_whole() {
        assert_eq!(
            read(body(BODY_LIMIT)).await,
            Read::Whole(Bytes::from(vec![b'x'; BODY_LIMIT]))
        );
        assert_eq!(read(Body::empty()).await, Read::Whole(Bytes::new()));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_drained_up_to_the_bound() {
        assert_eq!(read(body(BODY_LIMIT + 1)).await, Read::TooLargeDrained);
        assert_eq!(read(body(DRAIN_LIMIT)).await, Read::TooLargeDrained);
        assert_eq!(read(body(DRAIN_LIMIT + 1)).await, Read::TooLarge);
    }
}
