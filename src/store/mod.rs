//! Persistence: the one place that speaks SQL.
//!
//! [`Store`] is chosen by the database URL and hides which engine is behind
//! it; the gRPC layer only sees domain types and [`Error`]. Each engine has its
//! own module and its own embedded migrations under `migrations/<engine>`.

mod sqlite;

use std::time::Duration;

use anyhow::Context as _;

use crate::{
    domain::{AccountId, ClientRequestId, NewOrder, Order, OrderId, Timestamp},
    error::Error,
};

pub use sqlite::SqliteStore;

/// How the store connects.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most pooled connections for reads (SQLite writes use one connection).
    pub max_connections: u32,
    /// How long a write waits for the database lock, and a call for a pooled
    /// connection, before answering `UNAVAILABLE`.
    pub lock_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// What `place_order` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// A new key: the order was created.
    Created,
    /// A live key with the same payload: the persisted order, nothing written.
    Replayed,
    /// An expired key: a new order was created and the key now points to it.
    ExpiredReuse,
}

impl Placement {
    /// The outcome name used in logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Replayed => "replayed",
            Self::ExpiredReuse => "expired_reuse",
        }
    }
}

/// The order database, whichever engine it is.
#[derive(Debug, Clone)]
pub enum Store {
    /// An embedded SQLite file.
    Sqlite(SqliteStore),
}

impl Store {
    /// Connects to `url` (`sqlite://path`), creating a SQLite file if it is
    /// missing, and applies the embedded migrations.
    pub async fn connect(url: &str, options: &StoreOptions) -> anyhow::Result<Self> {
        if url.starts_with("sqlite:") {
            let store = SqliteStore::connect(url, options)
                .await
                .with_context(|| format!("cannot open database {url}"))?;
            Ok(Self::Sqlite(store))
        } else {
            anyhow::bail!("unsupported database URL {url:?}: expected sqlite://PATH")
        }
    }

    /// Places `order` for `account` exactly once per key (DESIGN.md section 4):
    /// creates it, replays the order the key already placed, or refuses a key
    /// reused with other fields (`Error::KeyReused`, nothing written).
    pub async fn place_order(
        &self,
        account: &AccountId,
        order: NewOrder,
        now: Timestamp,
        ttl: Duration,
    ) -> Result<(Order, Placement), Error> {
        match self {
            Self::Sqlite(s) => s.place_order(account, order, now, ttl).await,
        }
    }

    /// The account's order with this id.
    pub async fn get_order(&self, account: &AccountId, id: OrderId) -> Result<Order, Error> {
        match self {
            Self::Sqlite(s) => s.get_order(account, id).await,
        }
    }

    /// The order the account's live key points to; once the key has expired
    /// or been purged, the newest of the account's orders placed with it.
    pub async fn get_order_by_key(
        &self,
        account: &AccountId,
        key: ClientRequestId,
        now: Timestamp,
    ) -> Result<Order, Error> {
        match self {
            Self::Sqlite(s) => s.get_order_by_key(account, key, now).await,
        }
    }

    /// Deletes at most `limit` keys that expired at or before `now`; returns
    /// how many it deleted. Orders are never deleted.
    pub async fn purge_expired_keys(&self, now: Timestamp, limit: u32) -> Result<u64, Error> {
        match self {
            Self::Sqlite(s) => s.purge_expired_keys(now, limit).await,
        }
    }

    /// Closes every pooled connection, waiting for those in use.
    pub async fn close(&self) {
        match self {
            Self::Sqlite(s) => s.close().await,
        }
    }
}
