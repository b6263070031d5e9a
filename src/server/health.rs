//! Health as callers see it: the names a probe asks for, and the task that
//! follows the database (SERVING while it answers and takes writes).

use std::time::Duration;

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{store::Store, telemetry::metrics};

/// The health service name of the order API.
pub const SERVICE_NAME: &str = "orders.v1.OrderService";
/// A health service name that is SERVING for as long as the process serves,
/// whatever the database does: for liveness probes, which must not restart
/// every replica during a database outage.
pub const LIVENESS_NAME: &str = "liveness";

/// Sets the overall and the order service's health, and the health gauge.
pub(super) async fn set_health(health: &HealthReporter, serving: bool) {
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    for service in ["", SERVICE_NAME] {
        health.set_service_status(service, status).await;
    }
    metrics::set_serving(serving);
}

/// Probes the database every `interval` until `stop` changes (does it
/// answer, and take writes): health turns NOT_SERVING while the probe fails
/// and SERVING when it passes again. Also samples the pool gauges.
pub(super) async fn follow_database(
    store: Store,
    health: HealthReporter,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = true;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let answer = tokio::time::timeout(interval.max(Duration::from_secs(1)), store.ping()).await;
        let ok = matches!(answer, Ok(Ok(())));
        for (pool, size, idle) in store.pool_stats() {
            metrics::set_pool(pool, size, idle);
        }
        if ok != serving {
            // Draining may have begun while the ping ran: never undo it.
            if *stop.borrow() {
                return;
            }
            serving = ok;
            if ok {
                tracing::info!("the database passes its health probe again: SERVING");
            } else {
                let error = match answer {
                    Ok(Err(e)) => format!("{e:?}"),
                    _ => "no answer in time".to_owned(),
                };
                tracing::warn!(%error, "the database fails its health probe: NOT_SERVING");
            }
            set_health(&health, ok).await;
        }
    }
}
