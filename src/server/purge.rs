//! The background purge of expired idempotency keys: every interval, delete
//! expired keys in bounded batches (one short statement each) until none are
//! left, so PlaceOrder is never held up for long. Orders are never deleted.

use std::time::Duration;

use tokio::sync::watch;

use crate::{error::Error, store::Store};

/// Deletes every key expired by now (on the store's clock), `batch` at a
/// time; returns how many. A key purged early could not place a second
/// order anyway: its order holds the key's lifetime too (see `store`).
pub async fn purge_expired(store: &Store, batch: u32) -> Result<u64, Error> {
    let mut total = 0;
    loop {
        let deleted = store.purge_expired_keys(batch).await?;
        total += deleted;
        if deleted < u64::from(batch) {
            return Ok(total);
        }
        // Let PlaceOrder in between batches.
        tokio::task::yield_now().await;
    }
}

/// Runs [`purge_expired`] every `interval` until `stop` changes.
pub async fn run(store: Store, interval: Duration, batch: u32, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        match purge_expired(&store, batch).await {
            Ok(0) => {
                crate::telemetry::metrics::record_purge_success();
                tracing::debug!("no expired idempotency keys");
            }
            Ok(purged) => {
                crate::telemetry::metrics::record_purged(purged);
                crate::telemetry::metrics::record_purge_success();
                tracing::info!(purged, "purged expired idempotency keys");
            }
            Err(error) => {
                tracing::warn!(?error, "purging expired idempotency keys failed; retrying next interval")
            }
        }
    }
}
