//! A retrying client for Rust callers, used by `orderctl` too: retries done
//! right from the caller's side.
//!
//! - One `client_request_id` per order: generated (UUID v4) when the caller
//!   gives none, and sent unchanged on every attempt of that call.
//! - Retries only `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `ABORTED`,
//!   `RESOURCE_EXHAUSTED` and `CANCELLED` (tonic's own deadline timer
//!   answers that), any answer whose `ErrorInfo` reason is `OUTCOME_UNKNOWN`,
//!   and calls broken in the transport; every other code is final at once.
//! - Knows when a PlaceOrder's outcome is unknown: if any attempt may have
//!   written the order (the service said `OUTCOME_UNKNOWN`, or no answer
//!   came), a final failure says so ([`CallError::outcome_unknown`]) with
//!   the key to retry with, never that the order was refused.
//! - Waits what the server's `RetryInfo` asks, else exponential backoff with
//!   full jitter; bounded by attempts and by total time; each attempt has
//!   its own deadline.
//! - The channel reconnects by itself after the server restarts.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_types::StatusExt;

use crate::TraceParent;
use crate::proto::{
    CancelOrderRequest, GetOrderRequest, ListOrdersRequest, ListOrdersResponse, Order, PlaceOrderRequest,
    PlaceOrderResponse, order_service_client::OrderServiceClient,
};

/// A callback told of each failed attempt before it is retried.
pub type OnRetry = Arc<dyn Fn(u32, &Status) + Send + Sync>;

/// When and how often to retry.
#[derive(Clone)]
pub struct RetryPolicy {
    /// Most attempts per call, the first included.
    pub max_attempts: u32,
    /// The backoff before the second attempt; it doubles per attempt.
    pub initial_backoff: Duration,
    /// The longest backoff (and the longest `RetryInfo` delay honoured).
    pub max_backoff: Duration,
    /// The deadline of one attempt.
    pub attempt_timeout: Duration,
    /// The deadline of the whole call, all attempts and waits included.
    pub total_timeout: Duration,
    /// Called before each retry with the attempt that failed and its status.
    pub on_retry: Option<OnRetry>,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("total_timeout", &self.total_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(20),
            on_retry: None,
        }
    }
}

impl RetryPolicy {
    /// Whether a call that failed with `code` may be retried with the same
    /// key. `CANCELLED` is among them: tonic answers it when a deadline fires
    /// before the service's own answer, and every call of this client is
    /// safe to repeat.
    pub fn is_retryable(code: Code) -> bool {
        matches!(
            code,
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Cancelled
        )
    }

    /// Whether a failed call may be retried with the same key: a retryable
    /// code, an `OUTCOME_UNKNOWN` answer, or a call that broke in the
    /// transport before any answer came ([`broke_in_transport`]).
    pub fn may_retry(status: &Status) -> bool {
        Self::is_retryable(status.code()) || is_outcome_unknown(status) || broke_in_transport(status)
    }

    /// The exponential backoff cap before attempt `attempt + 1`.
    pub fn backoff_cap(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        self.initial_backoff.saturating_mul(factor).min(self.max_backoff)
    }

    /// The wait after failed attempt `attempt`: the server's `RetryInfo`
    /// delay if it sent one (at most `max_backoff`), else full jitter:
    /// `random` (in 0..1) times the backoff cap.
    pub fn delay(&self, attempt: u32, status: &Status, random: f64) -> Duration {
        if let Some(delay) = status.get_details_retry_info().and_then(|info| info.retry_delay) {
            return delay.min(self.max_backoff);
        }
        self.backoff_cap(attempt).mul_f64(random.clamp(0.0, 1.0))
    }
}

/// TLS settings of the client. Its `Debug` shows no key.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// PEM CA that signed the server's certificate (else the system roots
    /// are not used: give one).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify the server's certificate against, if not the
    /// endpoint's host.
    pub domain: Option<String>,
}

