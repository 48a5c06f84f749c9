//! The models that write traces: Claude through the Anthropic
//! Messages API, and any OpenAI-compatible chat-completions endpoint (llama-server, Ollama,
//! vLLM). Both behind [`Backend`]; [`AnyBackend`] is the one `learner.toml` chooses.
//!
//! Wire formats followed: Anthropic Messages API (`POST {base}/v1/messages`, headers
//! `x-api-key` and `anthropic-version: 2023-06-01`; reply `content[].text`, `usage.
//! input_tokens|output_tokens`, `stop_reason`) and OpenAI chat completions (`POST
//! {base}/chat/completions` with `base` ending in `/v1`, `Authorization: Bearer`; reply
//! `choices[0].message.content`, `usage.prompt_tokens|completion_tokens`, `finish_reason`).
//!
//! Failures: 429 and 5xx (Anthropic's 529 "overloaded" included) and network errors are
//! retried with exponential backoff — waiting what a `retry-after` header says (seconds, at
//! most [`MAX_RETRY_AFTER`]) when there is one — up to `max_retries` times; every other status
//! is an error at once, carrying the API's own error message.

use serde::Deserialize;
use std::time::Duration;

/// The Anthropic API version this client speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";
/// The longest `retry-after` honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Largest reply body read (bytes).
pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;

/// Which wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Anthropic Messages API.
    Anthropic,
    /// OpenAI-compatible chat completions.
    Openai,
}

/// The `[backend]` table of `learner.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Wire format (default `anthropic`).
    #[serde(default = "default_kind")]
    pub kind: Kind,
    /// Base URL (default `https://api.anthropic.com`; for OpenAI-compatible servers the URL
    /// ending in `/v1`, e.g. `http://127.0.0.1:8080/v1`).
    pub base_url: Option<String>,
    /// Model name, as the API knows it.
    pub model: String,
    /// Most tokens in a reply (default 8192).
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Environment variable holding the API key (default `ANTHROPIC_API_KEY`, or
    /// `OPENAI_API_KEY` for `openai`, where it may be unset for a local server).
    pub api_key_env: Option<String>,
    /// Seconds before one request is given up (default 300).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Retries after a 429, a 5xx or a network error (default 4).
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// First backoff, milliseconds, doubling per retry (default 1000).
    #[serde(default = "default_backoff")]
    pub backoff_ms: u64,
    /// Price per million input tokens, in dollars (default 0: not accounted).
    #[serde(default)]
    pub input_price_per_mtok: f64,
    /// Price per million output tokens, in dollars.
    #[serde(default)]
    pub output_price_per_mtok: f64,
}

fn default_kind() -> Kind {
    Kind::Anthropic
}
fn default_max_tokens() -> u32 {
    8192
}
fn default_timeout() -> u64 {
    300
}
fn default_retries() -> u32 {
    4
}
fn default_backoff() -> u64 {
    1000
}

/// Who says a turn of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The learner.
    User,
    /// The model (an earlier reply, in a repair round).
    Assistant,
}

/// One turn.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Turn {
    /// Who.
    pub role: Role,
    /// What.
    pub content: String,
}

/// What is sent: a system prompt and the conversation so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// System prompt.
    pub system: String,
    /// Turns, oldest first, the last one the user's.
    pub turns: Vec<Turn>,
}

/// A model's reply and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The reply's text.
    pub text: String,
    /// The model that answered (as the API names it).
    pub model: String,
    /// Why it stopped (`end_turn`, `max_tokens`, `stop`, `length`, …).
    pub stop_reason: Option<String>,
    /// Input tokens billed.
    pub input_tokens: u64,
    /// Output tokens billed.
    pub output_tokens: u64,
    /// Requests made (1 + retries).
    pub attempts: u32,
    /// Dollars, from the configured prices.
    pub cost: f64,
}

