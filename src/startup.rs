//! Building and running the server: [`Application::build`] connects to the
//! database, migrates it and binds the listener (so a bad config fails before
//! anything serves); [`Application::run`] serves until the shutdown future
//! resolves, then drains.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::ServingStatus;

use crate::{
    api::OrderApi,
    clock::{Clock, SystemClock},
    config::Config,
    proto::{self, order_service_server::OrderServiceServer},
    purge,
    store::{Store, StoreOptions},
};

/// The health service name of the order API.
pub const SERVICE_NAME: &str = "orders.v1.OrderService";

/// A connected, migrated, bound server, ready to [`run`](Self::run).
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    store: Store,
    clock: Arc<dyn Clock>,
    config: Config,
}

impl Application {
    /// Connects, migrates and binds, reading time from the system clock.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`build`](Self::build), reading time from `clock` (tests move it).
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let options = StoreOptions {
            max_connections: config.db_max_connections,
            lock_timeout: config.lock_timeout,
            acquire_timeout: config.db_acquire_timeout,
        };
        let store =
            tokio::time::timeout(config.db_connect_timeout, Store::connect(&config.database_url, &options))
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "cannot open database {}: no answer within {}",
                        crate::store::redact(&config.database_url),
                        humantime::format_duration(config.db_connect_timeout)
                    )
                })??;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        Ok(Self { listener, store, clock, config })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TcpListener always has a local address; fall back to the
        // configured one rather than panic.
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// The store the server uses.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `shutdown` resolves, then reports `NOT_SERVING`, stops
    /// accepting, lets in-flight calls finish within the shutdown grace, and
    /// closes the database.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self { listener, store, clock, config } = self;
        let addr = listener.local_addr().context("reading the bound address")?;

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_service_status(SERVICE_NAME, ServingStatus::Serving).await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // So grpcurl can decode ErrorInfo, BadRequest and RetryInfo details.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
        let reflection_v1alpha = reflection().build_v1alpha().context("building reflection v1alpha")?;
        let api = OrderApi::new(store.clone(), clock.clone(), config.idempotency_ttl, config.lock_timeout);

        let (stop_tx, stop_rx) = watch::channel(false);
        let purge_task = tokio::spawn(purge::run(
            store.clone(),
            clock,
            config.purge_interval,
            config.purge_batch_size,
            stop_rx.clone(),
        ));

        let mut server_stop = stop_rx;
        let server = Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(OrderServiceServer::new(api))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
                let _ = server_stop.changed().await;
            });
        let mut server = tokio::spawn(server);
        tracing::info!(%addr, "listening");

        tokio::select! {
            result = &mut server => {
                let _ = stop_tx.send(true);
                store.close().await;
                return match result {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the server stopped unexpectedly")),
                    Ok(Err(e)) => Err(e).context("serving gRPC"),
                    Err(e) => Err(e).context("the server task failed"),
                };
            }
            () = shutdown => {}
        }

        let grace = config.shutdown_grace;
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down: refusing new calls, finishing in-flight ones");
        for service in ["", SERVICE_NAME] {
            health.set_service_status(service, ServingStatus::NotServing).await;
        }
        let _ = stop_tx.send(true);
        match tokio::time::timeout(grace, &mut server).await {
            Ok(Ok(result)) => result.context("serving gRPC")?,
            Ok(Err(e)) => return Err(e).context("the server task failed"),
            Err(_) => {
                tracing::warn!("shutdown grace elapsed; abandoning the calls still in flight");
                server.abort();
            }
        }
        let _ = purge_task.await;
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received SIGINT"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}
