//! Where the SQLite store reads the time: the system clock in production, a
//! clock the caller moves in tests. (On Postgres every time is the database
//! server's own clock, so replicas agree whatever their clocks say; tests
//! age rows there instead.)

use std::{
    fmt::Debug,
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use crate::domain::Timestamp;

/// A source of the current time.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since_epoch =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp::from_micros(i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX))
    }
}

/// A clock for tests: stopped at the system time (it moves only when told
/// to), or running with the system clock; either way `advance` moves it
/// ahead, so a running clock moved minutes ahead is a replica whose clock
/// is wrong.
#[derive(Debug)]
pub struct ManualClock {
    /// Where it stands (stopped), or its offset from the system clock
    /// (running), in microseconds.
    micros: AtomicI64,
    running: bool,
}

impl ManualClock {
    /// A clock stopped at the current system time.
    pub fn new() -> Self {
        Self { micros: AtomicI64::new(SystemClock.now().as_micros()), running: false }
    }

    /// A clock that runs with the system clock (until moved ahead).
    pub fn running() -> Self {
        Self { micros: AtomicI64::new(0), running: true }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let micros = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        self.micros.fetch_add(micros, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        let micros = self.micros.load(Ordering::SeqCst);
        if self.running {
            Timestamp::from_micros(SystemClock.now().as_micros().saturating_add(micros))
        } else {
            Timestamp::from_micros(micros)
        }
    }
}
