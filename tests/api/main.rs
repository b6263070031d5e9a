//! Black-box tests over real gRPC against a real server and database.

mod cancel_order;
mod client;
mod crash;
mod discovery;
mod docs;
mod edges;
mod expiry;
mod failover;
mod failures;
mod floods;
mod get_order;
mod helpers;
mod hostile;
mod list_orders;
mod operations;
mod outages;
mod pg_server;
mod place_order;
mod properties;
mod races;
mod security;
mod service_config;
mod shutdown;
mod soak;
mod traces;
mod validation;
