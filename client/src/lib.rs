//! The client side of order-service: the generated `orders.v1` messages and
//! client stubs, a retrying client that places an order exactly once however
//! often it retries ([`OrderClient`]), and the load generator behind
//! `orderctl bench`. Its dependencies stop at gRPC: no database driver, no
//! SQLite, no HTTP server.
//!
//! ```no_run
//! # async fn example() -> Result<(), order_client::CallError> {
//! use order_client::{ClientConfig, OrderClient};
//! use order_client::proto::{OrderType, PlaceOrderRequest, Side};
//!
//! let mut client = OrderClient::new(ClientConfig::new("http://127.0.0.1:50051"))?;
//! let placed = client
//!     .place_order(PlaceOrderRequest {
//!         symbol: "AAPL".into(),
//!         side: Side::Buy as i32,
//!         order_type: OrderType::Limit as i32,
//!         quantity: "10".into(),
//!         limit_price: "187.50".into(),
//!         ..Default::default() // no key given: one is generated and reused on retries
//!     })
//!     .await?;
//! println!("{} after {} attempt(s), replayed: {}", placed.value.order.unwrap().order_id, placed.attempts, placed.value.replayed);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod bench;
pub mod proto;
mod retry;
mod trace;

pub use retry::*;
use tonic::Code;
pub use trace::TraceParent;

/// The `ErrorInfo.domain` of every error the service reports.
pub const ERROR_DOMAIN: &str = "orders.v1";

/// The `ErrorInfo.reason` of an answer that cannot say whether the order was
/// written: retry with the same `client_request_id` to learn the outcome.
/// Every other failure of PlaceOrder wrote nothing and never will.
pub const OUTCOME_UNKNOWN: &str = "OUTCOME_UNKNOWN";

/// The code's name as grpc-go spells it (`OK`, `InvalidArgument`, …): the
/// `grpc_code` label of the service's metrics, and how bench reports errors.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}