/// Why no reply came.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No API key where the config says.
    #[error("no API key: set {0} (or [backend] api_key_env)")]
    NoKey(String),
    /// The API answered with an error status that retrying does not fix.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        /// Endpoint.
        url: String,
        /// HTTP status.
        status: u16,
        /// The API's error message (or the start of the body).
        message: String,
    },
    /// Retryable failures, every time.
    #[error("{url}: gave up after {attempts} attempts; last: {last}")]
    Exhausted {
        /// Endpoint.
        url: String,
        /// Requests made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// A reply that is not the API's format.
    #[error("{url}: malformed reply: {detail}")]
    Malformed {
        /// Endpoint.
        url: String,
        /// What was wrong.
        detail: String,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
}

/// A model that completes prompts.
pub trait Backend {
    /// Sends `prompt` and returns the reply, retrying what is retryable.
    ///
    /// # Errors
    /// [`BackendError`].
    fn complete(
        &self,
        prompt: &Prompt,
    ) -> impl Future<Output = Result<Completion, BackendError>> + Send;
}

/// The backend `learner.toml` chooses, ready to use.
#[derive(Debug, Clone)]
pub struct AnyBackend {
    config: BackendConfig,
    key: Option<String>,
    http: reqwest::Client,
}

impl AnyBackend {
    /// Builds the client; reads the API key from the environment.
    ///
    /// # Errors
    /// [`BackendError::NoKey`] for Anthropic without a key; [`BackendError::Client`].
    pub fn new(config: &BackendConfig) -> Result<Self, BackendError> {
        let var = config.api_key_env.clone().unwrap_or_else(|| {
            match config.kind {
                Kind::Anthropic => "ANTHROPIC_API_KEY",
                Kind::Openai => "OPENAI_API_KEY",
            }
            .to_owned()
        });
        let key = std::env::var(&var).ok().filter(|k| !k.is_empty());
        if key.is_none() && config.kind == Kind::Anthropic {
            return Err(BackendError::NoKey(var));
        }
        Self::with_key(config, key)
    }

    /// Builds the client with this API key (none: no authentication header).
    ///
    /// # Errors
    /// [`BackendError::Client`].
    pub fn with_key(config: &BackendConfig, key: Option<String>) -> Result<Self, BackendError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs.max(1)))
            .connect_timeout(Duration::from_secs(30))
            .user_agent(concat!("tracefleet-learner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BackendError::Client(e.to_string()))?;
        Ok(AnyBackend {
            config: config.clone(),
            key,
            http,
        })
    }

    fn url(&self) -> String {
        match self.config.kind {
            Kind::Anthropic => format!(
                "{}/v1/messages",
                self.config
                    .base_url
                    .as_deref()
                    .unwrap_or("https://api.anthropic.com")
                    .trim_end_matches('/')
            ),
            Kind::Openai => format!(
                "{}/chat/completions",
                self.config
                    .base_url
                    .as_deref()
                    .unwrap_or("https://api.openai.com/v1")
                    .trim_end_matches('/')
            ),
        }
    }

    fn request(&self, url: &str, prompt: &Prompt) -> reqwest::RequestBuilder {
        let c = &self.config;
        match c.kind {
            Kind::Anthropic => {
                let body = serde_json::json!({
                    "model": c.model,
                    "max_tokens": c.max_tokens,
                    "system": prompt.system,
                    "messages": prompt.turns,
                });
                self.http
                    .post(url)
                    .header("x-api-key", self.key.clone().unwrap_or_default())
                    .header("anthropic-version", ANTHROPIC_VERSION)
                    .json(&body)
            }
            Kind::Openai => {
                let mut messages =
                    vec![serde_json::json!({"role": "system", "content": prompt.system})];
                messages.extend(prompt.turns.iter().map(|t| serde_json::json!(t)));
                let body = serde_json::json!({
                    "model": c.model,
                    "max_tokens": c.max_tokens,
                    "messages": messages,
                });
                let r = self.http.post(url).json(&body);
                match &self.key {
                    Some(k) => r.bearer_auth(k),
                    None => r,
                }
            }
        }
    }

    fn parse(&self, url: &str, body: &[u8], attempts: u32) -> Result<Completion, BackendError> {
        parse_reply(&self.config, url, body, attempts)
    }
}

