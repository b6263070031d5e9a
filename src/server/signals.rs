//! The signals the process answers: SIGINT and SIGTERM drain it, SIGHUP
//! reloads the auth tokens. Each is caught from the moment it is installed,
//! so one sent during start-up never takes its default action.

use anyhow::Context as _;

/// SIGHUP, caught from the moment this is made, so that one sent early
/// reloads the tokens instead of killing the process (its default action).
#[derive(Debug)]
pub(super) struct Hangups(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangups {
    pub(super) fn install() -> Self {
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangups) => Self(Some(hangups)),
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; auth tokens reload only when their file changes");
                Self(None)
            }
        }
        #[cfg(not(unix))]
        Self()
    }

    /// Resolves on the next SIGHUP; never where none can arrive.
    pub(super) async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(hangups) = &mut self.0
            && hangups.recv().await.is_some()
        {
            return;
        }
        std::future::pending().await
    }
}

/// SIGINT and SIGTERM, caught from the moment this is made: one that
/// arrives before anybody awaits [`recv`](Self::recv) (during start-up, or
/// between the first and second signal) is remembered, never left to the
/// default action, which would kill the process without draining.
#[derive(Debug)]
pub struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Starts catching the signals (call it inside the runtime, early).
    pub fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves on the next SIGINT or SIGTERM (or one already caught).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("received SIGINT"),
            _ = self.terminate.recv() => tracing::info!("received SIGTERM"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("received Ctrl-C");
        }
    }
}
