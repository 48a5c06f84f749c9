//! MQTT connection settings shared by `follower agent` and `learner serve` (feature `mqtt`):
//! the `[broker]` table of their TOML configs, environment overrides, and the rumqttc
//! options built from them (persistent session, QoS 1 flow control, TLS through rustls with
//! the *ring* provider, username/password).
//!
//! **Message sizes.** rumqttc fails the whole connection on an incoming packet over its
//! limit (`PayloadSizeLimitExceeded`, before reading it), and a persistent session gets the
//! same message again on the next connection: one oversized QoS 1 message would stop a
//! client for good. So a client reads any packet MQTT can carry
//! ([`MAX_INCOMING_PACKET_BYTES`]) and the application's limits are enforced where the
//! payload is decoded (`wire::decode`, `signed::verify`): an oversized message is refused
//! there like any malformed one — logged, counted and acknowledged. The broker is the first
//! line: docs/mosquitto/tracefleet.conf refuses packets over [`MAX_PACKET_BYTES`], the
//! largest any tracefleet client sends or accepts.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The largest MQTT packet a tracefleet client sends, and the limit a broker should enforce
/// (`max_packet_size` in docs/mosquitto/tracefleet.conf, the embedded broker's
/// `max_payload_size`): the largest payload any side accepts — a signed trace,
/// [`crate::signed::MAX_SIGNED_BYTES`] — with room for its topic and headers.
pub const MAX_PACKET_BYTES: usize = crate::signed::MAX_SIGNED_BYTES + 4096;

/// The largest packet a client reads: MQTT 3.1.1's largest remaining length (256 MiB − 1),
/// so that nothing a broker delivers can fail the connection; the decoders then refuse what
/// is over the application's limits (see the module documentation).
pub const MAX_INCOMING_PACKET_BYTES: usize = 268_435_455;

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
    /// manual acknowledgement of incoming messages and `last_will` if given. Incoming
    /// packets of any size MQTT allows are read ([`MAX_INCOMING_PACKET_BYTES`]: the caller's
    /// decoder refuses what is too large, and acknowledges it); outgoing ones are limited to
    /// [`MAX_PACKET_BYTES`].
    ///
    /// # Errors
    /// [`LinkError`] for unreadable files or inconsistent settings.
    pub fn options(
        &self,
        client_id: &str,
        last_will: Option<rumqttc::LastWill>,
    ) -> Result<rumqttc::MqttOptions, LinkError> {
        let mut o = rumqttc::MqttOptions::new(client_id, &self.host, self.port());
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(self.keep_alive_secs.max(5)))
            .set_manual_acks(true)
            .set_inflight(self.inflight.max(1))
            .set_max_packet_size(MAX_INCOMING_PACKET_BYTES, MAX_PACKET_BYTES);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_read_any_packet_and_the_shipped_broker_limit_is_the_largest_they_send() {
        let o = BrokerConfig::default().options("pi-01", None).unwrap();
        assert_eq!(o.max_packet_size(), MAX_INCOMING_PACKET_BYTES);
        let conf = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/mosquitto/tracefleet.conf"
        ))
        .unwrap();
        let limits: Vec<usize> = conf
            .lines()
            .filter_map(|l| l.strip_prefix("max_packet_size "))
            .map(|v| v.trim().parse().unwrap())
            .collect();
        assert_eq!(limits, [MAX_PACKET_BYTES]);
        assert!(!conf.lines().any(|l| l.starts_with("message_size_limit")));
        // The largest signed trace on the longest trace topic fits in a packet.
        let topic = crate::wire::Topic::GroupTrace("g".repeat(64), "t".repeat(64)).name();
        assert!(crate::signed::MAX_SIGNED_BYTES + topic.len() + 2 + 2 + 5 <= MAX_PACKET_BYTES);
    }
}