/// A reply body in `config.kind`'s wire format, as a [`Completion`] (`url` names the
/// endpoint in errors; `attempts` is recorded). Decodes bytes from outside: fuzzed
/// (`cloud/fuzz`, target `regen_reply`).
///
/// # Errors
/// [`BackendError::Malformed`] when the body is not that format's reply.
pub fn parse_reply(
    config: &BackendConfig,
    url: &str,
    body: &[u8],
    attempts: u32,
) -> Result<Completion, BackendError> {
    let malformed = |detail: String| BackendError::Malformed {
        url: url.to_owned(),
        detail,
    };
    let (text, model, stop_reason, input_tokens, output_tokens) = match config.kind {
        Kind::Anthropic => {
            let r: AnthropicReply =
                serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
            let text: String = r
                .content
                .iter()
                .filter(|b| b.kind == "text")
                .filter_map(|b| b.text.as_deref())
                .collect();
            (
                text,
                r.model,
                r.stop_reason,
                r.usage.input_tokens,
                r.usage.output_tokens,
            )
        }
        Kind::Openai => {
            let r: OpenAiReply =
                serde_json::from_slice(body).map_err(|e| malformed(e.to_string()))?;
            let choice = r
                .choices
                .into_iter()
                .next()
                .ok_or_else(|| malformed("no choices".into()))?;
            let usage = r.usage.unwrap_or_default();
            (
                choice.message.content.unwrap_or_default(),
                r.model.unwrap_or_else(|| config.model.clone()),
                choice.finish_reason,
                usage.prompt_tokens,
                usage.completion_tokens,
            )
        }
    };
    #[allow(clippy::cast_precision_loss)]
    let cost = (input_tokens as f64 * config.input_price_per_mtok
        + output_tokens as f64 * config.output_price_per_mtok)
        / 1e6;
    Ok(Completion {
        text,
        model,
        stop_reason,
        input_tokens,
        output_tokens,
        attempts,
        cost,
    })
}

impl Backend for AnyBackend {
    async fn complete(&self, prompt: &Prompt) -> Result<Completion, BackendError> {
        let url = self.url();
        let mut backoff = Duration::from_millis(self.config.backoff_ms.max(1));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self.request(&url, prompt).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = retry_after(resp.headers());
                    let body = read_limited(resp).await;
                    match body {
                        Ok(body) if status.is_success() => {
                            return self.parse(&url, &body, attempts);
                        }
                        Ok(body) => {
                            let message = api_message(&body);
                            if status.as_u16() != 429 && !status.is_server_error() {
                                return Err(BackendError::Status {
                                    url,
                                    status: status.as_u16(),
                                    message,
                                });
                            }
                            (format!("HTTP {}: {message}", status.as_u16()), retry_after)
                        }
                        Err(e) => (e, None),
                    }
                }
                Err(e) => (e.to_string(), None),
            };
            if attempts > self.config.max_retries {
                return Err(BackendError::Exhausted {
                    url,
                    attempts,
                    last: failure.0,
                });
            }
            let wait = failure.1.unwrap_or(backoff).min(MAX_RETRY_AFTER);
            tracing::warn!(%url, attempt = attempts, error = %failure.0, wait_ms = wait.as_millis(), "model request failed; retrying");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }
}

