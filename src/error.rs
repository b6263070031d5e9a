//! The one error type of the service and its single mapping to `tonic::Status`.
//!
//! Each variant's doc names the gRPC code it becomes. Causes of `UNAVAILABLE`
//! and `INTERNAL` are logged here, with the span of the RPC as context, and
//! replaced by an opaque message: callers never see SQL or stack traces.
//!
//! Every failure of PlaceOrder says one of two things, and only one variant
//! says the second: *nothing was written, and nothing will be* (every
//! variant but one), or *outcome unknown* ([`Error::OutcomeUnknown`], reason
//! [`OUTCOME_UNKNOWN`]): the write was sent, or its batch had begun, and its
//! outcome could not be waited for; the caller retries with the same
//! `client_request_id` to learn it. A failure after the write was sent is
//! never reported as "nothing was written".

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::{ClientRequestId, OrderField, OrderId};

pub use order_client::{ERROR_DOMAIN, OUTCOME_UNKNOWN};
/// How long a caller should wait before retrying an `UNAVAILABLE` answer.
pub const UNAVAILABLE_RETRY_DELAY: Duration = Duration::from_millis(250);
/// How long a caller should wait before retrying a `RESOURCE_EXHAUSTED`.
pub const OVERLOADED_RETRY_DELAY: Duration = Duration::from_millis(200);
/// How long a caller should wait before retrying an `IDEMPOTENCY_KEY_IN_USE`.
pub const KEY_IN_USE_RETRY_DELAY: Duration = Duration::from_millis(100);
/// How long a caller should wait before retrying an `OUTCOME_UNKNOWN`
/// answer (to learn the outcome) or a deadline that passed.
pub const OUTCOME_UNKNOWN_RETRY_DELAY: Duration = Duration::from_millis(100);

/// `ErrorDetails` with an `ErrorInfo` of `reason` in [`ERROR_DOMAIN`] and a
/// `RetryInfo` of `delay`.
fn retryable(reason: &str, delay: Duration) -> ErrorDetails {
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::<String, String>::new());
    details.set_retry_info(Some(delay));
    details
}

