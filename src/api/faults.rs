//! Faults the test suite injects into a running server, to show what a
//! caller sees when they happen.

/// Faults a test can inject through [`Application::faults`](crate::server::Application::faults).
/// No flag, environment variable or RPC reaches it, so a running server
/// never injects anything; it is compiled into every build so that the
/// test suite also runs against a release build (`cargo test --release`).
#[derive(Debug, Default)]
pub struct FaultInjector {
    lost_replies: std::sync::atomic::AtomicU32,
}

impl FaultInjector {
    /// The next `n` successful PlaceOrders commit, then answer `UNAVAILABLE`
    /// as if the reply had been lost on the way.
    pub fn lose_next_replies(&self, n: u32) {
        self.lost_replies.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn take_lost_reply(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.lost_replies.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}
