//! TLS, terminated here rather than inside tonic, so that the service can
//! bound, log and renew it:
//!
//! - the handshake deadline covers the TLS handshake and the first
//!   request's headers after it ([`super`]);
//! - a refused handshake (an unknown CA, a certificate without
//!   `clientAuth`, a client speaking plain text to the TLS port) is logged
//!   with the peer and the reason, at most [`crate::telemetry::LOGGED_PER_SECOND`] a
//!   second (the rest are counted in the log line that follows), and always
//!   counted in `orders_tls_handshake_failures_total`;
//! - the certificate, key and client CA are read again when their files
//!   change (every [`FILES_POLL`]), so a renewed certificate (a Kubernetes
//!   Secret updated in place) is served without a restart. A reload that
//!   fails keeps the certificate in force, and is logged and counted
//!   (`orders_tls_reload_failures_total`).
//!
//! Client certificates are optional at the handshake (health and reflection
//! stay callable without one); the order RPCs require one, or a token.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::ring::default_provider,
        pki_types::UnixTime,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{WebPkiClientVerifier, danger::ClientCertVerifier},
    },
};

use super::{Admitted, Conn, ConnInfo};
use crate::api::PeerInfo;

/// How often the certificate files are checked for changes.
pub const FILES_POLL: Duration = Duration::from_secs(2);

/// The files TLS is made of.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `--tls-cert`: the server's certificate chain (PEM).
    pub cert: PathBuf,
    /// `--tls-key`: its private key (PEM).
    pub key: PathBuf,
    /// `--tls-client-ca`: CAs whose client certificates are accepted (PEM).
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Every file's bytes, to notice a change.
    fn contents(&self) -> Vec<Option<Vec<u8>>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| crate::config::read_flag_file(path).ok())
            .collect()
    }
}

/// The TLS settings in force, and how to renew them.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    /// The client certificate verifier in force, if client CAs are set.
    verifier: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
    refusals: crate::telemetry::Throttle,
}

fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    crate::config::read_flag_file(path).with_context(|| format!("cannot read {flag} {}", path.display()))
}

/// A server config from `files`.
fn build(files: &TlsFiles) -> anyhow::Result<(ServerConfig, Option<Arc<dyn ClientCertVerifier>>)> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("--tls-cert", &files.cert)?)
            .collect::<Result<_, _>>()
            .context("--tls-cert holds no valid PEM certificate")?;
    anyhow::ensure!(!certs.is_empty(), "--tls-cert holds no certificate");
    let key = PrivateKeyDer::from_pem_slice(&read("--tls-key", &files.key)?)
        .context("--tls-key holds no valid PEM private key")?;
    let provider = Arc::new(default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let mut client_verifier: Option<Arc<dyn ClientCertVerifier>> = None;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read("--tls-client-ca", ca)?) {
                roots.add(cert.context("--tls-client-ca holds an invalid certificate")?)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .context("--tls-client-ca")?;
            client_verifier = Some(verifier.clone());
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).context("--tls-cert and --tls-key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, client_verifier))
}

impl Tls {
    /// Loads `files`; fails with a message naming the flag at fault.
    pub fn load(files: TlsFiles) -> anyhow::Result<Self> {
        let (config, verifier) = build(&files)?;
        Ok(Self {
            files,
            config: RwLock::new(Arc::new(config)),
            verifier: RwLock::new(verifier),
            refusals: crate::telemetry::Throttle::default(),
        })
    }

    /// Reads the files again; on error the settings in force stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let (config, verifier) = build(&self.files)?;
        // A poisoned lock only means a panic elsewhere while swapping an Arc.
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        *self.verifier.write().unwrap_or_else(|e| e.into_inner()) = verifier;
        Ok(())
    }

    /// Tells every connection of `budget` whose client certificate the
    /// client CAs in force no longer vouch for to close (a CA rotated away
    /// must not keep working on connections it let in); returns how many.
    pub fn close_untrusted(&self, budget: &super::Budget) -> usize {
        let mut closed = 0;
        for activity in budget.connections() {
            if activity.certs.get().is_some_and(|chain| !self.trusted(chain)) {
                activity.evict("client_ca");
                closed += 1;
            }
        }
        closed
    }

    /// Whether the client CAs in force verify `chain` (true without any).
    fn trusted(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some(verifier) = self.verifier.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return true;
        };
        let Some((leaf, intermediates)) = chain.split_first() else { return true };
        verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).is_ok()
    }

    /// The TLS handshake of `admitted`, within its handshake deadline: the
    /// connection to serve, or `None` (refused, logged and counted).
    pub(crate) async fn handshake(&self, admitted: Admitted) -> Option<Conn> {
        let config = self.config.read().unwrap_or_else(|e| e.into_inner()).clone();
        let Admitted { stream, ticket } = admitted;
        let peer = ticket.peer;
        match tokio::time::timeout_at(ticket.deadline, TlsAcceptor::from(config.clone()).accept(stream)).await
        {
            Ok(Ok(tls)) => {
                let certs = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|chain| Arc::new(chain.iter().map(|c| c.clone().into_owned()).collect()));
                let activity = ticket.slot.activity.clone();
                if let Some(certs) = &certs {
                    let _ = activity.certs.set(Arc::clone(certs));
                    // The client CA may have been reloaded during the
                    // handshake, after `close_untrusted` looked: checked
                    // again against the one in force now.
                    let current = self.config.read().unwrap_or_else(|e| e.into_inner()).clone();
                    if !Arc::ptr_eq(&current, &config) && !self.trusted(certs) {
                        self.refused(
                            peer,
                            "the client CA changed during the handshake and no longer vouches for it",
                        );
                        return None;
                    }
                }
                let info = ConnInfo { peer: PeerInfo { remote: peer, certs }, activity };
                Some(Conn::Tls(Box::new(ticket.wrap(tls)), info))
            }
            Ok(Err(error)) => {
                self.refused(peer, &error.to_string());
                None
            }
            Err(_) => {
                self.refused(peer, "the TLS handshake did not finish within --handshake-timeout");
                None
            }
        }
    }

    /// Logs (at a bounded rate) and counts a refused handshake.
    fn refused(&self, peer: Option<std::net::SocketAddr>, reason: &str) {
        crate::telemetry::metrics::record_tls_handshake_failure();
        if let Some(left_out) = self.refusals.admit() {
            if left_out > 0 {
                tracing::warn!(
                    suppressed = left_out,
                    "more TLS handshakes were refused (not logged one by one)"
                );
            }
            tracing::warn!(?peer, reason, "refused a TLS handshake");
        }
    }
}

/// Reloads `tls` whenever one of its files changes, until `stop` changes.
/// Then the connections whose client certificate is no longer trusted are
/// closed (see [`Tls::close_untrusted`]).
pub async fn follow_files(tls: Arc<Tls>, budget: Arc<super::Budget>, mut stop: watch::Receiver<bool>) {
    let mut last = tls.files.contents();
    let mut polls = tokio::time::interval(FILES_POLL);
    polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = polls.tick() => {}
            _ = stop.changed() => return,
        }
        let now = tls.files.contents();
        if now == last {
            continue;
        }
        last = now;
        match tls.reload() {
            Ok(()) => {
                let closed = tls.close_untrusted(&budget);
                tracing::info!(
                    closed,
                    "reloaded the TLS certificate and key; closed the connections no client CA vouches for any more"
                );
            }
            Err(error) => {
                crate::telemetry::metrics::record_tls_reload_failure();
                tracing::error!("keeping the TLS certificate in force: {error:#}");
            }
        }
    }
}
