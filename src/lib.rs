//! order-service: a gRPC order service whose one promise is that an order is
//! placed **exactly once**, however often a caller retries.
//!
//! `orders.v1.OrderService.PlaceOrder` carries a client-generated
//! `client_request_id`. The key and the order are written in one database
//! transaction guarded by a unique constraint, so a retried or duplicated call
//! gets the order that was persisted, never a second one; the same key with
//! other fields is refused and nothing is written.
//!
//! # Layout
//!
//! From the top down; a module uses only those below it.
//!
//! - [`server`]: running the process: [`server::Application`] connects,
//!   migrates and binds, serves until a shutdown signal, and drains; the
//!   listeners' admission and TLS, the middleware, the background tasks.
//! - [`api`]: the gRPC layer: callers authenticated from their headers, then
//!   request to domain to store to response, and each [`error::Error`]
//!   answered as its `tonic::Status`.
//! - [`bench`]: `order-service bench-store`, the store driven without gRPC.
//! - [`store`]: the [`store::Store`] over SQLite or Postgres; all SQL lives there.
//! - [`telemetry`]: logs (text or JSON) and Prometheus metrics.
//! - [`config`]: the one clap struct; every flag is also an `ORDERS_*` variable.
//! - [`proto`]: the generated protobuf messages (from the client crate),
//!   service stubs, and the descriptor set.
//! - [`error`]: the one [`error::Error`], and what each means for a caller.
//! - [`domain`]: validated types (keys, symbols, decimals, orders); no I/O.
//! - [`clock`]: where SQLite's times come from (tests move it by hand);
//!   Postgres reads the database server's clock.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations)]

pub mod api;
pub mod bench;
pub mod clock;
pub mod config;
pub mod domain;
pub mod error;
pub mod proto;
pub mod server;
pub mod store;
pub mod telemetry;
