//! Running the process: [`Application::build`] connects to the database,
//! migrates it and binds the listeners (so a bad config fails before anything
//! serves); [`Application::run`] serves until the shutdown future resolves,
//! then drains. Around the API it owns:
//!
//! - `net`: what every listener admits (a slot under `--max-connections`, a
//!   deadline for each request's headers, backoff when accepting fails), and
//!   TLS terminated there (handshakes bounded, certificates reloaded);
//! - `malformed`: the middleware that answers what tonic cannot decode;
//! - the background tasks: `health` (following the database), `purge`
//!   (expired keys), `tokens` (reloading the auth tokens file);
//! - `signals`: SIGINT and SIGTERM to drain, SIGHUP to reload.

mod health;
mod malformed;
mod net;
mod open_calls;
mod purge;
mod signals;
mod tokens;

pub use health::{LIVENESS_NAME, SERVICE_NAME};
pub use purge::purge_expired;
pub use signals::ShutdownSignals;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{Server, server::TcpIncoming};

use self::{
    health::{Health, follow_database, set_health},
    signals::Hangups,
    tokens::reload_on_sighup,
};
use crate::{
    api::{ApiSettings, Authenticator, OrderApi},
    clock::{Clock, SystemClock},
    config::Config,
    proto::{self, order_service_server::OrderServiceServer},
    store::{Store, StoreOptions},
    telemetry::metrics,
};

/// Most bytes of request headers (metadata) a call may send.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// How often an HTTP/2 ping checks that a quiet peer is still there.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest message health and reflection read (they need no
/// credentials; their requests are a few dozen bytes).
const OPEN_SERVICE_MAX_MESSAGE: usize = 1024;
/// Most calls to the services that need no credentials (health,
/// reflection) whose request has not been read yet, on one listener: the
/// bound on what callers nobody knows can make the server hold.
const OPEN_CALLS_UNREAD: usize = 256;
/// Most connections the metrics endpoint holds at once: its own cap, so
/// idle scrapers (HTTP keep-alive) cannot take the gRPC listeners' slots.
const METRICS_MAX_CONNECTIONS: usize = 16;
/// HTTP/2 flow control: most message bytes a caller may send on one stream,
/// and on one connection, before the server has read them.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Most streams a caller may reset before the server accepted them, on one
/// connection, before the server closes it (h2's "rapid reset" defence,
/// 20 by default). Callers sharing one connection reset a stream whenever a
/// deadline passes or a call is cancelled, so a few impatient callers on a
/// busy server reached 20 and the GOAWAY killed their patient neighbours'
/// calls. Still a bound, so a flood of resets cannot queue without end;
/// the rate of resets a connection may send is bounded by its listener's
/// budget (see `net::budget`).
const MAX_PENDING_ACCEPT_RESETS: usize = 1024;
/// Most streams the server may reset itself, on one connection, because
/// the client broke the protocol on them (a DATA frame longer than its
/// `content-length`, a frame on a closed stream): h2 then closes the
/// connection (GOAWAY, ENHANCE_YOUR_CALM). A correct client never causes
/// one. tonic passes no value unless given one, which turns h2's bound
/// (1,024) off: one connection sending HEADERS with `content-length: 0`
/// and a 5-byte DATA frame, again and again, made the server spawn and
/// reset 2.9 million calls in 12 s and grew its memory to 2 GB.
const MAX_LOCAL_ERROR_RESETS: usize = 32;
/// TCP keepalive on accepted connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A connected, migrated, bound server, ready to [`run`](Self::run).
#[derive(Debug)]
pub struct Application {
    faults: Arc<crate::api::FaultInjector>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    health_listener: Option<TcpListener>,
    store: Store,
    auth: Arc<Authenticator>,
    tls: Option<Arc<net::tls::Tls>>,
    /// SIGHUP, caught from `build` on.
    hangups: Hangups,
    config: Config,
}

/// Whether the embedded SQLite database is served on an address other hosts
/// can reach: the set-up in which someone may run several replicas, each
/// with its own file, and lose exactly-once across them.
fn serves_sqlite_to_the_network(config: &Config) -> bool {
    config.database_url.starts_with("sqlite:") && !config.listen.ip().is_loopback()
}

