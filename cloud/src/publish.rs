//! One message published to the fleet's broker and acknowledged (QoS 1, PUBACK awaited),
//! from a short-lived client: `learner command` ([`send_command`]).

use crate::config::LearnerConfig;
use rumqttc::{AsyncClient, Incoming, QoS};
use std::time::Duration;
use tracefleet::signed::SecretKey;
use tracefleet::wire::{self, Action};

/// Publishes one message with QoS 1 (retained if asked) and waits for the broker's PUBACK.
///
/// # Errors
/// When the broker cannot be reached or does not acknowledge within `timeout`.
pub fn publish_once(
    config: &LearnerConfig,
    client_id: &str,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut options = config.broker.options(client_id, None)?;
        options.set_clean_session(true);
        let (client, mut eventloop) = AsyncClient::new(options, 8);
        client.try_publish(topic, QoS::AtLeastOnce, retain, payload)?;
        tokio::time::timeout(timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(Incoming::PubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(anyhow::anyhow!(
                            "broker {}:{}: {e}",
                            config.broker.host,
                            config.broker.port()
                        ));
                    }
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no PUBACK from the broker within {timeout:?}"))??;
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
        Ok(())
    })
}

/// Sends `action` to `device`: numbered by the database's per-device command counter,
/// valid for `expires` from now, signed with `keys`, published with QoS 1 (the device gets
/// it when it reconnects). Returns the command sent.
///
/// # Errors
/// The database, or a broker that cannot be reached or does not acknowledge in 30 s.
pub fn send_command(
    config: &LearnerConfig,
    device: &str,
    action: Action,
    keys: &[SecretKey],
    expires: Duration,
) -> anyhow::Result<wire::Command> {
    let mut db = config.open_db()?;
    let now = tracefleet::time::unix_now();
    let command = wire::Command {
        device_id: device
            .parse()
            .map_err(|e| anyhow::anyhow!("device {device:?}: {e}"))?,
        counter: db.next_command_counter(device)?,
        issued_at: now,
        expires_at: now.saturating_add(expires.as_secs()),
        action,
    };
    let refs: Vec<&SecretKey> = keys.iter().collect();
    let payload = wire::encode(&wire::sign_command(&command, &refs));
    publish_once(
        config,
        &format!("{}-command", config.client_id),
        &wire::Topic::Commands(device.to_owned()).name(),
        payload,
        false,
        Duration::from_secs(30),
    )?;
    Ok(command)
}
