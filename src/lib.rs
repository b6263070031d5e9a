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
//! - [`config`]: the one clap struct; every flag is also an `ORDERS_*` variable.
//! - [`telemetry`]: the tracing subscriber (text or JSON).
//! - [`metrics`]: Prometheus counters and gauges, the layer that counts
//!   every RPC, and `GET /metrics`.
//! - [`startup`]: [`startup::Application`]: connect, migrate, bind; then run
//!   until a shutdown signal and drain.
//! - [`net`]: what every listener admits: a slot under `--max-connections`,
//!   a deadline for each request's headers, and backoff when accepting fails.
//! - [`tls`]: TLS terminated here: handshakes bounded, refusals logged,
//!   certificates reloaded when their files change.
//! - [`proto`]: generated protobuf and gRPC code, and the descriptor set.
//! - [`api`]: the gRPC layer: callers authenticated from their headers, then
//!   request to domain to store to response.
//! - [`domain`]: validated types (keys, symbols, decimals, orders); no I/O.
//! - [`store`]: the [`store::Store`] over SQLite or Postgres; all SQL lives there.
//! - [`error`]: the one [`error::Error`] and its mapping to `tonic::Status`.
//! - [`bench`]: `order-service bench-store`, the store driven without gRPC.
//! - [`purge`]: the background purge of expired idempotency keys.
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
pub mod metrics;
pub mod net;
pub mod proto;
pub mod purge;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