/// The TLS settings the flags ask for, if any.
fn tls_config(config: &Config) -> anyhow::Result<Option<Arc<net::tls::Tls>>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let files =
        net::tls::TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: config.tls_client_ca.clone() };
    Ok(Some(Arc::new(net::tls::Tls::load(files)?)))
}

/// A gRPC server with the bounds every listener shares: streams per
/// connection, HTTP/2 windows and header size, resets, keepalive, the
/// longest call and the oldest connection.
fn http2_server(config: &Config) -> Server {
    Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .timeout(config.request_timeout)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // No max_connection_age_grace: with one, tonic 0.14 sends no
        // GOAWAY at the age but closes the connection, calls and all, at
        // age + grace. Without it, the GOAWAY goes out at the age and the
        // calls in flight finish, each within --request-timeout.
        .max_connection_age(config.max_connection_age)
}

/// Serves the metrics endpoint on `listener` until `stop` resolves. Each
/// scrape counts as a call open on its connection until its answer is
/// written, so the listener's budget evicts idle and half-sent connections
/// before a scrape under way.
fn serve_metrics(
    listener: net::GuardedListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let app =
        metrics::router()?.layer(net::CallsLayer).into_make_service_with_connect_info::<net::ConnInfo>();
    Ok(tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(%error, "the metrics endpoint failed");
        }
    }))
}

