//! Configuration: one clap struct; every flag `--some-flag` is also the
//! environment variable `ORDERS_SOME_FLAG` (except `DATABASE_URL`).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

/// The largest file a flag may name (tokens, certificates, keys): a path
/// pointing somewhere endless (`/dev/zero`) is refused, not read.
pub const MAX_FLAG_FILE: u64 = 1024 * 1024;

/// Reads a file a flag names, refusing one over [`MAX_FLAG_FILE`].
pub fn read_flag_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(MAX_FLAG_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FLAG_FILE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "larger than 1 MiB"));
    }
    Ok(bytes)
}

/// Whether a failure to read a file says nothing about the file itself
/// (out of descriptors or memory, interrupted): reading again later may
/// succeed, and what the file says has not changed.
pub fn is_transient(error: &std::io::Error) -> bool {
    // ENFILE, EMFILE, ENOMEM, EINTR.
    matches!(error.raw_os_error(), Some(23 | 24 | 12 | 4))
        || matches!(error.kind(), std::io::ErrorKind::Interrupted | std::io::ErrorKind::OutOfMemory)
}

/// The largest `--sqlite-max-batch`: a batch's order insert binds 12 values
/// per order, and SQLite refuses a statement binding more than 32,766.
pub const SQLITE_MAX_BATCH_LIMIT: u32 = 2048;
/// The largest `--pg-max-batch`.
pub const PG_MAX_BATCH_LIMIT: u32 = 2048;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Commands besides serving.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Prints a fresh random bearer token for ACCOUNT and the line to add to
    /// the --auth-tokens-file (which holds only the token's SHA-256).
    HashToken {
        /// The account the token acts for.
        account: String,
    },
    /// Checks an --auth-tokens-file before it is deployed: prints how many
    /// tokens it grants, or every bad line (exit 1).
    CheckTokens {
        /// The file to check.
        file: std::path::PathBuf,
    },
    /// Drives the service's own PlaceOrder transaction against a database,
    /// without gRPC: the database's own limit, to set beside `orderctl bench`.
    BenchStore(BenchStore),
}

/// `order-service bench-store`: closed-loop PlaceOrders straight into the store.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchStore {
    /// The database (`sqlite://PATH` or `postgres://…`), written to.
    pub database_url: String,
    /// Workers, each with one call in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    pub duration: Duration,
    /// Repeat orders placed before the clock starts (the replay path).
    #[arg(long, conflicts_with = "duplicate_ratio")]
    pub replay: bool,
    /// Share (0 to 1) of PlaceOrders that reuse one of the worker's recent keys.
    #[arg(long, default_value_t = 0.0)]
    pub duplicate_ratio: f64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// order-service: a gRPC order service that places every order exactly once,
/// however often a caller retries.
#[derive(Debug, Clone, Parser)]
#[command(name = "order-service", version, about)]
pub struct Config {
    /// Serve (the default), or another command.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to serve gRPC on. Port 0 picks a free port.
    #[arg(long, env = "ORDERS_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Database URL: sqlite://PATH (the file is created if missing) or
    /// postgres://USER:PASSWORD@HOST:PORT/DB (TLS per the URL's sslmode).
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://orders.db", hide_env_values = true)]
    pub database_url: String,

    /// How long an idempotency key is remembered (e.g. 90s, 2h, 24h).
    #[arg(long, env = "ORDERS_IDEMPOTENCY_TTL", default_value = "24h", value_parser = positive_duration)]
    pub idempotency_ttl: Duration,

    /// How often expired idempotency keys are purged.
    #[arg(long, env = "ORDERS_PURGE_INTERVAL", default_value = "1m", value_parser = positive_duration)]
    pub purge_interval: Duration,

    /// Most expired keys deleted by one purge statement.
    #[arg(long, env = "ORDERS_PURGE_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub purge_batch_size: u32,

    /// How long a write waits for a lock: on Postgres, for a call in flight
    /// with the same key (then ABORTED, IDEMPOTENCY_KEY_IN_USE); on SQLite, for
    /// the database lock (then UNAVAILABLE). Shortened to the caller's deadline.
    #[arg(long, env = "ORDERS_LOCK_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub lock_timeout: Duration,

