//! MQTT connection settings shared by `follower agent` and `learner serve` (feature `mqtt`):
//! the `[broker]` table of their TOML configs, environment overrides, and the rumqttc
//! options built from them (persistent session, QoS 1 flow control, TLS through rustls with
//! the *ring* provider, username/password).

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The `[broker]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name or address (default `127.0.0.1`).
    #[serde(default = "default_host")]
    pub host: String,
    /// Port (default 1883, or 8883 with TLS).
    pub port: Option<u16>,
    /// Username, when the broker wants one.
    pub username: Option<String>,
    /// Password (prefer `password_file` or `TRACEFLEET_MQTT_PASSWORD`).
    pub password: Option<String>,
    /// A file holding the password (trailing newline ignored).
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the broker's certificate: turns TLS on.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `client_key_file`).
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub client_key_file: Option<PathBuf>,
    /// MQTT keep-alive, seconds (default 30).
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// QoS 1 messages in flight before waiting for PUBACKs (default 64).
    #[serde(default = "default_inflight")]
    pub inflight: u16,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_inflight() -> u16 {
    64
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            host: default_host(),
            port: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            keep_alive_secs: default_keep_alive(),
            inflight: default_inflight(),
        }
    }
}

/// Why the broker settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// A file named in the settings cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    File {
        /// Which setting.
        what: &'static str,
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A value that does not fit.
    #[error("{0}")]
    Invalid(String),
}

impl BrokerConfig {
    /// Applies `TRACEFLEET_MQTT_HOST`, `_PORT`, `_USERNAME` and `_PASSWORD` from the environment.
    ///
    /// # Errors
    /// [`LinkError::Invalid`] for a port that is not a number.
    pub fn apply_env(&mut self) -> Result<(), LinkError> {
        if let Ok(h) = std::env::var("TRACEFLEET_MQTT_HOST") {
            self.host = h;
        }
        if let Ok(p) = std::env::var("TRACEFLEET_MQTT_PORT") {
            self.port = Some(p.parse().map_err(|_| {
                LinkError::Invalid(format!(
                    "TRACEFLEET_MQTT_PORT {p:?}: expected a port number"
                ))
            })?);
        }
        if let Ok(u) = std::env::var("TRACEFLEET_MQTT_USERNAME") {
            self.username = Some(u);
        }
        if let Ok(p) = std::env::var("TRACEFLEET_MQTT_PASSWORD") {
            self.password = Some(p);
        }
        Ok(())
    }

    /// The port in use.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or(if self.ca_file.is_some() { 8883 } else { 1883 })
    }

    /// rumqttc options for a persistent session (clean session off) as `client_id`, with
    /// manual acknowledgement of incoming messages and `last_will` if given.
    ///
    /// # Errors
    /// [`LinkError`] for unreadable files or inconsistent settings.
    pub fn options(
        &self,
        client_id: &str,
        last_will: Option<rumqttc::LastWill>,
        max_incoming_bytes: usize,
    ) -> Result<rumqttc::MqttOptions, LinkError> {
        let mut o = rumqttc::MqttOptions::new(client_id, &self.host, self.port());
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(self.keep_alive_secs.max(5)))
            .set_manual_acks(true)
            .set_inflight(self.inflight.max(1))
            .set_max_packet_size(
                max_incoming_bytes + 4096,
                crate::wire::MAX_MESSAGE_BYTES + 4096,
            );
        if let Some(w) = last_will {
            o.set_last_will(w);
        }
        let password = match (&self.password, &self.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(f)) => Some(
                read(f, "password_file")
                    .map(|b| String::from_utf8_lossy(&b).trim_end().to_owned())?,
            ),
            (None, None) => None,
        };
        match (&self.username, password) {
            (Some(u), p) => {
                o.set_credentials(u, p.unwrap_or_default());
            }
            (None, Some(_)) => {
                return Err(LinkError::Invalid(
                    "a broker password without a username: set `username` too".into(),
                ));
            }
            (None, None) => {}
        }
        if let Some(ca) = &self.ca_file {
            // rumqttc builds its rustls config with the process-wide provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client_auth = match (&self.client_cert_file, &self.client_key_file) {
                (Some(c), Some(k)) => {
                    Some((read(c, "client_cert_file")?, read(k, "client_key_file")?))
                }
                (None, None) => None,
                _ => {
                    return Err(LinkError::Invalid(
                        "mutual TLS needs both client_cert_file and client_key_file".into(),
                    ));
                }
            };
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Simple {
                    ca: read(ca, "ca_file")?,
                    alpn: None,
                    client_auth,
                },
            ));
        }
        Ok(o)
    }
}

fn read(path: &std::path::Path, what: &'static str) -> Result<Vec<u8>, LinkError> {
    std::fs::read(path).map_err(|source| LinkError::File {
        what,
        path: path.display().to_string(),
        source,
    })
}
