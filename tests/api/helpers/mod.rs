//! Test harness, by concern: which engine a test runs on ([`engines`]), its
//! database ([`database`]), the in-process server ([`app`]), the server
//! binary as an operator runs it ([`process`]), a TCP proxy to repoint
//! and hold back ([`proxy`]), what tests send
//! ([`requests`]), a Postgres cluster of a test's own ([`cluster`]), an
//! OTLP trace receiver ([`collector`]), and
//! raw-wire tools ([`wire`]). Everything is re-exported here, so a test
//! imports from `crate::helpers`.

pub mod app;
pub mod cluster;
pub mod collector;
pub mod database;
pub mod engines;
pub mod process;
pub mod proxy;
pub mod requests;
pub mod wire;

pub use app::*;
pub use cluster::*;
pub use collector::*;
pub use database::*;
pub(crate) use engines::{Engine, engine_tests, postgres_tests};
pub use process::*;
pub use proxy::*;
pub use requests::*;
pub use wire::*;