/// A `retry-after` header in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_REPLY_BYTES {
            return Err(format!("reply larger than {MAX_REPLY_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The error message in an API error body (`{"error": {"message": …}}` in both formats), or
/// the start of the body.
fn api_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
}

#[derive(Deserialize)]
struct AnthropicReply {
    content: Vec<AnthropicBlock>,
    model: String,
    stop_reason: Option<String>,
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
struct AnthropicBlock {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct AnthropicUsage {
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Deserialize)]
struct OpenAiReply {
    choices: Vec<OpenAiChoice>,
    model: Option<String>,
    usage: Option<OpenAiUsage>,
}

#[derive(Deserialize)]
struct OpenAiChoice {
    message: OpenAiMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct OpenAiMessage {
    content: Option<String>,
}

#[derive(Deserialize, Default)]
struct OpenAiUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// A local server speaking the Messages API / chat-completions wire format, replaying
    /// scripted replies (status, retry-after, body) and recording each request.
    /// A scripted reply: status, `retry-after`, body.
    type Scripted = (u16, Option<&'static str>, String);

    #[derive(Clone, Default)]
    struct Fake {
        replies: Arc<Mutex<VecDeque<Scripted>>>,
        seen: Arc<Mutex<Vec<(axum::http::HeaderMap, serde_json::Value)>>>,
    }

    impl Fake {
        async fn start(replies: Vec<Scripted>) -> (Self, String) {
            let fake = Fake {
                replies: Arc::new(Mutex::new(replies.into())),
                ..Fake::default()
            };
            let f = fake.clone();
            let handler = move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let f = f.clone();
                async move {
                    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    f.seen.lock().unwrap().push((headers, json));
                    let (status, retry, body) = f.replies.lock().unwrap().pop_front().unwrap_or((
                        500,
                        None,
                        "no reply scripted".into(),
                    ));
                    let mut resp = axum::response::Response::new(axum::body::Body::from(body));
                    *resp.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                    if let Some(r) = retry {
                        resp.headers_mut()
                            .insert("retry-after", axum::http::HeaderValue::from_static(r));
                    }
                    resp
                }
            };
            let app = axum::Router::new()
                .route("/v1/messages", axum::routing::post(handler.clone()))
                .route("/v1/chat/completions", axum::routing::post(handler));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            (fake, format!("http://{addr}"))
        }

        fn requests(&self) -> usize {
            self.seen.lock().unwrap().len()
        }
    }

    fn config(kind: Kind, base_url: String) -> BackendConfig {
        BackendConfig {
            kind,
            base_url: Some(base_url),
            model: "claude-test".into(),
            max_tokens: 1000,
            api_key_env: None,
            timeout_secs: 10,
            max_retries: 2,
            backoff_ms: 1,
            input_price_per_mtok: 3.0,
            output_price_per_mtok: 15.0,
        }
    }

    fn prompt() -> Prompt {
        Prompt {
            system: "You write tracefleet traces.".into(),
            turns: vec![Turn {
                role: Role::User,
                content: "Fix this trace.".into(),
            }],
        }
    }

    fn messages_reply(text: &str) -> String {
        serde_json::json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-test-20261101",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 1200, "output_tokens": 300}
        })
        .to_string()
    }

    #[tokio::test]
    async fn messages_api_a_429_is_retried_after_what_retry_after_says() {
        let overloaded = serde_json::json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}});
        let (fake, url) = Fake::start(vec![
            (429, Some("0"), overloaded.to_string()),
            (200, None, messages_reply("---\ntrace_id: x\n---")),
        ])
        .await;
        let b =
            AnyBackend::with_key(&config(Kind::Anthropic, url), Some("sk-test".into())).unwrap();
        let c = b.complete(&prompt()).await.unwrap();
        assert_eq!(c.text, "---\ntrace_id: x\n---");
        assert_eq!(
            (c.input_tokens, c.output_tokens, c.attempts),
            (1200, 300, 2)
        );
        assert_eq!(c.model, "claude-test-20261101");
        assert_eq!(c.stop_reason.as_deref(), Some("end_turn"));
        assert!((c.cost - (1200.0 * 3.0 + 300.0 * 15.0) / 1e6).abs() < 1e-12);
        let seen = fake.seen.lock().unwrap();
        let (headers, body) = &seen[1];
        assert_eq!(headers["x-api-key"], "sk-test");
        assert_eq!(headers["anthropic-version"], ANTHROPIC_VERSION);
        assert_eq!(body["model"], "claude-test");
        assert_eq!(body["max_tokens"], 1000);
        assert_eq!(body["system"], "You write tracefleet traces.");
        assert_eq!(body["messages"][0]["role"], "user");
        assert_eq!(body["messages"][0]["content"], "Fix this trace.");
    }

    #[tokio::test]
    async fn a_client_error_is_not_retried_and_carries_the_apis_message() {
        let bad = serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}});
        let (fake, url) = Fake::start(vec![(400, None, bad.to_string())]).await;
        let b = AnyBackend::with_key(&config(Kind::Anthropic, url), Some("k".into())).unwrap();
        let e = b.complete(&prompt()).await.unwrap_err();
        assert!(matches!(e, BackendError::Status { status: 400, .. }), "{e}");
        assert!(e.to_string().contains("max_tokens: too large"), "{e}");
        assert_eq!(fake.requests(), 1);
    }

    #[tokio::test]
    async fn server_errors_are_retried_then_given_up_with_the_last_failure() {
        let (fake, url) = Fake::start(vec![
            (529, None, "{\"error\":{\"message\":\"overloaded\"}}".into()),
            (500, None, "boom".into()),
            (503, None, "{\"error\":{\"message\":\"try later\"}}".into()),
        ])
        .await;
        let b = AnyBackend::with_key(&config(Kind::Anthropic, url), Some("k".into())).unwrap();
        let e = b.complete(&prompt()).await.unwrap_err();
        assert!(
            matches!(e, BackendError::Exhausted { attempts: 3, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("HTTP 503: try later"), "{e}");
        assert_eq!(fake.requests(), 3);
    }

    #[tokio::test]
    async fn a_reply_in_another_format_is_malformed() {
        let (_fake, url) = Fake::start(vec![(200, None, "{\"hello\": 1}".into())]).await;
        let b = AnyBackend::with_key(&config(Kind::Anthropic, url), Some("k".into())).unwrap();
        let e = b.complete(&prompt()).await.unwrap_err();
        assert!(matches!(e, BackendError::Malformed { .. }), "{e}");
    }

    #[tokio::test]
    async fn openai_compatible_servers_get_the_system_prompt_first_and_a_bearer_token() {
        let reply = serde_json::json!({
            "id": "c1", "object": "chat.completion", "model": "qwen2.5-coder",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a trace"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 7, "total_tokens": 57}
        });
        let (fake, url) = Fake::start(vec![(200, None, reply.to_string())]).await;
        let b = AnyBackend::with_key(
            &config(Kind::Openai, format!("{url}/v1")),
            Some("tok".into()),
        )
        .unwrap();
        let c = b.complete(&prompt()).await.unwrap();
        assert_eq!(
            (c.text.as_str(), c.input_tokens, c.output_tokens),
            ("a trace", 50, 7)
        );
        assert_eq!(c.stop_reason.as_deref(), Some("stop"));
        let seen = fake.seen.lock().unwrap();
        let (headers, body) = &seen[0];
        assert_eq!(headers["authorization"], "Bearer tok");
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["content"], "Fix this trace.");
    }

    #[test]
    fn claude_without_a_key_says_which_variable_to_set() {
        let mut c = config(Kind::Anthropic, "http://127.0.0.1:9".into());
        c.api_key_env = Some("TRACEFLEET_TEST_NO_SUCH_KEY_VAR".into());
        let e = AnyBackend::new(&c).unwrap_err();
        assert!(
            e.to_string().contains("TRACEFLEET_TEST_NO_SUCH_KEY_VAR"),
            "{e}"
        );
    }
}
