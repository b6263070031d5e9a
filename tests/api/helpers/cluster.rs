//! A Postgres cluster of a test's own, to stop and start (`scripts/pg-cluster`).

use std::path::Path;

/// The path of a file in this repository.
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A private Postgres cluster a test may stop and start (`scripts/pg-cluster`).
pub struct Cluster(pub tempfile::TempDir);

impl Cluster {
    /// `scripts/pg-cluster VERB DIR`: `start` prints the URL.
    pub fn run(&self, verb: &str) -> String {
        self.run_with(verb, &[], "")
    }

    /// `scripts/pg-cluster VERB DIR ARGS…` with `PG_CLUSTER_CONF=conf`.
    pub fn run_with(&self, verb: &str, args: &[&str], conf: &str) -> String {
        let out = std::process::Command::new(repo_path("scripts/pg-cluster"))
            .arg(verb)
            .arg(self.0.path())
            .args(args)
            .env("PG_CLUSTER_CONF", conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg-cluster {verb}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_path("scripts/pg-cluster"))
            .arg("stop")
            .arg(self.0.path())
            .output();
    }
}
