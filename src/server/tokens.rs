//! The auth tokens file, reloaded while the server runs: on SIGHUP, and
//! whenever its content changes (checked every [`TOKENS_POLL`]).

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::signals::Hangups;
use crate::api::Authenticator;

/// How often the auth tokens file is checked for changes.
const TOKENS_POLL: Duration = Duration::from_secs(2);

/// Reloads the auth tokens file on every SIGHUP until `stop` changes; a bad
/// file is logged and the tokens in force stay.
pub(super) async fn reload_on_sighup(
    mut hangups: Hangups,
    auth: Arc<Authenticator>,
    mut stop: watch::Receiver<bool>,
) {
    // Kubernetes updates a mounted Secret by swapping a symlink, and a
    // distroless container cannot be sent a signal: the file is also read
    // every TOKENS_POLL, and reloaded when its content changed.
    let read = |auth: &Authenticator| auth.tokens_file().map(crate::config::read_flag_file);
    let mut last = read(&auth).and_then(Result::ok);
    let mut polls = tokio::time::interval(TOKENS_POLL);
    polls.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            () = hangups.recv() => "SIGHUP",
            _ = polls.tick() => {
                let now = match read(&auth) {
                    None => continue,
                    // Out of descriptors, say: nothing is known to have changed.
                    Some(Err(error)) if crate::config::is_transient(&error) => continue,
                    Some(now) => now.ok(),
                };
                if now == last {
                    continue;
                }
                "the file changed"
            }
            _ = stop.changed() => return,
        };
        last = read(&auth).and_then(Result::ok);
        let (tokens, problems) = auth.reload();
        if problems.is_empty() && tokens == 0 {
            tracing::warn!(why, "reloaded auth tokens: the file grants none, every order call is refused");
        } else if problems.is_empty() {
            tracing::info!(tokens, why, "reloaded auth tokens");
        } else {
            crate::telemetry::metrics::record_token_reload_failure();
            tracing::error!(
                tokens,
                why,
                problems = problems.join("; "),
                "reloaded auth tokens with problems: only the good lines grant access"
            );
        }
    }
}