    /// How long a call waits for a pooled database connection (including
    /// opening one) before answering UNAVAILABLE.
    #[arg(long, env = "ORDERS_DB_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = positive_duration)]
    pub db_acquire_timeout: Duration,

    /// How long start-up waits to connect to and migrate the database.
    #[arg(long, env = "ORDERS_DB_CONNECT_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub db_connect_timeout: Duration,

    /// Most pooled database connections (for SQLite: readers; writes use one).
    #[arg(long, env = "ORDERS_DB_MAX_CONNECTIONS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: u32,

    /// After the shutdown delay, how long in-flight calls may finish before
    /// they are abandoned.
    #[arg(long, env = "ORDERS_SHUTDOWN_GRACE", default_value = "20s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// File of accepted bearer tokens: one `ACCOUNT SHA256-HEX-OF-TOKEN` per
    /// line, `#` comments. Read again within 2 s of a change and on SIGHUP;
    /// a file with bad lines grants only its good ones. Calls must then carry
    /// `authorization: Bearer TOKEN` (or a client certificate).
    #[arg(long, env = "ORDERS_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,

    /// PEM certificate chain to serve TLS with (needs --tls-key).
    #[arg(long, env = "ORDERS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "ORDERS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle for mutual TLS: client certificates must be signed by it,
    /// and a caller without a bearer token is identified by its certificate.
    /// Order calls need one or the other; health and reflection need neither.
    #[arg(long, env = "ORDERS_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Which one field of a client certificate names its account, with no
    /// fallback to another: `uri` (its URI SAN, e.g. a SPIFFE ID, whole),
    /// `uri-prefix:PREFIX` (the rest of the URI SAN that starts with PREFIX,
    /// e.g. `uri-prefix:spiffe://example.org/account/`), `dns` (its DNS
    /// SAN) or `cn` (its subject CN). A certificate with none, or with more
    /// than one, is refused.
    #[arg(long, env = "ORDERS_TLS_CLIENT_IDENTITY", default_value = "uri", value_parser = cert_identity)]
    pub tls_client_identity: CertIdentity,