/// Where and how to connect. Its `Debug` shows no token or key.
#[derive(Clone)]
pub struct ClientConfig {
    /// `http://host:port`, or `https://host:port` with `tls`.
    pub endpoint: String,
    /// Bearer token sent as `authorization: Bearer …`.
    pub token: Option<String>,
    /// TLS settings, for `https://` endpoints.
    pub tls: Option<ClientTls>,
    /// Retries.
    pub retry: RetryPolicy,
    /// The trace every call continues (`orderctl` reads `TRACEPARENT`).
    /// Without it, a call continues the calling code's current
    /// OpenTelemetry span, if there is one.
    pub trace_parent: Option<TraceParent>,
    /// Whether a call that has no trace to continue starts one of its own
    /// (sampled), so the server's spans of all its attempts share one
    /// trace. On by default; a busy caller that leaves sampling to the
    /// server (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`) turns it off.
    pub start_traces: bool,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| pem.len()))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish()
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("retry", &self.retry)
            .field("trace_parent", &self.trace_parent)
            .field("start_traces", &self.start_traces)
            .finish()
    }
}

impl ClientConfig {
    /// Plain text to `endpoint`, no token, default retries, traces started.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            token: None,
            tls: None,
            retry: RetryPolicy::default(),
            trace_parent: None,
            start_traces: true,
        }
    }

    /// The endpoint these settings describe, for any gRPC client.
    pub fn endpoint(&self) -> Result<Endpoint, CallError> {
        let mut endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| config_error(format!("bad address {}: {e}", self.endpoint)))?
            .connect_timeout(self.retry.attempt_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            let mut settings = ClientTlsConfig::new();
            if let Some(ca) = &tls.ca_pem {
                settings = settings.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.identity {
                settings = settings.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &tls.domain {
                settings = settings.domain_name(domain.clone());
            }
            endpoint =
                endpoint.tls_config(settings).map_err(|e| config_error(format!("TLS settings: {e}")))?;
        }
        Ok(endpoint)
    }
}

/// A successful call: the answer and how many attempts it took.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    /// The server's answer.
    pub value: T,
    /// Attempts made, the successful one included.
    pub attempts: u32,
    /// The idempotency key used (PlaceOrder only).
    pub client_request_id: Option<String>,
    /// The trace the call's attempts were sent in, if any.
    pub trace_id: Option<String>,
}

/// A call that failed for good.
#[derive(Debug, Clone)]
pub struct CallError {
    /// The last status: final at once, or retryable but out of attempts or time.
    pub status: Status,
    /// Attempts made.
    pub attempts: u32,
    /// The idempotency key used (PlaceOrder only): retry later with this key.
    pub client_request_id: Option<String>,
    /// PlaceOrder only: some attempt may have written the order (see
    /// [`may_have_written`]), so it may exist; retrying with
    /// `client_request_id` tells (it replays the order, or places it once).
    pub outcome_unknown: bool,
    /// The trace the call's attempts were sent in, if any.
    pub trace_id: Option<String>,
}

impl CallError {
    /// Whether the service could not be reached or stayed unavailable, as
    /// opposed to refusing the request.
    pub fn is_unreachable(&self) -> bool {
        RetryPolicy::is_retryable(self.status.code())
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {} (after {} attempt(s))", self.status.code(), self.status.message(), self.attempts)
    }
}

impl std::error::Error for CallError {}

/// The order service, called with retries.
#[derive(Debug, Clone)]
pub struct OrderClient {
    inner: OrderServiceClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    retry: RetryPolicy,
    trace_parent: Option<TraceParent>,
    start_traces: bool,
}

fn config_error(message: impl fmt::Display) -> CallError {
    CallError {
        status: Status::invalid_argument(message.to_string()),
        attempts: 0,
        client_request_id: None,
        outcome_unknown: false,
        trace_id: None,
    }
}

impl OrderClient {
    /// A client for `config.endpoint`. It connects lazily, and reconnects by
    /// itself, so a server that is down now is retried like any other outage.
    pub fn new(config: ClientConfig) -> Result<Self, CallError> {
        let endpoint = config.endpoint()?;
        let token = match config.token {
            Some(token) => {
                let mut value: MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}")
                    .parse()
                    .map_err(|_| config_error("the token has characters a header cannot carry"))?;
                // Kept out of Debug output, and out of HPACK's dynamic table
                // (never indexed), as HTTP/2 advises for credentials.
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Self {
            inner: OrderServiceClient::new(endpoint.connect_lazy()),
            token,
            retry: config.retry,
            trace_parent: config.trace_parent,
            start_traces: config.start_traces,
        })
    }

