//! Test harness for end-to-end tests: finds the real `follower` and `learner` binaries and
//! the test model, and gives each test its own temporary workspace and state directory.
//!
//! The binaries are the ones cargo built for this workspace (`cargo build --workspace --bins`
//! before `cargo test`; the README's test command does both).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of a workspace binary next to the test executable (`target/<profile>/<name>`).
///
/// # Panics
/// When the binary has not been built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// The test model (SmolLM2-135M-Instruct Q4_1): `$TRACEFLEET_TEST_MODEL` or the file that
/// `models/fetch.sh` writes.
///
/// # Panics
/// When the model is missing.
pub fn model() -> PathBuf {
    let p = std::env::var_os("TRACEFLEET_TEST_MODEL").map_or_else(
        || repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        PathBuf::from,
    );
    assert!(
        p.is_file(),
        "test model {} missing: run models/fetch.sh",
        p.display()
    );
    p
}

/// A temporary workspace with its own follower state directory.
pub struct Workspace {
    dir: tempfile::TempDir,
}

/// A finished command.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` if killed).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

impl Workspace {
    /// A fresh workspace.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A path inside the workspace.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The follower's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    fn command(&self, name: &str, args: &[&str]) -> Run {
        Command::new(bin(name))
            .args(args)
            .current_dir(self.dir.path())
            .env("TRACEFLEET_STATE_DIR", self.state_dir())
            .env_remove("TRACEFLEET_MODEL")
            .env_remove("RUST_LOG")
            .output()
            .expect("spawn")
            .into()
    }

    /// Runs `learner ARGS` in the workspace.
    pub fn learner(&self, args: &[&str]) -> Run {
        self.command("learner", args)
    }

    /// Runs `follower ARGS` in the workspace (with this workspace's state directory).
    pub fn follower(&self, args: &[&str]) -> Run {
        self.command("follower", args)
    }

    /// Generates a trace-signing key named `name` (secret `name.key`, public `name.key.pub`).
    pub fn key(&self, name: &str) -> String {
        let out = format!("{name}.key");
        let r = self.learner(&["keys", "generate", "--out", &out]);
        assert_eq!(r.code, Some(0), "{r:?}");
        out
    }

    /// Compiles `traces/<src>` and signs it with `key`; returns the signed file's name.
    pub fn sign(&self, src: &str, key: &str) -> String {
        let src = repo_root().join("traces").join(src);
        let stem = src
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("t")
            .trim_end_matches(".trace.md")
            .to_owned();
        let compiled = format!("{stem}.tfc");
        let signed = format!("{stem}.{}.tfs", key.trim_end_matches(".key"));
        let r = self.learner(&["compile", src.to_str().expect("utf-8"), "-o", &compiled]);
        assert_eq!(r.code, Some(0), "{r:?}");
        let r = self.learner(&["sign", &compiled, "--key", key, "-o", &signed]);
        assert_eq!(r.code, Some(0), "{r:?}");
        signed
    }

    /// Provisions this workspace's follower with a trust root (v1, signed by a fresh root key
    /// `root.key`) whose trace-signing role is `key` alone, threshold 1.
    pub fn trust(&self, key: &str) {
        self.provision(&[key], 1);
    }

    /// Provisions the follower with a trust root v1 naming `trace_keys` with `threshold`.
    pub fn provision(&self, trace_keys: &[&str], threshold: u32) {
        let root = self.root_v1(trace_keys, threshold, "365d");
        let r = self.follower(&["trust", "init", &root]);
        assert_eq!(r.code, Some(0), "{r:?}");
    }

    /// Creates (without installing) `root-v1.tfr`, signed by `root.key` (created if missing).
    pub fn root_v1(&self, trace_keys: &[&str], threshold: u32, expires: &str) -> String {
        if !self.path("root.key").exists() {
            let r = self.learner(&["keys", "generate", "--role", "root", "--out", "root.key"]);
            assert_eq!(r.code, Some(0), "{r:?}");
        }
        let mut args = vec![
            "trust",
            "create",
            "--version",
            "1",
            "--expires",
            expires,
            "--root-key",
            "root.key.pub",
        ];
        let pubs: Vec<String> = trace_keys.iter().map(|k| format!("{k}.pub")).collect();
        for p in &pubs {
            args.extend(["--traces-key", p.as_str()]);
        }
        let t = threshold.to_string();
        args.extend([
            "--traces-threshold",
            &t,
            "--sign",
            "root.key",
            "-o",
            "root-v1.tfr",
        ]);
        let r = self.learner(&args);
        assert_eq!(r.code, Some(0), "{r:?}");
        "root-v1.tfr".into()
    }

    /// Reads a JSON file from the workspace.
    pub fn json(&self, rel: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        serde_json::from_str(&text).expect("json")
    }

    /// The number of runs the follower recorded.
    pub fn run_count(&self) -> usize {
        let r = self.follower(&["runs", "list"]);
        assert_eq!(r.code, Some(0), "{r:?}");
        r.stdout.lines().count()
    }
}
