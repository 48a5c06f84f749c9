//! One message published to the fleet's broker and acknowledged (QoS 1, PUBACK awaited),
//! from a short-lived client: `learner command`.

use crate::config::LearnerConfig;
use rumqttc::{AsyncClient, Incoming, QoS};
use std::time::Duration;
use tracefleet::wire;

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
        let mut options = config
            .broker
            .options(client_id, None, wire::MAX_MESSAGE_BYTES)?;
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
