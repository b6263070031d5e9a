//! A bound on what callers nobody knows can make the server hold: the
//! services that need no credentials (health, reflection) read their
//! request before anyone asks who sent it, so a caller that sends half a
//! request, on many streams and connections, holds the server's memory for
//! each. At most a fixed number of such calls per listener may be waiting
//! for their request; one more is answered `RESOURCE_EXHAUSTED` (with
//! `RetryInfo`) from its headers, at once. A call holds its place until its
//! request has been read to its end (or dropped): a health check or a Watch
//! that sent its request whole holds it for microseconds.
//! Order calls are authenticated before their body is read, and bounded by
//! `--max-concurrent-requests`: they pass through.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status, body::Body, codegen::http};
use tonic_types::{ErrorDetails, StatusExt};

/// The order service's paths, which pass through.
const ORDER_SERVICE_PATH: &str = "/orders.v1.OrderService/";

/// How long a caller refused here should wait before it retries.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// Wraps a service in [`OpenCalls`], with `slots` places shared by every
/// connection of the listener.
#[derive(Debug, Clone)]
pub(super) struct OpenCallsLayer(Arc<Semaphore>);

impl OpenCallsLayer {
    pub(super) fn new(slots: usize) -> Self {
        Self(Arc::new(Semaphore::new(slots)))
    }
}

impl<S> tower::Layer<S> for OpenCallsLayer {
    type Service = OpenCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OpenCalls { inner, slots: self.0.clone() }
    }
}

/// A service whose calls to the open services hold one of `slots` until
/// their handler answers.
#[derive(Debug, Clone)]
pub(super) struct OpenCalls<S> {
    inner: S,
    slots: Arc<Semaphore>,
}

impl<S, R> tower::Service<http::Request<Body>> for OpenCalls<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path().starts_with(ORDER_SERVICE_PATH) {
            return Box::pin(self.inner.call(request));
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::debug!(
                path = request.uri().path(),
                "too many open-service calls waiting for their request"
            );
            let status = Status::with_error_details(
                Code::ResourceExhausted,
                "too many unfinished calls to this service; retry shortly",
                ErrorDetails::with_retry_info(Some(RETRY_DELAY)),
            );
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let request = request.map(|body| Body::new(Unread { body, slot: Some(slot) }));
        Box::pin(self.inner.call(request))
    }
}

/// A request body holding its call's place until it has been read to its
/// end, or dropped.
struct Unread {
    body: Body,
    slot: Option<OwnedSemaphorePermit>,
}

impl http_body::Body for Unread {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.body.is_end_stream() {
            self.slot = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
