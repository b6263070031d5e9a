//! Whether a PlaceOrder's write was sent: what lets a failed call tell the
//! truth. Before the write is sent, giving up means nothing was or will be
//! written; after, the outcome is unknown until the caller retries with the
//! same key.
//!
//! The state moves once, from pending to either sent (the engine is about to
//! send the write, or its batch has begun) or abandoned (the caller gave
//! up); whichever move comes first wins, so the writer never writes an
//! abandoned order and a caller is never told "not written" of a sent one.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::{domain::ClientRequestId, error::Error};

const PENDING: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

/// One PlaceOrder's write: pending, sent or abandoned.
#[derive(Debug, Default)]
pub(super) struct Attempt(AtomicU8);

impl Attempt {
    /// The write is about to be sent: true, unless the caller gave up first
    /// (then it must not be sent).
    pub fn send(&self) -> bool {
        match self.0.compare_exchange(PENDING, SENT, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(state) => state == SENT,
        }
    }

    /// The caller gives up: true if the write was not sent and now never
    /// will be, false if it was sent (the outcome is unknown).
    pub fn abandon(&self) -> bool {
        match self.0.compare_exchange(PENDING, ABANDONED, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => true,
            Err(state) => state == ABANDONED,
        }
    }

    /// The write its batch claimed was not sent after all, and nothing of
    /// it was written (its batch sent it back to be placed alone): pending
    /// again, unless the caller gave up meanwhile. A caller that saw it sent
    /// and was told "outcome unknown" was told the truth either way.
    pub fn unsend(&self) {
        let _ = self.0.compare_exchange(SENT, PENDING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The answer for a caller whose deadline passed: `DeadlineExceeded`
    /// (nothing written) if the write was not sent, else `OutcomeUnknown`.
    pub fn cut_short(&self, key: ClientRequestId) -> Error {
        if self.abandon() {
            Error::DeadlineExceeded
        } else {
            Error::OutcomeUnknown {
                client_request_id: key,
                deadline: true,
                context: "waiting for the order to be written",
                source: "the caller's deadline passed after the write was sent".into(),
            }
        }
    }
}

/// Abandons the attempt when dropped: a caller that went away (cancelled,
/// or cut short by its deadline) before its queued write was sent is never
/// written behind its back.
#[derive(Debug)]
pub(super) struct AbandonOnDrop<'a>(pub &'a Attempt);

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_move_wins() {
        let sent = Attempt::default();
        assert!(sent.send() && sent.send());
        assert!(!sent.abandon(), "a sent write cannot be taken back");
        let given_up = Attempt::default();
        assert!(given_up.abandon() && given_up.abandon());
        assert!(!given_up.send(), "an abandoned write is never sent");
        given_up.unsend();
        assert!(!given_up.send(), "an abandoned write stays abandoned");
        let sent_back = Attempt::default();
        assert!(sent_back.send());
        sent_back.unsend();
        assert!(sent_back.abandon(), "a write sent back can be given up again");
    }
}