    /// The trace context one call's attempts carry: the configured one, the
    /// calling code's current span, or a trace of the call's own.
    fn trace_context(&self) -> Option<(TraceParent, MetadataValue<tonic::metadata::Ascii>)> {
        let parent = self
            .trace_parent
            .clone()
            .or_else(TraceParent::current)
            .or_else(|| self.start_traces.then(|| TraceParent::start(true)))?;
        let header = parent.to_string().parse().ok()?;
        Some((parent, header))
    }

    /// Runs `call` with retries; `message` is sent unchanged on every attempt.
    async fn with_retries<M: Clone, T, F, Fut>(
        &mut self,
        message: M,
        key: Option<String>,
        call: F,
    ) -> Result<Answer<T>, CallError>
    where
        F: Fn(OrderServiceClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut attempt = 0;
        let mut outcome_unknown = false;
        let trace = self.trace_context();
        let trace_state = trace.as_ref().and_then(|(parent, _)| parent.state.as_deref()?.parse().ok());
        let trace_id = trace.as_ref().map(|(parent, _)| parent.trace_id_hex());
        loop {
            attempt += 1;
            let remaining = self.retry.total_timeout.saturating_sub(started.elapsed());
            let timeout = self.retry.attempt_timeout.min(remaining);
            let mut request = Request::new(message.clone());
            request.set_timeout(timeout);
            if let Some(token) = &self.token {
                request.metadata_mut().insert("authorization", token.clone());
            }
            if let Some((_, traceparent)) = &trace {
                request.metadata_mut().insert("traceparent", traceparent.clone());
                if let Some(state) = &trace_state {
                    request.metadata_mut().insert("tracestate", MetadataValue::clone(state));
                }
            }
            let answer = tokio::time::timeout(timeout, call(self.inner.clone(), request)).await;
            if let Ok(Err(status)) = &answer {
                outcome_unknown |= key.is_some() && may_have_written(status);
            }
            let status = match answer {
                Ok(Ok(response)) => {
                    return Ok(Answer {
                        value: response.into_inner(),
                        attempts: attempt,
                        client_request_id: key,
                        trace_id,
                    });
                }
                Ok(Err(status)) if broke_in_transport(&status) => {
                    Status::unavailable(format!("the connection broke: {}", transport_cause(&status)))
                }
                Ok(Err(status)) => status,
                Err(_) => {
                    outcome_unknown |= key.is_some();
                    Status::deadline_exceeded(format!("no answer within {timeout:?}"))
                }
            };
            let delay = self.retry.delay(attempt, &status, random_unit());
            let out_of_time = started.elapsed() + delay >= self.retry.total_timeout;
            if !RetryPolicy::may_retry(&status) || attempt >= self.retry.max_attempts || out_of_time {
                return Err(CallError {
                    status,
                    attempts: attempt,
                    client_request_id: key,
                    outcome_unknown,
                    trace_id,
                });
            }
            if let Some(on_retry) = &self.retry.on_retry {
                on_retry(attempt, &status);
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// Places an order exactly once: a key is generated if `request` has
    /// none, and every attempt sends the same key. The answer says whether
    /// the server replayed an earlier attempt.
    pub async fn place_order(
        &mut self,
        mut request: PlaceOrderRequest,
    ) -> Result<Answer<PlaceOrderResponse>, CallError> {
        if request.client_request_id.is_empty() {
            request.client_request_id = uuid::Uuid::new_v4().to_string();
        }
        let key = Some(request.client_request_id.clone());
        self.with_retries(request, key, |mut c, r| async move { c.place_order(r).await }).await
    }

    /// One order by id or key.
    pub async fn get_order(&mut self, request: GetOrderRequest) -> Result<Answer<Order>, CallError> {
        self.with_retries(request, None, |mut c, r| async move { c.get_order(r).await }).await
    }

    /// A page of orders.
    pub async fn list_orders(
        &mut self,
        request: ListOrdersRequest,
    ) -> Result<Answer<ListOrdersResponse>, CallError> {
        self.with_retries(request, None, |mut c, r| async move { c.list_orders(r).await }).await
    }

    /// Cancels an order; safe to retry (a second cancel returns it unchanged).
    pub async fn cancel_order(&mut self, request: CancelOrderRequest) -> Result<Answer<Order>, CallError> {
        self.with_retries(request, None, |mut c, r| async move { c.cancel_order(r).await }).await
    }
}

/// Whether `status` is the client's own report of a broken transport (the
/// connection was refused, reset, closed by a GOAWAY or by the server dying)
/// rather than a status the server sent: tonic reports those as `UNKNOWN`,
/// `CANCELLED` or `INTERNAL` with the transport error as the source, while a
/// server's status has no source. The call may or may not have run, and
/// every call of this client is safe to repeat (PlaceOrder by its key), so
/// it is retried like `UNAVAILABLE`.
pub fn broke_in_transport(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
}

/// Whether the service answered `OUTCOME_UNKNOWN`: the write was sent and
/// its outcome could not be waited for.
pub fn is_outcome_unknown(status: &Status) -> bool {
    status.get_details_error_info().is_some_and(|info| info.reason == crate::OUTCOME_UNKNOWN)
}

/// Whether a PlaceOrder that failed with `status` may have written its
/// order. Not when the service refused it (a refusal code, or an answer
/// with this service's `ErrorInfo` other than `OUTCOME_UNKNOWN`: those wrote
/// nothing), nor when the connection was refused; yes for `OUTCOME_UNKNOWN`
/// and for every failure where no answer of the service's came (a broken
/// connection, a local timeout, `CANCELLED` or `UNKNOWN` from a timer or a
/// proxy).
pub fn may_have_written(status: &Status) -> bool {
    if is_outcome_unknown(status) {
        return true;
    }
    if broke_in_transport(status) {
        return !connection_refused(status);
    }
    if status.get_details_error_info().is_some_and(|info| info.domain == crate::ERROR_DOMAIN) {
        return false;
    }
    !matches!(
        status.code(),
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::ResourceExhausted
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// Whether a transport failure was the connection being refused (nothing
/// was sent).
fn connection_refused(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// The innermost error behind a transport failure, for the retry message.
fn transport_cause(status: &Status) -> String {
    let mut cause = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        cause = error.to_string();
        source = error.source();
    }
    cause
}

/// A random number in 0..1 for jitter.
fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn no_credential_shows_in_debug_output() {
        let mut config = super::ClientConfig::new("http://127.0.0.1:1");
        config.token = Some("s3cret-token".into());
        config.tls = Some(super::ClientTls {
            identity: Some((b"CERT".to_vec(), b"PRIVATE-KEY-BYTES".to_vec())),
            ..Default::default()
        });
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("80, 82, 73"), "{shown}");
        let client = super::OrderClient::new(super::ClientConfig { tls: None, ..config }).unwrap();
        let shown = format!("{client:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    use super::*;
    use tonic_types::ErrorDetails;

    #[test]
    fn only_safe_codes_are_retried() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::ResourceExhausted,
            Code::Cancelled,
        ] {
            assert!(RetryPolicy::is_retryable(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::AlreadyExists,
            Code::Internal,
        ] {
            assert!(!RetryPolicy::is_retryable(code), "{code:?}");
        }
    }

    #[test]
    fn backoff_grows_exponentially_within_its_bounds_with_full_jitter() {
        let policy = RetryPolicy::default();
        let unavailable = Status::unavailable("down");
        for attempt in 1..=10 {
            let cap = policy.backoff_cap(attempt);
            assert!(cap <= policy.max_backoff);
            assert_eq!(policy.delay(attempt, &unavailable, 0.0), Duration::ZERO);
            assert_eq!(policy.delay(attempt, &unavailable, 1.0), cap);
            let d = policy.delay(attempt, &unavailable, random_unit());
            assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
        }
        assert_eq!(policy.backoff_cap(1), Duration::from_millis(50));
        assert_eq!(policy.backoff_cap(3), Duration::from_millis(200));
        assert_eq!(policy.backoff_cap(30), policy.max_backoff);
    }

    #[test]
    fn retry_info_is_honoured_up_to_the_max_backoff() {
        let policy = RetryPolicy::default();
        let asked = |delay| {
            Status::with_error_details(Code::Unavailable, "busy", ErrorDetails::with_retry_info(Some(delay)))
        };
        assert_eq!(policy.delay(1, &asked(Duration::from_millis(300)), 0.0), Duration::from_millis(300));
        assert_eq!(policy.delay(1, &asked(Duration::from_secs(60)), 0.0), policy.max_backoff);
    }
}