/// A boxed cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// One refused request field: the proto field name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Proto field name, e.g. `quantity`.
    pub field: String,
    /// A sentence for the caller.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// Everything that can go wrong serving a call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `INVALID_ARGUMENT` with one `BadRequest` field violation per problem.
    #[error("invalid request ({} field violations)", .0.len())]
    InvalidArgument(Vec<FieldViolation>),

    /// `UNAUTHENTICATED`: missing, malformed or unknown credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),

    /// `RESOURCE_EXHAUSTED` with `RetryInfo`: too many calls in flight.
    #[error("too many calls in flight")]
    Overloaded,

    /// `NOT_FOUND`: no such order for this account.
    #[error("order not found")]
    NotFound,

    /// `FAILED_PRECONDITION` with `ErrorInfo{reason: IDEMPOTENCY_KEY_REUSED}`:
    /// the key already placed an order with other fields.
    #[error("idempotency key reused for order {order_id} with other {mismatched:?}")]
    KeyReused {
        /// The order the key placed.
        order_id: OrderId,
        /// Fields whose values differ, in proto field order.
        mismatched: Vec<OrderField>,
    },

    /// `ABORTED` with `ErrorInfo{reason: IDEMPOTENCY_KEY_IN_USE}` and
    /// `RetryInfo`: another call with this key is still being placed, and it
    /// outlasted the caller's deadline or the lock timeout; or other calls
    /// (expiry, the purge, other replicas) changed the key on every round of
    /// this one. Nothing was written.
    #[error("idempotency key in use by a call still in flight")]
    KeyInUse,

    /// `DEADLINE_EXCEEDED` with `ErrorInfo{reason: DEADLINE_EXCEEDED}` and
    /// `RetryInfo`: the caller's deadline passed before the write was sent
    /// (queued, waiting for a connection or a lock); nothing was written, and
    /// nothing will be.
    #[error("the caller's deadline passed before the write was sent")]
    DeadlineExceeded,

    /// A retryable code (`DEADLINE_EXCEEDED` when the caller's deadline cut
    /// the wait, else `UNAVAILABLE`) with `ErrorInfo{reason: OUTCOME_UNKNOWN,
    /// metadata: {client_request_id}}` and `RetryInfo`: the write was sent (or
    /// its batch had begun) and its outcome could not be waited for. The
    /// order may exist; a retry with the same key tells (it replays the
    /// order, or places it once). Never "nothing was written".
    #[error("outcome unknown while {context}")]
    OutcomeUnknown {
        /// The key to retry with.
        client_request_id: ClientRequestId,
        /// Whether the caller's deadline cut the wait (else the connection
        /// or the commit failed).
        deadline: bool,
        /// What the service was doing.
        context: &'static str,
        /// The cause, logged but never sent.
        #[source]
        source: BoxError,
    },

    /// `UNAVAILABLE` with `ErrorInfo{reason: DATASTORE_UNAVAILABLE}` and
    /// `RetryInfo`: the database is down, busy or out of connections, and
    /// the write was never sent (or was refused whole): nothing was written.
    #[error("datastore unavailable while {context}")]
    Unavailable {
        /// What the service was doing.
        context: &'static str,
        /// The cause, logged but never sent.
        #[source]
        source: BoxError,
    },

    /// `INTERNAL` with an opaque message; the cause is logged.
    #[error("internal error while {context}")]
    Internal {
        /// What the service was doing.
        context: &'static str,
        /// The cause, logged but never sent.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// A one-field `INVALID_ARGUMENT`.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// `INTERNAL` from a cause.
    pub fn internal(context: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Internal { context, source: source.into() }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::Overloaded => Code::ResourceExhausted,
            Self::NotFound => Code::NotFound,
            Self::KeyReused { .. } => Code::FailedPrecondition,
            Self::KeyInUse => Code::Aborted,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::OutcomeUnknown { deadline: true, .. } => Code::DeadlineExceeded,
            Self::OutcomeUnknown { deadline: false, .. } => Code::Unavailable,
            Self::Unavailable { .. } => Code::Unavailable,
            Self::Internal { .. } => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        match error {
            Error::InvalidArgument(violations) => {
                let message = violations
                    .iter()
                    .map(|v| format!("{} {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(code, message, details)
            }
            Error::Unauthenticated(why) => Status::new(code, why),
            Error::Overloaded => Status::with_error_details(
                code,
                "too many calls in flight; retry shortly",
                retryable("OVERLOADED", OVERLOADED_RETRY_DELAY),
            ),
            Error::NotFound => Status::new(code, "order not found"),
            Error::KeyReused { order_id, mismatched } => {
                let names = mismatched.iter().map(|f| f.name()).collect::<Vec<_>>().join(",");
                let message = format!(
                    "client_request_id already placed order {order_id} with different {names}; \
                     use a fresh client_request_id for a new order"
                );
                let metadata = HashMap::from([
                    ("order_id".to_owned(), order_id.to_string()),
                    ("mismatched_fields".to_owned(), names),
                ]);
                let details = ErrorDetails::with_error_info("IDEMPOTENCY_KEY_REUSED", ERROR_DOMAIN, metadata);
                Status::with_error_details(code, message, details)
            }
            Error::KeyInUse => Status::with_error_details(
                code,
                "another call with this client_request_id is still in flight; retry with the same client_request_id",
                retryable("IDEMPOTENCY_KEY_IN_USE", KEY_IN_USE_RETRY_DELAY),
            ),
            Error::DeadlineExceeded => Status::with_error_details(
                code,
                "the deadline passed before the order was written; nothing was written, \
                 retry with the same client_request_id",
                retryable("DEADLINE_EXCEEDED", OUTCOME_UNKNOWN_RETRY_DELAY),
            ),
            Error::OutcomeUnknown { client_request_id, deadline, context, source } => {
                tracing::warn!(error = %source, deadline, "outcome unknown while {context}");
                let metadata =
                    HashMap::from([("client_request_id".to_owned(), client_request_id.to_string())]);
                let mut details = ErrorDetails::with_error_info(OUTCOME_UNKNOWN, ERROR_DOMAIN, metadata);
                details.set_retry_info(Some(OUTCOME_UNKNOWN_RETRY_DELAY));
                let why = if deadline {
                    "the deadline passed while the order was being written"
                } else {
                    "the database connection failed while the order was being committed"
                };
                Status::with_error_details(
                    code,
                    format!(
                        "{why}: it may or may not have been placed; retry with the same \
                         client_request_id {client_request_id} to learn the outcome"
                    ),
                    details,
                )
            }
            Error::Unavailable { context, source } => {
                tracing::warn!(error = %source, "datastore unavailable while {context}");
                let details = retryable("DATASTORE_UNAVAILABLE", UNAVAILABLE_RETRY_DELAY);
                Status::with_error_details(
                    code,
                    "the order database is unavailable; nothing was written, retry with the same client_request_id",
                    details,
                )
            }
            Error::Internal { context, source } => {
                tracing::error!(error = %source, "internal error while {context}");
                Status::new(code, "internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};
    use tonic_types::StatusExt;

    /// The service's answers say what was written; answers without them
    /// (timers, proxies, broken connections) may have written.
    #[test]
    fn what_may_have_written_is_told_apart() {
        let answer = |error: crate::error::Error| Status::from(error);
        let key = crate::domain::ClientRequestId::parse("0b6e8a53-2a4e-4c8e-9d62-3f1b1f0e6a01").unwrap();
        let unknown = answer(crate::error::Error::OutcomeUnknown {
            client_request_id: key,
            deadline: true,
            context: "test",
            source: "test".into(),
        });
        assert!(order_client::may_have_written(&unknown) && order_client::RetryPolicy::may_retry(&unknown));
        assert_eq!(unknown.code(), Code::DeadlineExceeded);
        let info = unknown.get_details_error_info().unwrap();
        assert_eq!(info.metadata["client_request_id"], key.to_string());
        for not_written in [
            answer(crate::error::Error::DeadlineExceeded),
            answer(crate::error::Error::KeyInUse),
            answer(crate::error::Error::Unavailable { context: "test", source: "test".into() }),
            answer(crate::error::Error::invalid("symbol", "bad")),
        ] {
            assert!(!order_client::may_have_written(&not_written), "{not_written:?}");
        }
        for maybe in [Status::cancelled("Timeout expired"), Status::unknown("proxy"), Status::internal("?")] {
            assert!(order_client::may_have_written(&maybe), "{maybe:?}");
        }
    }
}
