//! The gRPC layer: turns requests into validated domain values, calls the
//! store, and turns the result back into protobuf. It never sees SQL.
//!
//! Each RPC runs in its server span (made by the RPC middleware, see
//! `telemetry::traces`), on which the handler records `account_id`,
//! `client_request_id`, `order_id`, the `outcome` and the status `code`;
//! it ends with one event. The store's work runs in a database span.

mod auth;
mod convert;
mod faults;
pub mod page_token;
mod status;

pub(crate) use auth::{AuthLayer, Authenticator};
pub use auth::{ORDER_SERVICE_PATH, check_token_file, new_token, preauthenticate};
pub use convert::{GetOrderBy, ListQuery};
pub use faults::FaultInjector;

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, metadata::MetadataValue};
use tracing::{Instrument as _, Span, field};

use crate::{
    domain::{AccountId, NewOrder, Order, OrderId},
    error::Error,
    proto::{self, order_service_server::OrderService},
    store::Store,
    telemetry::{metrics, traces},
};

/// The response header set on a replayed `PlaceOrder`.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// When a call reached the service, in its request's extensions (set by
/// the server's first middleware): its deadline counts from there.
#[derive(Debug, Clone, Copy)]
pub struct Arrival(pub Instant);

/// Who is at the other end of a connection, in every request's extensions
/// (set by the server's listeners): what authentication reads.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<std::net::SocketAddr>,
    /// The client certificate chain it presented in its TLS handshake.
    pub certs: Option<Arc<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>>>,
}

/// Limits and lifetimes of the order API.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// How long idempotency keys are remembered.
    pub idempotency_ttl: Duration,
    /// Most time a call waits for another call in flight with its key.
    pub lock_timeout: Duration,
    /// The longest a call may take, whatever deadline its caller sent.
    pub request_timeout: Duration,
    /// Most order calls served at once; more are refused.
    pub max_concurrent_requests: u32,
    /// Faults injected by tests (none unless a test asks).
    pub faults: Arc<FaultInjector>,
}

/// `orders.v1.OrderService` over a [`Store`].
#[derive(Debug, Clone)]
pub struct OrderApi {
    store: Store,
    auth: Arc<Authenticator>,
    settings: ApiSettings,
    in_flight: Arc<Semaphore>,
}

impl OrderApi {
    /// The service over `store`, identifying callers with `auth`.
    pub fn new(store: Store, auth: Arc<Authenticator>, settings: ApiSettings) -> Self {
        let in_flight = Arc::new(Semaphore::new(settings.max_concurrent_requests as usize));
        Self { store, auth, settings, in_flight }
    }

    /// Runs one store call in its database span, the child of the call's
    /// server span (none with traces off), which records a failure the
    /// server is to blame for.
    async fn in_db_span<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let span = traces::db_span(operation, self.store.system());
        let result = call.instrument(span.clone()).await;
        if let Err(error) = &result {
            traces::record_error(&span, error.code());
        }
        result
    }

    /// Who is calling (recorded on the call's span), and a place among the
    /// calls in flight.
    fn admit<T>(&self, request: &Request<T>) -> Result<(AccountId, OwnedSemaphorePermit), Error> {
        let account = self.auth.authenticate(request)?;
        Span::current().record("account_id", account.as_str());
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| Error::Overloaded)?;
        Ok((account, permit))
    }

    /// How long a call that arrived at `started` may wait for a lock, and
    /// by when it answers. Both beat the caller's deadline (`grpc-timeout`),
    /// so the service answers its own deadline, truthfully, before tonic's
    /// timer answers `CANCELLED`: a lock not taken by the lock wait wrote
    /// nothing; by the deadline the store says whether the write was sent.
    fn limits<T>(&self, request: &Request<T>, started: Instant) -> (Duration, Instant) {
        let sent = request.metadata().get("grpc-timeout").and_then(|v| parse_grpc_timeout(v.as_bytes()));
        // tonic enforces the server's own request timeout the same way.
        let timeout = sent.map_or(self.settings.request_timeout, |t| t.min(self.settings.request_timeout));
        // tonic's timer started before this handler did: keep a margin (a
        // fifth of the deadline, at most 250 ms) for that.
        let margin = (timeout / 5).min(Duration::from_millis(250));
        let lock_wait = self.settings.lock_timeout.min(timeout.saturating_sub(margin * 2));
        (lock_wait, started + timeout.saturating_sub(margin))
    }
}

/// Records how a call ended on the current span, logs it, and maps the error.
fn finish<T>(
    method: &'static str,
    started: Instant,
    result: Result<T, Error>,
    outcome: impl FnOnce(&T) -> &'static str,
) -> Result<T, Status> {
    let span = Span::current();
    let (outcome, code) = match &result {
        Ok(value) => (outcome(value), tonic::Code::Ok),
        Err(error) => (
            match error {
                Error::InvalidArgument(_) => "invalid",
                Error::Unauthenticated(_) => "unauthenticated",
                Error::Overloaded => "overloaded",
                Error::NotFound => "not_found",
                Error::KeyReused { .. } => "key_reused",
                Error::KeyInUse => "key_in_use",
                Error::DeadlineExceeded => "deadline_exceeded",
                Error::OutcomeUnknown { .. } => "outcome_unknown",
                Error::Unavailable { .. } => "unavailable",
                Error::Internal { .. } => "error",
            },
            error.code(),
        ),
    };
    span.record("outcome", outcome);
    span.record("code", order_client::code_name(code));
    span.record("latency_ms", started.elapsed().as_secs_f64() * 1000.0);
    // grpc_server_handled_total is counted by the server's metrics layer.
    if method == "PlaceOrder" {
        metrics::record_place_outcome(outcome);
    }
    let result = result.map_err(Status::from);
    tracing::info!("finished");
    result
}