    /// Serve a non-loopback address without authentication (when a service
    /// mesh authenticates callers); every caller is then `anonymous`.
    #[arg(long, env = "ORDERS_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Largest request message accepted, in bytes; larger is refused
    /// (OUT_OF_RANGE) from its length prefix, without being buffered.
    #[arg(long, env = "ORDERS_MAX_REQUEST_SIZE", default_value_t = 64 * 1024,
          value_parser = clap::value_parser!(u32).range(1024..=4 * 1024 * 1024))]
    pub max_request_size: u32,

    /// Most order calls served at once across all connections; more are
    /// refused with RESOURCE_EXHAUSTED and RetryInfo.
    #[arg(long, env = "ORDERS_MAX_CONCURRENT_REQUESTS", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_concurrent_requests: u32,

    /// Most concurrent calls (HTTP/2 streams) on one connection.
    #[arg(long, env = "ORDERS_MAX_CONCURRENT_STREAMS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_streams: u32,

    /// Connections older than this are asked to reconnect (GOAWAY), which
    /// also bounds how long an idle connection is kept.
    #[arg(long, env = "ORDERS_MAX_CONNECTION_AGE", default_value = "30m", value_parser = positive_duration)]
    pub max_connection_age: Duration,

    /// On every listener, a connection that has not completed its TLS
    /// handshake and first request's headers this long after it is accepted
    /// is closed (told GOAWAY first if it is idle), as is one that takes
    /// longer than this over a later request's headers.
    #[arg(long, env = "ORDERS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub handshake_timeout: Duration,

    /// Most connections the gRPC listener holds at once. When all are
    /// taken, an idle one (no call open) gives way, of the address holding
    /// the most connections the oldest, else
    /// the one busy longest with health or reflection calls only (counted in
    /// orders_connections_evicted_total); when every one has an order call
    /// open, the newcomer is closed as soon as it is accepted (counted in
    /// orders_connections_refused_total). 0 sizes it from the process's
    /// open-file limit, keeping 64 descriptors plus the database pool free,
    /// and at most 4096.
    #[arg(long, env = "ORDERS_MAX_CONNECTIONS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub max_connections: u32,

    /// A connection with no call open this long is told GOAWAY and closed
    /// (gRPC's `max_connection_idle`), on the gRPC and health listeners.
    #[arg(long, env = "ORDERS_MAX_CONNECTION_IDLE", default_value = "5m", value_parser = positive_duration)]
    pub max_connection_idle: Duration,

    /// Most connections the `--health-listen` listener holds at once, its
    /// own budget: nothing on the gRPC port can take them. When all are
    /// taken, the connection idle the longest gives way.
    #[arg(long, env = "ORDERS_HEALTH_MAX_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub health_max_connections: u32,

    /// Most health Watch streams open at once on one listener; one more is
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "ORDERS_MAX_WATCHES", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_watches: u32,

    /// Most health Watch streams open at once on one connection.
    #[arg(long, env = "ORDERS_MAX_WATCHES_PER_CONNECTION", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_watches_per_connection: u32,

    /// The longest any call may take on the server, whatever deadline its
    /// caller sent (a shorter `grpc-timeout` wins).
    #[arg(long, env = "ORDERS_REQUEST_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub request_timeout: Duration,

    /// SQLite: most PlaceOrders committed together by the group-commit writer
    /// (one disk flush per batch), and most keys looked up in one query;
    /// 1 turns batching off. At most 2048 (what one statement can bind).
    #[arg(long, env = "ORDERS_SQLITE_MAX_BATCH", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SQLITE_MAX_BATCH_LIMIT)))]
    pub sqlite_max_batch: u32,

    /// Postgres: most PlaceOrders committed together by one group-commit
    /// statement (one commit per batch), and most keys looked up in one
    /// query; 1 turns batching off (every PlaceOrder on its own, as before
    /// group commit). At most 2048. Each order of a batch holds an advisory
    /// lock until its statement ends: keep it under Postgres's lock table
    /// (`max_locks_per_transaction` × `max_connections`, 6,400 by default)
    /// divided by the replicas.
    #[arg(long, env = "ORDERS_PG_MAX_BATCH", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(PG_MAX_BATCH_LIMIT)))]
    pub pg_max_batch: u32,

    /// How often the database is probed (it must answer and take writes:
    /// SQLite rewrites one row, Postgres must not be read-only); health turns
    /// NOT_SERVING while the probe fails and SERVING again when it passes.
    #[arg(long, env = "ORDERS_HEALTH_INTERVAL", default_value = "5s", value_parser = positive_duration)]
    pub health_interval: Duration,

    /// After SIGTERM, how long to keep serving (health already NOT_SERVING)
    /// so load balancers stop sending calls before the server stops accepting.
    #[arg(long, env = "ORDERS_SHUTDOWN_DELAY", default_value = "5s", value_parser = duration)]
    pub shutdown_delay: Duration,

    /// Address of the Prometheus endpoint (GET /metrics); empty disables it.
    #[arg(long, env = "ORDERS_METRICS_LISTEN", default_value = "127.0.0.1:9464", value_parser = optional_addr)]
    pub metrics_listen: ::std::option::Option<SocketAddr>,

    /// Also serve the health service alone, in plain text, on this address
    /// (for Kubernetes' gRPC probes, which cannot speak TLS); empty: off.
    #[arg(long, env = "ORDERS_HEALTH_LISTEN", default_value = "", value_parser = optional_addr)]
    pub health_listen: ::std::option::Option<SocketAddr>,

    /// Log format.
    #[arg(long, env = "ORDERS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// The defaults, as if no flag or variable were given.
    pub fn defaults() -> Self {
        Self::parse_from(["order-service"])
    }

    /// Whether callers must prove who they are (tokens or client certificates).
    pub fn authenticates(&self) -> bool {
        self.auth_tokens_file.is_some() || self.tls_client_ca.is_some()
    }

    /// Refuses what parses but must not run: serving a non-loopback address
    /// to unauthenticated callers, unless explicitly allowed.
    pub fn validate(&self) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && !self.authenticates() && !self.allow_unauthenticated {
            return Err(format!(
                "refusing to serve {} without authentication: set --auth-tokens-file or --tls-client-ca, \
                 or pass --allow-unauthenticated if a service mesh authenticates callers",
                self.listen
            ));
        }
        Ok(())
    }
}

