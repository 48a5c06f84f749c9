//! The MQTT broker embedded in `learner serve`, for a zero-setup single machine: rumqttd,
//! MQTT 3.1.1, plain TCP, started on its own threads before the learner connects to it as an
//! ordinary client.
//!
//! What it keeps — sessions of devices that are offline, their queued QoS 1 messages, the
//! retained rollout waves — lives in memory: a learner restart is a broker restart. A clean
//! restart loses nothing: devices keep unacknowledged reports in their outboxes and send
//! them again, and `serve` publishes the retained waves again on every connection. A crash of
//! `serve` loses what the broker had acknowledged to devices but the learner had not stored
//! yet (the messages in flight, milliseconds of traffic). What it does not do: TLS,
//! per-device credentials and the ACL that stops a device publishing under another's topics.
//! A fleet beyond one trusted network uses an external broker (`[broker]`; docs/mosquitto has
//! a configuration with all of it).

use serde::Deserialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The `[embedded]` table of `learner.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBroker {
    /// Address to listen on (default `0.0.0.0:1883`: devices on the network reach it).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Most client connections at once (default 10,000).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1883))
}

fn default_max_connections() -> usize {
    10_000
}

impl Default for EmbeddedBroker {
    fn default() -> Self {
        EmbeddedBroker {
            listen: default_listen(),
            max_connections: default_max_connections(),
        }
    }
}

/// Largest MQTT packet the embedded broker accepts (bytes; rumqttd's `max_payload_size`
/// bounds the whole packet after its fixed header): the largest any tracefleet client sends
/// or accepts, [`tracefleet::link::MAX_PACKET_BYTES`]. A client that publishes more is
/// disconnected; nothing larger reaches `serve` or a device.
pub const MAX_PAYLOAD_BYTES: usize = tracefleet::link::MAX_PACKET_BYTES;

/// QoS 1 messages the broker sends a client before waiting for its PUBACKs. rumqttd 0.20
/// caps this at 100 whatever the setting (`router::iobufs::MAX_INFLIGHT`), and the learner
/// acknowledges a batch only after its transaction commits: the window bounds the learner's
/// batches, and with it ingest through the embedded broker (docs/benchmarks.md).
pub const MAX_INFLIGHT: usize = 100;

/// Starts the broker on threads of its own and returns once it accepts connections.
///
/// # Errors
/// When the address cannot be listened on (in use, not permitted), or the broker does not
/// accept connections within 10 s.
pub fn start(settings: &EmbeddedBroker) -> anyhow::Result<()> {
    // rumqttd reports a failed bind only in its log, from a thread: find out first.
    drop(std::net::TcpListener::bind(settings.listen).map_err(|e| {
        anyhow::anyhow!(
            "embedded broker: cannot listen on {}: {e} (another broker there? set [embedded] listen, or use an external broker with [broker])",
            settings.listen
        )
    })?);
    let config = format!(
        r#"
id = 0
[router]
max_connections = {max_connections}
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "tracefleet"
listen = "{listen}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = {MAX_PAYLOAD_BYTES}
max_inflight_count = {MAX_INFLIGHT}
dynamic_filters = true
"#,
        max_connections = settings.max_connections + 10,
        listen = settings.listen,
    );
    let config: rumqttd::Config =
        toml::from_str(&config).map_err(|e| anyhow::anyhow!("embedded broker settings: {e}"))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })?;
    let probe = client_address(settings);
    let t = Instant::now();
    while std::net::TcpStream::connect_timeout(&probe, Duration::from_millis(200)).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            anyhow::bail!(
                "embedded broker: not accepting connections on {} after 10 s",
                settings.listen
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(listen = %settings.listen, "embedded MQTT broker (rumqttd) started");
    Ok(())
}

/// Where the learner's own clients reach the embedded broker: its address, or loopback when
/// it listens on every interface.
#[must_use]
pub fn client_address(settings: &EmbeddedBroker) -> SocketAddr {
    if settings.listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], settings.listen.port()))
    } else {
        settings.listen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_address_is_refused_with_what_to_do() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let settings = EmbeddedBroker {
            listen: taken.local_addr().unwrap(),
            max_connections: 10,
        };
        let e = start(&settings).unwrap_err().to_string();
        assert!(
            e.contains("cannot listen on") && e.contains("[embedded] listen"),
            "{e}"
        );
    }
}