/// Parses a `grpc-timeout` header value: at most 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A caller-sent value for a log field, cut short so a huge field cannot
/// flood the logs.
pub(crate) fn loggable(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn place_order(
        &self,
        request: Request<proto::PlaceOrderRequest>,
    ) -> Result<Response<proto::PlaceOrderResponse>, Status> {
        let started = request.extensions().get::<Arrival>().map_or_else(Instant::now, |arrival| arrival.0);
        let span = Span::current();
        let (lock_wait, deadline) = self.limits(&request, started);
        let result = async {
            let (account, _permit) = self.admit(&request)?;
            let request = request.into_inner();
            let raw_key = loggable(&request.client_request_id).to_owned();
            let new = NewOrder::try_from(request).inspect_err(|_| {
                span.record("client_request_id", raw_key);
            })?;
            span.record("client_request_id", field::display(new.client_request_id));
            let placing = self.store.place_order(
                &account,
                new,
                self.settings.idempotency_ttl,
                lock_wait,
                Some(deadline),
            );
            let placed = self.in_db_span("place_order", placing).await?;
            span.record("order_id", field::display(placed.0.order_id));
            Ok(placed)
        }
        .await;
        let (order, placement) = finish("PlaceOrder", started, result, |(_, placement)| placement.as_str())?;
        if self.settings.faults.take_lost_reply() {
            return Err(Status::unavailable("injected fault: the reply was lost after the commit"));
        }
        let replayed = placement == crate::store::Placement::Replayed;
        let mut response = Response::new(proto::PlaceOrderResponse { order: Some(order.into()), replayed });
        if replayed {
            response.metadata_mut().insert(REPLAYED_HEADER, MetadataValue::from_static("true"));
        }
        Ok(response)
    }

    async fn get_order(
        &self,
        request: Request<proto::GetOrderRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        let started = Instant::now();
        let span = Span::current();
        let result = async {
            let (account, _permit) = self.admit(&request)?;
            let order: Order = match GetOrderBy::try_from(request.into_inner())? {
                GetOrderBy::OrderId(id) => {
                    span.record("order_id", field::display(id));
                    self.in_db_span("get_order", self.store.get_order(&account, id)).await?
                }
                GetOrderBy::ClientRequestId(key) => {
                    span.record("client_request_id", field::display(key));
                    self.in_db_span("get_order", self.store.get_order_by_key(&account, key)).await?
                }
            };
            span.record("order_id", field::display(order.order_id));
            Ok(order)
        }
        .await;
        let order = finish("GetOrder", started, result, |_| "found")?;
        Ok(Response::new(order.into()))
    }

    async fn list_orders(
        &self,
        request: Request<proto::ListOrdersRequest>,
    ) -> Result<Response<proto::ListOrdersResponse>, Status> {
        let started = Instant::now();
        let span = Span::current();
        let result = async {
            let (account, _permit) = self.admit(&request)?;
            let query = ListQuery::try_from(request.into_inner())?;
            let after = match query.page_token.as_str() {
                "" => None,
                token => Some(
                    page_token::decode(token, &account, &query.filter)
                        .map_err(|why| Error::invalid("page_token", why))?,
                ),
            };
            // One more than asked tells whether another page follows.
            let listing = self.store.list_orders(&account, &query.filter, after, query.page_size + 1);
            let mut orders = self.in_db_span("list_orders", listing).await?;
            let next_page_token = if orders.len() > query.page_size as usize {
                orders.truncate(query.page_size as usize);
                orders.last().map(|last| page_token::encode(&account, &query.filter, last.cursor()))
            } else {
                None
            };
            span.record("listed", orders.len());
            Ok(proto::ListOrdersResponse {
                orders: orders.into_iter().map(Into::into).collect(),
                next_page_token: next_page_token.unwrap_or_default(),
            })
        }
        .await;
        Ok(Response::new(finish("ListOrders", started, result, |_| "listed")?))
    }

    async fn cancel_order(
        &self,
        request: Request<proto::CancelOrderRequest>,
    ) -> Result<Response<proto::Order>, Status> {
        let started = Instant::now();
        let span = Span::current();
        let result = async {
            let (account, _permit) = self.admit(&request)?;
            let id = OrderId::try_from(request.into_inner())?;
            span.record("order_id", field::display(id));
            self.in_db_span("cancel_order", self.store.cancel_order(&account, id)).await
        }
        .await;
        let (order, _) =
            finish(
                "CancelOrder",
                started,
                result,
                |(_, changed)| if *changed { "canceled" } else { "already_canceled" },
            )?;
        Ok(Response::new(order.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"250000u"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout(b"7n"), Some(Duration::from_nanos(7)));
        for bad in [&b""[..], b"m", b"123456789m", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