/// Which field of a client certificate names its account (see
/// `--tls-client-identity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertIdentity {
    /// The URI SAN, whole.
    Uri,
    /// The rest of the URI SAN under this prefix.
    UriPrefix(String),
    /// The DNS SAN.
    Dns,
    /// The subject common name.
    Cn,
}

fn cert_identity(s: &str) -> Result<CertIdentity, String> {
    match s {
        "uri" => Ok(CertIdentity::Uri),
        "dns" => Ok(CertIdentity::Dns),
        "cn" => Ok(CertIdentity::Cn),
        _ => match s.strip_prefix("uri-prefix:") {
            Some(prefix) if !prefix.is_empty() => Ok(CertIdentity::UriPrefix(prefix.to_owned())),
            _ => Err("expected uri, uri-prefix:PREFIX, dns or cn".to_owned()),
        },
    }
}

/// A humane duration: `90s`, `2h`, `1h 30m`, `500ms`.
fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 90s, 15m, 2h)"))
}

/// A socket address, or nothing for an empty string.
fn optional_addr(s: &str) -> Result<Option<SocketAddr>, String> {
    if s.is_empty() { Ok(None) } else { s.parse().map(Some).map_err(|e| format!("{e}")) }
}

/// A humane duration that is not zero.
fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be greater than zero".to_owned()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_flag_reference() {
        let c = Config::defaults();
        assert_eq!(c.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(c.database_url, "sqlite://orders.db");
        assert_eq!(c.idempotency_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(c.purge_interval, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(20));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.health_listen, None);
        assert_eq!(c.shutdown_delay, Duration::from_secs(5));
        let off = Config::try_parse_from(["x", "--metrics-listen", ""]).unwrap();
        assert_eq!(off.metrics_listen, None);
    }

    #[test]
    fn durations_are_humane_and_checked() {
        let c = Config::try_parse_from(["x", "--idempotency-ttl", "90s", "--purge-interval", "2h"]).unwrap();
        assert_eq!(c.idempotency_ttl, Duration::from_secs(90));
        assert_eq!(c.purge_interval, Duration::from_secs(7200));
        assert!(Config::try_parse_from(["x", "--idempotency-ttl", "0s"]).is_err());
        assert!(Config::try_parse_from(["x", "--idempotency-ttl", "soon"]).is_err());
        assert!(Config::try_parse_from(["x", "--listen", "localhost"]).is_err());
    }

    #[test]
    fn the_sqlite_batch_is_bounded_by_what_one_statement_can_bind() {
        let batch = |n: u32| Config::try_parse_from(["x", "--sqlite-max-batch", &n.to_string()]);
        assert_eq!(batch(SQLITE_MAX_BATCH_LIMIT).unwrap().sqlite_max_batch, SQLITE_MAX_BATCH_LIMIT);
        assert!(batch(SQLITE_MAX_BATCH_LIMIT + 1).is_err());
        assert!(batch(0).is_err());
    }

    #[test]
    fn a_public_address_needs_authentication_or_an_explicit_opt_out() {
        let parse = |args: &[&str]| Config::try_parse_from([&["x"], args].concat()).unwrap();
        assert!(parse(&["--listen", "0.0.0.0:50051"]).validate().is_err());
        assert!(parse(&["--listen", "[::]:50051"]).validate().is_err());
        assert!(parse(&["--listen", "0.0.0.0:50051", "--allow-unauthenticated"]).validate().is_ok());
        assert!(parse(&["--listen", "0.0.0.0:50051", "--auth-tokens-file", "t"]).validate().is_ok());
        assert!(parse(&["--listen", "127.0.0.1:50051"]).validate().is_ok());
        assert!(parse(&["--listen", "[::1]:50051"]).validate().is_ok());
    }
}
