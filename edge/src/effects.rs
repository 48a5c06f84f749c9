//! The interpreter's boundary: the [`Host`] trait through which a run reaches files,
//! processes, the model and the clock, the effect types it exchanges, and [`Completed`], the
//! journal's record of a finished step. It depends on nothing else in this crate, so the
//! interpreter ([`crate::exec`]), the real host ([`crate::host`]), the inference thread
//! ([`crate::infer`]) and the store ([`crate::store`]) all build on it without reaching into
//! one another.

use std::time::Duration;
use tracefleet::report::{LlmUsage, StepResult};

/// Most files a Grep or Glob step looks at (and [`Host::list_files`] returns).
pub const MAX_LISTED_FILES: usize = 100_000;

/// Largest stdout kept from a shell command (bytes); the rest is discarded. Grep output is
/// held to the same cap.
pub const MAX_STDOUT_BYTES: usize = 4 * 1024 * 1024;

/// What a file path refers to, as seen by checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Nothing there.
    Missing,
    /// A regular file of this many bytes.
    File(u64),
    /// A directory.
    Directory,
    /// Something else (socket, device…).
    Other,
}

/// Result of a shell command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellOutput {
    /// Standard output (lossy UTF-8, capped by the host).
    pub stdout: String,
    /// Standard error (lossy UTF-8, capped by the host).
    pub stderr: String,
    /// Exit code; `None` when killed by a signal.
    pub exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
}

/// A request to the device's model.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Model name; `None` = the device's default.
    pub model: Option<String>,
    /// System message.
    pub system: Option<String>,
    /// User message.
    pub prompt: String,
    /// Few-shot turns before it: (user message, the answer expected), in order.
    pub shots: Vec<(String, String)>,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus sampling threshold.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u32,
    /// GBNF grammar with a `root` rule.
    pub grammar: Option<String>,
    /// JSON Schema (JSON text) the output is constrained to, through llama.cpp's
    /// schema-to-grammar converter.
    pub json_schema: Option<String>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Wall-clock limit for the whole request.
    pub timeout: Duration,
}

/// A model's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated text (stop string excluded).
    pub text: String,
    /// Accounting.
    pub usage: LlmUsage,
}

/// Every effect the interpreter needs. Paths are as written in the trace (after variable
/// substitution); the host resolves them against the run's base directory and its policy.
/// Errors are messages for the report: they say what was expected and what was found.
pub trait Host {
    /// Reads a text file; `offset` is the 1-based first line, `limit` the number of lines.
    fn read_file(
        &mut self,
        path: &str,
        offset: Option<u64>,
        limit: Option<u64>,
    ) -> Result<String, String>;
    /// Writes a text file inside the base directory (atomically).
    fn write_file(&mut self, path: &str, content: &str) -> Result<(), String>;
    /// What is at `path`.
    fn file_kind(&mut self, path: &str) -> Result<FileKind, String>;
    /// Every regular file under directory `dir`, recursively, as paths relative to `dir`
    /// (`/`-separated), sorted; symbolic links are not followed. At most
    /// [`MAX_LISTED_FILES`].
    fn list_files(&mut self, dir: &str) -> Result<Vec<String>, String>;
    /// Runs a shell command in the base directory with `env` added to its (scrubbed)
    /// environment.
    fn shell(
        &mut self,
        command: &str,
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<ShellOutput, String>;
    /// Runs the model.
    fn generate(&mut self, request: &GenerateRequest) -> Result<Generation, String>;
    /// Runs the model on several requests as one batch (a foreach LLM step's items): one
    /// result per request, in order, each failing on its own. The default runs them one at a
    /// time through [`Host::generate`].
    fn generate_batch(&mut self, requests: &[GenerateRequest]) -> Vec<Result<Generation, String>> {
        requests.iter().map(|r| self.generate(r)).collect()
    }
    /// Waits (retry backoff).
    fn sleep(&mut self, duration: Duration);
    /// Monotonic time since an arbitrary origin.
    fn monotonic(&self) -> Duration;
    /// Wall-clock time as RFC 3339 UTC text.
    fn timestamp(&self) -> String;
    /// Whether the run must end before its next step (and no further retry starts), and why.
    fn interruption(&self) -> Option<Interruption> {
        None
    }
    /// Fetches `url` (http or https) with a limit on the whole exchange; the body as text.
    /// A non-2xx status is an error that names it.
    fn fetch(&mut self, url: &str, timeout: Duration) -> Result<String, String> {
        let _ = (url, timeout);
        Err("this follower cannot fetch URLs (built without the `webfetch` feature)".into())
    }
    /// Whether the network can reach the host of `url` (name resolution within a few
    /// seconds); checked before any step of a trace with WebFetch steps runs.
    fn reachable(&mut self, url: &str) -> Result<(), String> {
        let _ = url;
        Ok(())
    }
    /// Another handle on the same host for a step that runs concurrently (`max_parallel`
    /// above 1); `None` (the default) runs steps one at a time.
    fn fork(&self) -> Option<Box<dyn Host + Send>> {
        None
    }
}

/// Why a run ends early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interruption {
    /// A stop was requested (SIGINT/SIGTERM, or the fleet): the run ends `stopped` and can be
    /// resumed; a step aborted by a second request is run again on resume.
    Stop,
    /// The run's time limit passed: the run fails with this message.
    Deadline(String),
}

/// A step finished in an earlier attempt of the same run (from the journal).
#[derive(Debug, Clone)]
pub struct Completed {
    /// Its record.
    pub result: StepResult,
    /// Its full output (what later steps bind).
    pub output: String,
}
