//! Every [`Error`] answered as a `tonic::Status`, in one place: its code,
//! a message a caller can act on, and the rich details (`ErrorInfo` in
//! domain [`ERROR_DOMAIN`], `RetryInfo`, `BadRequest`) docs/design.md and
//! docs/api.md (Semantics) name.
//! Causes of `UNAVAILABLE`, `INTERNAL` and outcome-unknown answers are
//! logged here, with the span of the RPC as context, and replaced by an
//! opaque message: callers never see SQL or stack traces.

use std::{collections::HashMap, time::Duration};

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;

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

    use crate::error::Error;
    use tonic_types::StatusExt;

    /// The service's answers say what was written; answers without them
    /// (timers, proxies, broken connections) may have written.
    #[test]
    fn what_may_have_written_is_told_apart() {
        let answer = |error: Error| Status::from(error);
        let key = crate::domain::ClientRequestId::parse("0b6e8a53-2a4e-4c8e-9d62-3f1b1f0e6a01").unwrap();
        let unknown = answer(Error::OutcomeUnknown {
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
            answer(Error::DeadlineExceeded),
            answer(Error::KeyInUse),
            answer(Error::Unavailable { context: "test", source: "test".into() }),
            answer(Error::invalid("symbol", "bad")),
        ] {
            assert!(!order_client::may_have_written(&not_written), "{not_written:?}");
        }
        for maybe in [Status::cancelled("Timeout expired"), Status::unknown("proxy"), Status::internal("?")] {
            assert!(order_client::may_have_written(&maybe), "{maybe:?}");
        }
    }

    /// A key that stayed busy (`KeyInUse`) says when to retry.
    #[test]
    fn key_in_use_is_a_retryable_aborted() {
        let status = Status::from(Error::KeyInUse);
        assert_eq!(status.code(), Code::Aborted);
        assert!(status.get_details_retry_info().is_some(), "RetryInfo tells when to retry");
    }
}
