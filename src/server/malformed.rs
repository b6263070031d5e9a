//! Requests whose message cannot be read (it does not decode as the
//! method's protobuf, is flagged compressed, is cut short, or is missing)
//! answer `INVALID_ARGUMENT`, not the `INTERNAL` tonic gives them: the fault
//! is the caller's, and `INTERNAL` is what pages whoever runs the service.
//!
//! tonic decodes the message before any handler runs, and answers a decode
//! failure with a trailers-only response carrying `grpc-status: 13` and a
//! `grpc-message` starting "failed to decode Protobuf message". This layer
//! rewrites exactly those responses; the service's own `INTERNAL` answers
//! always say just "internal error".
//!
//! Being the first of the service's code every call reaches, it also stamps
//! the call's [`Arrival`](crate::api::Arrival): tonic starts its `grpc-timeout` timer at that same
//! moment, and a handler that times its deadline from there answers before
//! that timer answers `CANCELLED` for it, however late the handler started.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::{Code, codegen::http};

use crate::api::Arrival;

/// What tonic's answers to a request it could not read say first: a
/// message that does not decode (prost's `DecodeError`), a frame flagged
/// compressed (none is accepted: no `grpc-encoding` is served), a bad flag,
/// a body cut short, or no message at all. Each is the caller's fault, and
/// each is refused before any handler runs. (The gRPC compression doc asks
/// INTERNAL for the compressed flag; that pages operators for a caller's
/// bug, so it is INVALID_ARGUMENT here too.)
const READ_FAILURES: [&str; 5] = [
    "failed to decode Protobuf message",
    "protocol error: received message with compressed-flag",
    "protocol error: received message with invalid compression flag",
    "Unexpected EOF decoding stream",
    "Missing request message",
];

/// Whether a `grpc-message` (percent-encoded as sent) is one of
/// [`READ_FAILURES`].
fn is_read_failure(message: &[u8]) -> bool {
    let decoded = String::from_utf8_lossy(message).replace("%20", " ");
    READ_FAILURES.iter().any(|failure| decoded.starts_with(failure))
}

/// Wraps a service in [`MalformedRequests`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MalformedRequestsLayer;

impl<S> tower::Layer<S> for MalformedRequestsLayer {
    type Service = MalformedRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MalformedRequests(inner)
    }
}

/// How often a refused undecodable message is logged, process-wide.
static LOGGED: std::sync::LazyLock<crate::telemetry::Throttle> = std::sync::LazyLock::new(Default::default);

/// A service whose undecodable requests answer `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct MalformedRequests<S>(S);

impl<S, B, R> tower::Service<http::Request<B>> for MalformedRequests<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(Arrival(tokio::time::Instant::now()));
        // A cheap clone (shared bytes), read only if the answer is rewritten.
        let uri = request.uri().clone();
        let response = self.0.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            let headers = response.headers_mut();
            let internal = headers.get("grpc-status").is_some_and(|s| s.as_bytes() == b"13");
            let undecodable = headers.get("grpc-message").is_some_and(|m| is_read_failure(m.as_bytes()));
            if internal && undecodable {
                headers.insert("grpc-status", http::HeaderValue::from(Code::InvalidArgument as i32));
                // Counted always (grpc_server_handled_total); logged at a
                // bounded rate: health and reflection need no credentials.
                if let Some(left_out) = LOGGED.admit() {
                    if left_out > 0 {
                        tracing::info!(
                            suppressed = left_out,
                            "more messages that do not decode were refused (not logged one by one)"
                        );
                    }
                    tracing::info!(
                        rpc = uri.path(),
                        code = "InvalidArgument",
                        "refused a message that does not decode"
                    );
                }
            }
            Ok(response)
        })
    }
}
