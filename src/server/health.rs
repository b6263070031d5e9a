//! Health as callers see it: the `grpc.health.v1` service, the names a
//! probe asks for, and the task that follows the database (SERVING while it
//! answers and takes writes).
//!
//! The service is this module's own rather than tonic-health's, to follow
//! the health checking spec on a Watch of a service the server does not
//! know: it answers `SERVICE_UNKNOWN` and keeps the stream open (tonic-health
//! fails the call with `NOT_FOUND`, which a client-side health checker reads
//! as the server being unhealthy). A Check of an unknown service is
//! `NOT_FOUND`, as the spec says.

use std::{collections::HashMap, pin::Pin, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus, health_server,
};

use super::net::ConnInfo;
use crate::{store::Store, telemetry::metrics};

/// How long a Watch may outlive its connection's `--max-connection-age`
/// (gRPC's `max_connection_age_grace`): the GOAWAY went out at the age, so a
/// client has had this long to open a new connection before the stream is
/// ended with UNAVAILABLE, which tells it to watch again there.
pub(super) const WATCH_AGE_GRACE: Duration = Duration::from_secs(10);

/// One listener's budget of Watch streams: at most `total` open on the
/// listener and `per_connection` on one connection; each ends `lifetime`
/// after its connection was accepted.
#[derive(Debug, Clone)]
pub(super) struct WatchBudget {
    pub total: Arc<tokio::sync::Semaphore>,
    pub per_connection: usize,
    pub lifetime: Duration,
}

/// A Watch counted on its connection until dropped.
struct ConnectionWatch(Arc<super::net::budget::Activity>);

impl Drop for ConnectionWatch {
    fn drop(&mut self) {
        self.0.watches.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// RESOURCE_EXHAUSTED for a Watch over `what`'s budget, with RetryInfo.
fn too_many_watches(what: &str) -> Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    metrics::record_watch_refused();
    let details = ErrorDetails::with_retry_info(Some(Duration::from_secs(1)));
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!("too many health Watch streams open on {what}; close one or retry later"),
        details,
    )
}

/// The health service name of the order API.
pub const SERVICE_NAME: &str = "orders.v1.OrderService";
/// A health service name that is SERVING for as long as the process serves,
/// whatever the database does: for liveness probes, which must not restart
/// every replica during a database outage.
pub const LIVENESS_NAME: &str = "liveness";

/// The statuses of the services the server knows ("" is the server as a
/// whole), and whether the server has stopped answering Watches.
#[derive(Debug, Clone)]
pub(super) struct Health {
    statuses: Arc<HashMap<&'static str, watch::Sender<ServingStatus>>>,
    closed: watch::Sender<bool>,
    /// The Watch budget of the listener this copy serves.
    watches: Option<WatchBudget>,
}

impl Health {
    /// Every known service SERVING.
    pub(super) fn new() -> Self {
        let statuses = ["", SERVICE_NAME, LIVENESS_NAME]
            .into_iter()
            .map(|name| (name, watch::Sender::new(ServingStatus::Serving)))
            .collect();
        Self { statuses: Arc::new(statuses), closed: watch::Sender::new(false), watches: None }
    }

    fn set(&self, service: &str, status: ServingStatus) {
        if let Some(sender) = self.statuses.get(service) {
            sender.send_replace(status);
        }
    }

    /// Ends every Watch stream (when draining: they would hold it open).
    pub(super) fn close(&self) {
        self.closed.send_replace(true);
    }

    /// The gRPC service for one listener, with its Watch budget.
    pub(super) fn service(&self, watches: WatchBudget) -> health_server::HealthServer<Health> {
        health_server::HealthServer::new(Self { watches: Some(watches), ..self.clone() })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl health_server::Health for Health {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        match self.statuses.get(request.get_ref().service.as_str()) {
            Some(status) => Ok(Response::new(HealthCheckResponse { status: *status.borrow() as i32 })),
            None => Err(Status::not_found("unknown service")),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let activity = request.extensions().get::<ConnInfo>().map(|info| info.activity.clone());
        let mut held = None;
        let mut ends = None;
        if let Some(budget) = &self.watches {
            let total =
                budget.total.clone().try_acquire_owned().map_err(|_| too_many_watches("this listener"))?;
            let on_connection = match activity {
                Some(activity) => {
                    let open = activity.watches.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    let counted = ConnectionWatch(activity);
                    if open >= budget.per_connection {
                        return Err(too_many_watches("this connection"));
                    }
                    ends = Some(counted.0.accepted + budget.lifetime);
                    Some(counted)
                }
                None => None,
            };
            held = Some((total, on_connection));
        }
        let mut statuses =
            self.statuses.get(request.get_ref().service.as_str()).map(watch::Sender::subscribe);
        let mut closed = self.closed.subscribe();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            // Given back when the stream ends.
            let _held = held;
            let aged = async {
                match ends {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let mut aged = std::pin::pin!(aged);
            loop {
                let status = match &mut statuses {
                    Some(statuses) => *statuses.borrow_and_update(),
                    None => ServingStatus::ServiceUnknown,
                };
                if tx.send(Ok(HealthCheckResponse { status: status as i32 })).await.is_err() {
                    return; // the caller went away
                }
                let changed = async {
                    match &mut statuses {
                        Some(statuses) => statuses.changed().await.is_ok(),
                        // An unknown service stays unknown: the stream stays open.
                        None => std::future::pending().await,
                    }
                };
                let aged_out = tokio::select! {
                    changed = changed => if changed { continue } else { return },
                    _ = closed.wait_for(|closed| *closed) => return,
                    () = tx.closed() => return,
                    () = &mut aged => true,
                };
                if aged_out {
                    let status = Status::unavailable(
                        "this connection is past --max-connection-age: watch again on a new connection",
                    );
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Sets the overall and the order service's health, and the health gauge.
pub(super) fn set_health(health: &Health, serving: bool) {
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    for service in ["", SERVICE_NAME] {
        health.set(service, status);
    }
    metrics::set_serving(serving);
}

/// How long group commit's writers may try batches and write none before
/// readiness says so: no healthy batch takes this long (each gives up at
/// `--lock-timeout` + 1 s).
pub(super) const WRITERS_STUCK_AFTER: Duration = Duration::from_secs(2);

/// Probes the database every `interval` until `stop` changes (does it
/// answer, and take writes), and looks at the batch writers (are they
/// writing, when there are orders to write): health turns NOT_SERVING while
/// the probe fails or no batch gets written, and SERVING when both pass
/// again. Also samples the pool gauges.
pub(super) async fn follow_database(
    store: Store,
    health: Health,
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
        let stuck = store.writers_stuck(WRITERS_STUCK_AFTER);
        let ok = matches!(answer, Ok(Ok(()))) && !stuck;
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
                    Ok(Ok(())) if stuck => format!(
                        "the batch writers have written nothing for {}",
                        humantime::format_duration(WRITERS_STUCK_AFTER)
                    ),
                    _ => "no answer in time".to_owned(),
                };
                tracing::warn!(%error, "the database fails its health probe: NOT_SERVING");
            }
            set_health(&health, ok);
        }
    }
}
