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
        "{} not built: run `cargo build --workspace --all-targets` first",
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

    /// `XDG_STATE_HOME` of every command run here: the learner's default audit log is
    /// `<this>/tracefleet/audit/audit.jsonl`, inside the workspace.
    pub fn xdg_state(&self) -> PathBuf {
        self.path("xdg-state")
    }

    fn command(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
        Command::new(bin(name))
            .args(args)
            .current_dir(self.dir.path())
            .env("TRACEFLEET_STATE_DIR", self.state_dir())
            .env("XDG_STATE_HOME", self.xdg_state())
            .env_remove("TRACEFLEET_AUDIT_DIR")
            .env_remove("TRACEFLEET_MODEL")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .output()
            .expect("spawn")
            .into()
    }

    /// Runs `learner ARGS` in the workspace.
    pub fn learner(&self, args: &[&str]) -> Run {
        self.command("learner", args, &[])
    }

    /// Runs `learner ARGS` with these environment variables too.
    pub fn learner_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        self.command("learner", args, env)
    }

    /// Runs `follower ARGS` in the workspace (with this workspace's state directory).
    pub fn follower(&self, args: &[&str]) -> Run {
        self.command("follower", args, &[])
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

/// A real Mosquitto broker on a free loopback port, with persistence in the workspace (so a
/// restart keeps sessions, subscriptions and queued messages, as a production broker
/// would). Killed when dropped.
pub struct Broker {
    /// The port it listens on.
    pub port: u16,
    conf: PathBuf,
    child: Option<std::process::Child>,
}

/// The size limit lines (`max_packet_size`, `message_size_limit`) of the Mosquitto config
/// the project ships, docs/mosquitto/tracefleet.conf, each with its newline.
///
/// # Panics
/// When the file cannot be read or sets no limit.
pub fn shipped_size_limit() -> String {
    let conf = std::fs::read_to_string(repo_root().join("docs/mosquitto/tracefleet.conf"))
        .expect("docs/mosquitto/tracefleet.conf");
    let lines: String = conf
        .lines()
        .filter(|l| l.starts_with("max_packet_size ") || l.starts_with("message_size_limit "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        !lines.is_empty(),
        "docs/mosquitto/tracefleet.conf sets no size limit"
    );
    lines
}

/// The Mosquitto binary (`mosquitto` on PATH, or Debian's /usr/sbin/mosquitto).
fn mosquitto() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/mosquitto");
    if sbin.is_file() {
        return sbin;
    }
    PathBuf::from("mosquitto")
}

impl Broker {
    /// Starts a broker for `ws` (config and persistence under `ws/mosquitto/`), anonymous,
    /// with the message size limit of docs/mosquitto ([`shipped_size_limit`]).
    ///
    /// # Panics
    /// When Mosquitto is missing or does not start listening within 10 s.
    pub fn start(ws: &Workspace) -> Self {
        Self::start_with(
            ws,
            &format!("allow_anonymous true\n{}", shipped_size_limit()),
        )
    }

    /// Starts a broker whose configuration also has `settings` (authentication lines:
    /// `allow_anonymous`, `password_file`, `acl_file` …).
    ///
    /// # Panics
    /// As [`Broker::start`].
    pub fn start_with(ws: &Workspace, settings: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = ws.path("mosquitto");
        std::fs::create_dir_all(&dir).expect("mosquitto dir");
        let conf = dir.join("mosquitto.conf");
        // Started as root, Mosquitto switches to its own user unless told otherwise, and could
        // then not write its persistence file into this workspace.
        let user = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        std::fs::write(
            &conf,
            format!(
                "user {user}\nlistener {port} 127.0.0.1\n{settings}persistence true\npersistence_location {}/\nmax_queued_messages 100000\nmax_inflight_messages 0\nlog_dest file {}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\n",
                dir.display(),
                dir.display()
            ),
        )
        .expect("mosquitto.conf");
        let mut b = Broker {
            port,
            conf,
            child: None,
        };
        b.restart();
        b
    }

    /// Stops the broker gracefully (SIGTERM: it saves its persistence file).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (after [`Broker::stop`]).
    ///
    /// # Panics
    /// When it does not listen within 10 s.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(&self.conf)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto: install it (scripts/setup.sh does)");
        self.child = Some(child);
        let t = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "mosquitto did not listen on {}",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A long-running workspace process (`learner serve`, `follower agent`), SIGKILLed when
/// dropped.
pub struct Daemon {
    /// The process.
    pub child: std::process::Child,
}

impl Daemon {
    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Workspace {
    /// Starts `name ARGS` in the workspace in the background (stderr to `<name>.log`).
    pub fn daemon(&self, name: &str, args: &[&str]) -> Daemon {
        self.daemon_env(name, args, &[])
    }

    /// [`Workspace::daemon`] with these environment variables too.
    pub fn daemon_env(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        self.daemon_as(name, name, args, env)
    }

    /// [`Workspace::daemon_env`] logging to `<log>.log` (two daemons of one binary).
    pub fn daemon_as(&self, log: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("{log}.log")))
            .expect("log file");
        let child = Command::new(bin(name))
            .args(args)
            .current_dir(self.dir.path())
            .env("TRACEFLEET_STATE_DIR", self.state_dir())
            .env("XDG_STATE_HOME", self.xdg_state())
            .env_remove("TRACEFLEET_AUDIT_DIR")
            .env(
                "RUST_LOG",
                std::env::var("TRACEFLEET_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("TRACEFLEET_MODEL")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn");
        Daemon { child }
    }

    /// Polls `check` every 100 ms until it gives `Some`, for at most `secs` seconds.
    ///
    /// # Panics
    /// On timeout, with `what` and the workspace's logs.
    pub fn wait_until<T>(&self, secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
        let t = std::time::Instant::now();
        loop {
            if let Some(v) = check() {
                return v;
            }
            if t.elapsed() > std::time::Duration::from_secs(secs) {
                // Every daemon's log (`<name>.log` in the workspace) and the broker's.
                let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
                    .map(|d| {
                        d.filter_map(Result::ok)
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| n.ends_with(".log"))
                            .collect()
                    })
                    .unwrap_or_default();
                names.sort();
                names.push("mosquitto/mosquitto.log".into());
                let logs: String = names
                    .iter()
                    .map(|l| {
                        format!(
                            "--- {l}\n{}\n",
                            std::fs::read_to_string(self.path(l)).unwrap_or_default()
                        )
                    })
                    .collect();
                panic!("timed out after {secs} s waiting for {what}\n{logs}");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Publishes one message with QoS 1 as MQTT client `client_id` (with `credentials` if given)
/// and waits up to 10 s for the broker's PUBACK. Mosquitto acknowledges a publish its ACL
/// denies and drops it: a PUBACK does not mean anyone receives it.
///
/// # Errors
/// When the broker refuses the connection or does not acknowledge.
pub fn mqtt_publish(
    port: u16,
    client_id: &str,
    credentials: Option<(&str, &str)>,
    topic: &str,
    payload: Vec<u8>,
) -> Result<(), String> {
    mqtt_publish_as(port, client_id, credentials, topic, payload, false)
}

/// [`mqtt_publish`], retained if `retain`, of any size MQTT allows (a hostile client's
/// publish is bounded by the broker alone).
///
/// # Errors
/// As [`mqtt_publish`]; also when the broker disconnects the client for a packet over its
/// `max_packet_size`.
pub fn mqtt_publish_as(
    port: u16,
    client_id: &str,
    credentials: Option<(&str, &str)>,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        if let Some((u, p)) = credentials {
            o.set_credentials(u, p);
        }
        let mqtt_max = tracefleet::link::MAX_INCOMING_PACKET_BYTES;
        o.set_max_packet_size(mqtt_max, mqtt_max);
        let (client, mut events) = rumqttc::AsyncClient::new(o, 4);
        client
            .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
        .await
        .map_err(|_| "no PUBACK".to_owned())?
    })
}

/// A local HTTP server that speaks the Anthropic Messages API wire format (`POST
/// /v1/messages`), replaying scripted replies in order — the stand-in for Claude, which
/// cannot be reached from here — and recording every request's headers and JSON body.
pub struct FakeMessagesApi {
    /// `http://127.0.0.1:PORT`: the `base_url` to configure.
    pub base_url: String,
    /// (`x-api-key` header, body) of each request received.
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
    _thread: std::thread::JoinHandle<()>,
}

/// One scripted reply: HTTP status, `retry-after` header, body.
pub type ScriptedReply = (u16, Option<&'static str>, String);

impl FakeMessagesApi {
    /// Starts the server on a free loopback port with `replies` (once they run out it
    /// answers 500).
    ///
    /// # Panics
    /// When it cannot bind.
    pub fn start(replies: Vec<ScriptedReply>) -> Self {
        Self::start_at("/v1/messages", replies)
    }

    /// The same server speaking the OpenAI chat-completions wire format instead (`POST
    /// /v1/chat/completions`, as llama-server, Ollama and vLLM do; configure `base_url` +
    /// `/v1`): the stand-in for a local model server. Replies from [`FakeMessagesApi::openai_reply`];
    /// the recorded key is the `Authorization` header.
    pub fn start_openai(replies: Vec<ScriptedReply>) -> Self {
        Self::start_at("/v1/chat/completions", replies)
    }

    fn start_at(route: &'static str, replies: Vec<ScriptedReply>) -> Self {
        use std::sync::{Arc, Mutex};
        let replies = Arc::new(Mutex::new(std::collections::VecDeque::from(replies)));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::clone(&requests);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let handler = move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (replies, seen) = (Arc::clone(&replies), Arc::clone(&seen));
                    async move {
                        let key = headers
                            .get("x-api-key")
                            .or_else(|| headers.get("authorization"))
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                        seen.lock().expect("lock").push((key, json));
                        let (status, retry, body) = replies
                            .lock()
                            .expect("lock")
                            .pop_front()
                            .unwrap_or((500, None, "no reply scripted".into()));
                        let mut resp = axum::response::Response::new(axum::body::Body::from(body));
                        *resp.status_mut() =
                            axum::http::StatusCode::from_u16(status).expect("status");
                        resp.headers_mut().insert(
                            "content-type",
                            axum::http::HeaderValue::from_static("application/json"),
                        );
                        if let Some(r) = retry {
                            resp.headers_mut()
                                .insert("retry-after", axum::http::HeaderValue::from_static(r));
                        }
                        resp
                    }
                };
                let app = axum::Router::new().route(route, axum::routing::post(handler));
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app).await.expect("serve");
            });
        });
        FakeMessagesApi {
            base_url,
            requests,
            _thread: thread,
        }
    }

    /// A successful Messages API reply carrying `text`.
    #[must_use]
    pub fn reply(text: &str, input_tokens: u64, output_tokens: u64) -> ScriptedReply {
        let body = serde_json::json!({
            "id": "msg_test", "type": "message", "role": "assistant", "model": "claude-test-20261101",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
        });
        (200, None, body.to_string())
    }

    /// A successful OpenAI chat-completions reply carrying `text`.
    #[must_use]
    pub fn openai_reply(text: &str, prompt_tokens: u64, completion_tokens: u64) -> ScriptedReply {
        let body = serde_json::json!({
            "id": "chatcmpl-test", "object": "chat.completion", "created": 1_790_000_000,
            "model": "qwen2.5-coder-7b-instruct-q4_k_m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}
        });
        (200, None, body.to_string())
    }
}
