//! The one error type of the service. Each variant's doc names the gRPC
//! code it becomes; the API answers it as a `tonic::Status` in one place
//! (`api::status`), which logs the causes of `UNAVAILABLE` and `INTERNAL`
//! and never shows them to callers.
//!
//! Every failure of PlaceOrder says one of two things, and only one variant
//! says the second: *nothing was written, and nothing will be* (every
//! variant but one), or *outcome unknown* ([`Error::OutcomeUnknown`], reason
//! [`order_client::OUTCOME_UNKNOWN`]): the write was sent, or its batch had begun, and its
//! outcome could not be waited for; the caller retries with the same
//! `client_request_id` to learn it. A failure after the write was sent is
//! never reported as "nothing was written".

use tonic::Code;

use crate::domain::{ClientRequestId, OrderField, OrderId};

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
