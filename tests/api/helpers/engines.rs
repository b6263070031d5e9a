//! Each test body is an `async fn(Engine)`; [`engine_tests!`] turns it into a
//! SQLite test and a Postgres test. The Postgres ones are ignored unless run
//! with `--include-ignored` (as `scripts/test` does) and need
//! `TEST_DATABASE_URL`; each gets a database of its own on that server.

/// Generates `mod sqlite` and `mod postgres`, each with one test per name
/// calling the `async fn name(engine: Engine)` of the enclosing module.
macro_rules! engine_tests {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::helpers::Engine::Sqlite).await
                }
            )+
        }
        $crate::helpers::postgres_tests!($($name),+);
    };
}

/// Generates `mod postgres` with one Postgres-only test per name.
macro_rules! postgres_tests {
    ($($name:ident),+ $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                #[ignore = "needs TEST_DATABASE_URL; scripts/test runs it"]
                async fn $name() {
                    super::$name($crate::helpers::Engine::Postgres).await
                }
            )+
        }
    };
}

pub(crate) use {engine_tests, postgres_tests};

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}
