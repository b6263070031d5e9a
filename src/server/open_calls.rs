//! A bound on what callers nobody knows can make the server hold: the
//! services that need no credentials (health, reflection) read their
//! request before anyone asks who sent it, so a caller that sends half a
//! request, on many streams and connections, holds the server's memory for
//! each. At most a fixed number of such calls per listener may be waiting
//! for their request; when one more arrives, the call that has waited
//! longest is answered `RESOURCE_EXHAUSTED` (with `RetryInfo`) and let go.
//! A call holds its place until its request has been read to its end (or
//! dropped): a health check or a Watch that sends its request whole holds it
//! for microseconds, so a flood of half-sent calls is what gets evicted, and
//! cannot starve the probes. (Refusing the newcomer instead let 256
//! half-sent calls, three connections' worth, fail every probe for as long
//! as the server waited on them.)
//! Order calls are authenticated before their body is read, and bounded by
//! `--max-concurrent-requests`: they pass through.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use tonic::{Code, Status, body::Body, codegen::http};
use tonic_types::{ErrorDetails, StatusExt};

/// How long a caller refused here should wait before it retries.
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// The calls of one listener waiting for their request, oldest first.
#[derive(Debug)]
struct Places {
    most: usize,
    waiting: Mutex<VecDeque<Arc<Place>>>,
}

/// One waiting call: told to give up when evicted.
#[derive(Debug, Default)]
struct Place {
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Places {
    /// A place for a new call; the oldest waiting call is evicted if all
    /// are taken.
    fn take(&self) -> Arc<Place> {
        let place = Arc::new(Place::default());
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() >= self.most
            && let Some(oldest) = waiting.pop_front()
        {
            oldest.evicted.store(true, Ordering::Release);
            if let Some(waker) = oldest.waker.lock().unwrap_or_else(|e| e.into_inner()).take() {
                waker.wake();
            }
            tracing::debug!("evicted the open-service call that waited longest for its request");
        }
        waiting.push_back(place.clone());
        place
    }

    /// Gives `place` back.
    fn give_back(&self, place: &Arc<Place>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = waiting.iter().position(|p| Arc::ptr_eq(p, place)) {
            waiting.remove(at);
        }
    }
}

/// Wraps a service in [`OpenCalls`], with `most` places shared by every
/// connection of the listener.
#[derive(Debug, Clone)]
pub(super) struct OpenCallsLayer(Arc<Places>);

impl OpenCallsLayer {
    pub(super) fn new(most: usize) -> Self {
        Self(Arc::new(Places { most, waiting: Mutex::new(VecDeque::with_capacity(most)) }))
    }
}

impl<S> tower::Layer<S> for OpenCallsLayer {
    type Service = OpenCalls<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OpenCalls { inner, places: self.0.clone() }
    }
}

/// A service whose calls to the open services hold a place until their
/// request has been read.
#[derive(Debug, Clone)]
pub(super) struct OpenCalls<S> {
    inner: S,
    places: Arc<Places>,
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
        if request.uri().path().starts_with(crate::api::ORDER_SERVICE_PATH) {
            return Box::pin(self.inner.call(request));
        }
        let place = self.places.take();
        let places = self.places.clone();
        let request = request.map(|body| Body::new(Unread { body, place: Some((place, places)) }));
        Box::pin(self.inner.call(request))
    }
}

/// A request body holding its call's place until it has been read to its
/// end, or dropped; evicted, it ends in `RESOURCE_EXHAUSTED`.
struct Unread {
    body: Body,
    place: Option<(Arc<Place>, Arc<Places>)>,
}

impl Unread {
    fn give_back(&mut self) {
        if let Some((place, places)) = self.place.take() {
            places.give_back(&place);
        }
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        self.give_back();
    }
}

impl http_body::Body for Unread {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some((place, _)) = &self.place {
            // The waker first, then the flag: an eviction in between still
            // wakes this poll's task.
            *place.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
            if place.evicted.load(Ordering::Acquire) {
                self.place = None; // already out of the queue
                let status = Status::with_error_details(
                    Code::ResourceExhausted,
                    "too many unfinished calls to this service; retry shortly",
                    ErrorDetails::with_retry_info(Some(RETRY_DELAY)),
                );
                return Poll::Ready(Some(Err(status)));
            }
        }
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || self.body.is_end_stream() {
            self.give_back();
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