impl Application {
    /// Connects, migrates and binds, reading time from the system clock.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`build`](Self::build), reading time from `clock` (tests move it).
    /// Only SQLite reads it: on Postgres every time is the database server's.
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let hangups = Hangups::install();
        let auth = Arc::new(Authenticator::new(
            config.auth_tokens_file.as_deref(),
            config.tls_client_ca.is_some().then(|| config.tls_client_identity.clone()),
        )?);
        let tls = tls_config(&config)?;
        let options = StoreOptions {
            max_connections: config.db_max_connections,
            lock_timeout: config.lock_timeout,
            acquire_timeout: config.db_acquire_timeout,
            sqlite_max_batch: config.sqlite_max_batch as usize,
            pg_max_batch: config.pg_max_batch as usize,
            clock: clock.clone(),
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
        if serves_sqlite_to_the_network(&config) {
            tracing::warn!(
                listen = %config.listen,
                "SQLITE SERVED BEYOND THIS HOST: run exactly one replica on this file. Each replica with a \
                 SQLite file of its own is a separate database, so a retry that reaches another replica \
                 places a second order; serve several replicas on Postgres (docs/scaling.md)"
            );
        }
        if config.allow_unauthenticated && !config.authenticates() {
            tracing::warn!(
                listen = %config.listen,
                "serving without authentication (--allow-unauthenticated): every caller is `anonymous`"
            );
        }
        if config.auth_tokens_file.is_some() && tls.is_none() && !config.listen.ip().is_loopback() {
            tracing::warn!(
                "bearer tokens will cross the network in clear text: serve TLS (--tls-cert, --tls-key)"
            );
        }
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(metrics::bind(addr).await?),
            None => None,
        };
        let health_listener = match config.health_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} for health"))?,
            ),
            None => None,
        };
        Ok(Self {
            faults: Arc::default(),
            listener,
            metrics_listener,
            health_listener,
            store,
            auth,
            tls,
            hangups,
            config,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TcpListener always has a local address; fall back to the
        // configured one rather than panic.
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Faults tests can inject (nothing else reaches them).
    pub fn faults(&self) -> Arc<crate::api::FaultInjector> {
        self.faults.clone()
    }

    /// The store the server uses.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `shutdown` resolves, then reports `NOT_SERVING`, stops
    /// accepting, lets in-flight calls finish within the shutdown grace, and
    /// closes the database.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self { faults, listener, metrics_listener, health_listener, store, auth, tls, hangups, config } =
            self;
        let addr = listener.local_addr().context("reading the bound address")?;

        let health = Health::new();
        // A listener's Watches never take more than half its connections:
        // Watches alone can never leave a newcomer no place.
        let watches = |connections: usize| health::WatchBudget {
            total: Arc::new(tokio::sync::Semaphore::new(
                (config.max_watches as usize).min(connections / 2).max(1),
            )),
            per_connection: config.max_watches_per_connection as usize,
            lifetime: config.max_connection_age + health::WATCH_AGE_GRACE,
        };
        let max_connections = match config.max_connections {
            0 => net::default_max_connections(64 + u64::from(config.db_max_connections)),
            n => n as usize,
        };
        let health_service = health.service(watches(max_connections));
        // Health and reflection answer callers nobody has authenticated:
        // their requests are a service name or a symbol, so a message over
        // OPEN_SERVICE_MAX_MESSAGE is refused from its length prefix instead
        // of being buffered (tonic's default is 4 MiB a stream).
        let health_service = health_service.max_decoding_message_size(OPEN_SERVICE_MAX_MESSAGE);
        set_health(&health, true);
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // So grpcurl can decode ErrorInfo, BadRequest and RetryInfo details.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .context("building reflection v1")?
            .max_decoding_message_size(OPEN_SERVICE_MAX_MESSAGE);
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("building reflection v1alpha")?
            .max_decoding_message_size(OPEN_SERVICE_MAX_MESSAGE);
        let settings = ApiSettings {
            idempotency_ttl: config.idempotency_ttl,
            lock_timeout: config.lock_timeout,
            request_timeout: config.request_timeout,
            max_concurrent_requests: config.max_concurrent_requests,
            faults,
        };
        tracing::info!(max_connections, "connections are capped");
        // Each listener has a budget of its own (see net::budget): a flood
        // of one port takes nothing the others need.
        let grpc_budget = net::Budget::new(max_connections);
        let admission =
            net::Admission::new(config.handshake_timeout, net::Protocol::Http2, grpc_budget.clone());
        let api = OrderServiceServer::new(OrderApi::new(store.clone(), auth.clone(), settings))
            .max_decoding_message_size(config.max_request_size as usize);

        // Background work stops first, when draining begins; servers last.
        let (background_tx, background_rx) = watch::channel(false);
        let (servers_tx, servers_rx) = watch::channel(false);
        let stopped = |rx: &watch::Receiver<bool>| {
            let mut rx = rx.clone();
            async move {
                let _ = rx.changed().await;
            }
        };
        if let Some(tls) = &tls {
            tokio::spawn(net::tls::follow_files(tls.clone(), grpc_budget.clone(), background_rx.clone()));
        }
        tokio::spawn(net::budget::close_idle(
            grpc_budget.clone(),
            config.max_connection_idle,
            background_rx.clone(),
        ));
        let background = [
            tokio::spawn(purge::run(
                store.clone(),
                config.purge_interval,
                config.purge_batch_size,
                background_rx.clone(),
            )),
            tokio::spawn(reload_on_sighup(hangups, auth.clone(), background_rx.clone())),
            tokio::spawn(follow_database(
                store.clone(),
                health.clone(),
                config.health_interval,
                background_rx.clone(),
            )),
        ];
        let mut side_servers = Vec::new();
        if let Some(listener) = metrics_listener {
            let metrics_addr = listener.local_addr()?;
            let own = net::Admission::new(
                config.handshake_timeout,
                net::Protocol::Http1,
                net::Budget::new(METRICS_MAX_CONNECTIONS),
            );
            let listener = net::GuardedListener::new(listener, own);
            side_servers.push(serve_metrics(listener, stopped(&servers_rx))?);
            tracing::info!(addr = %metrics_addr, "metrics listening");
        }
        if let Some(listener) = health_listener {
            let health_addr = listener.local_addr()?;
            let budget = net::Budget::new(config.health_max_connections as usize);
            tokio::spawn(net::budget::close_idle(
                budget.clone(),
                config.max_connection_idle,
                background_rx.clone(),
            ));
            let own = net::Admission::new(config.handshake_timeout, net::Protocol::Http2, budget);
            // No Nagle: a probe's answer goes out at once (with it, a
            // delayed ACK held each answer about 40 ms).
            let incoming = net::connections(TcpIncoming::from(listener).with_nodelay(Some(true)), own, None);
            let health_only = http2_server(&config)
                .layer(net::CallsLayer)
                .layer(metrics::RpcMetricsLayer::default())
                .layer(open_calls::OpenCallsLayer::new(OPEN_CALLS_UNREAD))
                .add_service(
                    health
                        .service(watches(config.health_max_connections as usize))
                        .max_decoding_message_size(OPEN_SERVICE_MAX_MESSAGE),
                )
                .serve_with_incoming_shutdown(incoming, stopped(&servers_rx));
            side_servers.push(tokio::spawn(async move {
                if let Err(error) = health_only.await {
                    tracing::error!(%error, "the plain-text health endpoint failed");
                }
            }));
            tracing::info!(addr = %health_addr, "health listening");
        }

        let mut builder = http2_server(&config)
            // Outermost first: every call counted open on its connection;
            // the metrics see the code the caller gets.
            .layer(net::CallsLayer)
            .layer(metrics::RpcMetricsLayer::trusting(metrics::TrustParent({
                let auth = auth.clone();
                Arc::new(move |request| crate::api::preauthenticate(&auth, request))
            })))
            .layer(malformed::MalformedRequestsLayer)
            .layer(crate::api::AuthLayer(auth.clone()))
            .layer(open_calls::OpenCallsLayer::new(OPEN_CALLS_UNREAD));
        let incoming = net::connections(
            TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(TCP_KEEPALIVE)),
            admission.clone(),
            tls.clone(),
        );
        let server = builder
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(api)
            .serve_with_incoming_shutdown(incoming, stopped(&servers_rx));
        let mut server = tokio::spawn(server);
        tracing::info!(%addr, "listening");

        let outcome = tokio::select! {
            result = &mut server => Some(match result {
                Ok(Ok(())) => Err(anyhow::anyhow!("the server stopped unexpectedly")),
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("serving gRPC")),
                Err(e) => Err(anyhow::Error::from(e).context("the server task failed")),
            }),
            () = shutdown => None,
        };
        let _ = background_tx.send(true);
        set_health(&health, false);
        if outcome.is_none() {
            // Drain the Kubernetes way: report NOT_SERVING at once, keep
            // serving while endpoints are removed, then stop accepting and let
            // in-flight calls finish within the grace period.
            let (delay, grace) = (config.shutdown_delay, config.shutdown_grace);
            tracing::info!(
                delay = %humantime::format_duration(delay),
                grace = %humantime::format_duration(grace),
                "draining: health is NOT_SERVING; still serving for the shutdown delay"
            );
            tokio::time::sleep(delay).await;
            tracing::info!("shutting down: refusing new calls, finishing in-flight ones");
            // Ends every health Watch stream, which would otherwise hold the
            // drain open for the whole grace period.
            health.close();
        }
        let _ = servers_tx.send(true);
        let result = match outcome {
            Some(result) => result,
            None => match tokio::time::timeout(config.shutdown_grace, &mut server).await {
                Ok(Ok(result)) => result.context("serving gRPC"),
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("the server task failed")),
                Err(_) => {
                    tracing::warn!("shutdown grace elapsed; abandoning the calls still in flight");
                    server.abort();
                    Ok(())
                }
            },
        };
        for task in background.into_iter().chain(side_servers) {
            let _ = task.await;
        }
        store.close().await;
        tracing::info!("stopped");
        result
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn sqlite_beyond_loopback_is_warned_of() {
        let config = |args: &[&str]| Config::try_parse_from([&["order-service"][..], args].concat()).unwrap();
        assert!(!serves_sqlite_to_the_network(&config(&[])));
        assert!(serves_sqlite_to_the_network(&config(&["--listen", "0.0.0.0:50051"])));
        assert!(serves_sqlite_to_the_network(&config(&["--listen", "[::]:50051"])));
        assert!(!serves_sqlite_to_the_network(&config(&["--listen", "[::1]:50051"])));
        let postgres = ["--listen", "0.0.0.0:50051", "--database-url", "postgres://u@db/orders"];
        assert!(!serves_sqlite_to_the_network(&config(&postgres)));
    }
}
