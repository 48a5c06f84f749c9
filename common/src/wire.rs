//! The fleet link: MQTT topics and payloads, defined once for the follower and the learner
//! (ARCHITECTURE.md's bird's-eye view shows who publishes what).
//!
//! Topics live under [`TOPIC_PREFIX`]. Devices publish on `devices/{id}/heartbeat|reports|acks|
//! escalations|status`; the learner publishes signed traces, retained, on
//! `fleet/traces/{trace_id}` and `groups/{group}/traces/{trace_id}`, and signed commands on
//! `devices/{id}/commands`. [`Topic`] builds and parses them.
//!
//! Payloads are postcard with a leading format byte ([`WIRE_FORMAT_VERSION`]), except the trace
//! topics, which carry a signed trace file as is (its own `TFS` magic, version and signatures;
//! see [`crate::signed`]). A run report travels as its JSON form inside the postcard envelope
//! (the report is the stable, documented JSON of `follower run --output`). Every decoder here
//! takes outside bytes: it checks the size limit first, the format byte, and refuses trailing
//! bytes; errors say what was expected and what was found.
//!
//! Commands are signed by keys of the trust root's `commands` role (threshold signatures, like
//! traces) and carry a per-device counter that must grow: a replayed or reordered command is
//! refused by the device.

use crate::ids::{DeviceId, TraceId, Version};
use crate::report::Telemetry;
use crate::signed::{self, KeyId, KeyRole, SecretKey, SignatureEntry};
use crate::trust::TrustRoot;
use serde::{Deserialize, Serialize};

/// Prefix of every topic of this protocol version.
pub const TOPIC_PREFIX: &str = "tracefleet/v1";
/// First byte of every postcard payload.
pub const WIRE_FORMAT_VERSION: u8 = 1;
/// Largest payload other than a trace (bytes): a report with capped step outputs fits.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Longest device id, group name or trace id in a topic (bytes).
pub const MAX_NAME_BYTES: usize = 64;

/// A topic of the fleet link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// Device → learner: liveness and telemetry ([`Heartbeat`]), QoS 0.
    Heartbeat(String),
    /// Device → learner: run reports ([`ReportMessage`]), QoS 1.
    Reports(String),
    /// Device → learner: outcomes of pushed traces ([`Ack`]), QoS 1.
    Acks(String),
    /// Device → learner: steps and goals that need a person ([`EscalationMessage`]), QoS 1.
    Escalations(String),
    /// Device → learner: online or offline ([`Status`]; the offline one is the last will),
    /// retained, QoS 1.
    Status(String),
    /// Learner → device: signed commands ([`SignedCommand`]), QoS 1.
    Commands(String),
    /// Learner → every device: a signed trace, retained.
    FleetTrace(String),
    /// Learner → a group's devices: a signed trace, retained. (group, trace id)
    GroupTrace(String, String),
    /// Learner → one device (a canary): a signed trace, retained. (device, trace id)
    DeviceTrace(String, String),
}

/// Why a topic name or a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Over the size limit.
    #[error("payload of {found} bytes: expected at most {limit}")]
    TooLarge {
        /// Bytes received.
        found: usize,
        /// The limit.
        limit: usize,
    },
    /// Empty, or a format byte this version does not read.
    #[error("payload format byte {found:?}: expected {WIRE_FORMAT_VERSION}")]
    Format {
        /// The first byte, if any.
        found: Option<u8>,
    },
    /// The body does not decode as the expected message.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The message type expected.
        what: &'static str,
        /// What went wrong (postcard's or serde_json's words).
        detail: String,
    },
    /// A topic outside this protocol.
    #[error(
        "topic {0:?}: expected tracefleet/v1/devices/<id>/<kind>, …/devices/<id>/traces/<id>, …/fleet/traces/<id> or …/groups/<group>/traces/<id>"
    )]
    Topic(String),
    /// A name that cannot be a topic level.
    #[error(
        "{what} {name:?}: expected 1 to {MAX_NAME_BYTES} bytes of letters, digits, '-', '_' or '.'"
    )]
    Name {
        /// Which name.
        what: &'static str,
        /// The name.
        name: String,
    },
}

/// Checks a device id, group or trace id used as a topic level: no MQTT wildcards or
/// separators, bounded length.
///
/// # Errors
/// [`WireError::Name`].
pub fn check_name(what: &'static str, name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(WireError::Name {
            what,
            name: name.chars().take(MAX_NAME_BYTES + 8).collect(),
        })
    }
}

impl Topic {
    /// The topic name.
    #[must_use]
    pub fn name(&self) -> String {
        let p = TOPIC_PREFIX;
        match self {
            Topic::Heartbeat(d) => format!("{p}/devices/{d}/heartbeat"),
            Topic::Reports(d) => format!("{p}/devices/{d}/reports"),
            Topic::Acks(d) => format!("{p}/devices/{d}/acks"),
            Topic::Escalations(d) => format!("{p}/devices/{d}/escalations"),
            Topic::Status(d) => format!("{p}/devices/{d}/status"),
            Topic::Commands(d) => format!("{p}/devices/{d}/commands"),
            Topic::FleetTrace(t) => format!("{p}/fleet/traces/{t}"),
            Topic::GroupTrace(g, t) => format!("{p}/groups/{g}/traces/{t}"),
            Topic::DeviceTrace(d, t) => format!("{p}/devices/{d}/traces/{t}"),
        }
    }

    /// Parses a topic name; names in it are checked with [`check_name`].
    ///
    /// # Errors
    /// [`WireError::Topic`] or [`WireError::Name`].
    pub fn parse(topic: &str) -> Result<Self, WireError> {
        let bad = || WireError::Topic(topic.chars().take(200).collect());
        let rest = topic
            .strip_prefix(TOPIC_PREFIX)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(bad)?;
        let levels: Vec<&str> = rest.split('/').collect();
        let t = match levels.as_slice() {
            ["devices", d, kind] => {
                check_name("device id", d)?;
                let d = (*d).to_owned();
                match *kind {
                    "heartbeat" => Topic::Heartbeat(d),
                    "reports" => Topic::Reports(d),
                    "acks" => Topic::Acks(d),
                    "escalations" => Topic::Escalations(d),
                    "status" => Topic::Status(d),
                    "commands" => Topic::Commands(d),
                    _ => return Err(bad()),
                }
            }
            ["devices", d, "traces", t] => {
                check_name("device id", d)?;
                check_name("trace id", t)?;
                Topic::DeviceTrace((*d).to_owned(), (*t).to_owned())
            }
            ["fleet", "traces", t] => {
                check_name("trace id", t)?;
                Topic::FleetTrace((*t).to_owned())
            }
            ["groups", g, "traces", t] => {
                check_name("group", g)?;
                check_name("trace id", t)?;
                Topic::GroupTrace((*g).to_owned(), (*t).to_owned())
            }
            _ => return Err(bad()),
        };
        Ok(t)
    }

    /// The device a device topic belongs to.
    #[must_use]
    pub fn device(&self) -> Option<&str> {
        match self {
            Topic::Heartbeat(d)
            | Topic::Reports(d)
            | Topic::Acks(d)
            | Topic::Escalations(d)
            | Topic::Status(d)
            | Topic::Commands(d)
            | Topic::DeviceTrace(d, _) => Some(d),
            Topic::FleetTrace(_) | Topic::GroupTrace(..) => None,
        }
    }
}

/// Subscription filter for every device's messages of one kind (`+` for the device), for the
/// learner: `tracefleet/v1/devices/+/{kind}`.
#[must_use]
pub fn all_devices(kind: &str) -> String {
    format!("{TOPIC_PREFIX}/devices/+/{kind}")
}

/// Subscription filters a device needs: its commands, the fleet's traces, its groups' traces.
#[must_use]
pub fn device_subscriptions(device: &str, groups: &[String]) -> Vec<String> {
    let mut v = vec![
        Topic::Commands(device.to_owned()).name(),
        format!("{TOPIC_PREFIX}/devices/{device}/traces/+"),
        format!("{TOPIC_PREFIX}/fleet/traces/+"),
    ];
    v.extend(
        groups
            .iter()
            .map(|g| format!("{TOPIC_PREFIX}/groups/{g}/traces/+")),
    );
    v
}

/// A trace installed on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledTrace {
    /// Its id.
    pub trace_id: String,
    /// Its version.
    pub version: String,
}

/// A run in progress on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningRun {
    /// The run.
    pub run_id: String,
    /// The trace.
    pub trace_id: String,
    /// Seconds since the Unix epoch when it started.
    pub started_at: u64,
}

/// Device → learner, every `heartbeat_secs`: liveness, what is installed and running, and the
/// device's resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The device.
    pub device_id: DeviceId,
    /// Seconds since the Unix epoch.
    pub sent_at: u64,
    /// The follower's version (`CARGO_PKG_VERSION`).
    pub follower_version: String,
    /// The groups the device belongs to (its config).
    pub groups: Vec<String>,
    /// Installed traces.
    pub installed: Vec<InstalledTrace>,
    /// Runs in progress.
    pub running: Vec<RunningRun>,
    /// Memory, load, temperatures, GPUs.
    pub telemetry: Telemetry,
    /// The device's identity for confidential traces (`age1…`, see [`crate::confidential`]).
    /// Added after the first release: [`decode_heartbeat`] also reads heartbeats without it
    /// (followers older than their learner); a learner must be upgraded before its devices.
    pub recipient: Option<String>,
}

/// A heartbeat as followers before confidential traces sent it (no `recipient`).
#[derive(Deserialize)]
struct HeartbeatWithoutRecipient {
    device_id: DeviceId,
    sent_at: u64,
    follower_version: String,
    groups: Vec<String>,
    installed: Vec<InstalledTrace>,
    running: Vec<RunningRun>,
    telemetry: Telemetry,
}

/// Decodes a heartbeat, with or without the `recipient` that later followers add; a recipient
/// must be a canonical age X25519 recipient.
///
/// # Errors
/// [`WireError`], as [`decode`]; a recipient that does not parse is
/// [`WireError::Malformed`].
pub fn decode_heartbeat(bytes: &[u8]) -> Result<Heartbeat, WireError> {
    let hb = match decode::<Heartbeat>(bytes, "heartbeat") {
        Ok(hb) => hb,
        Err(first) => {
            let Ok(h) = decode::<HeartbeatWithoutRecipient>(bytes, "heartbeat") else {
                return Err(first);
            };
            Heartbeat {
                device_id: h.device_id,
                sent_at: h.sent_at,
                follower_version: h.follower_version,
                groups: h.groups,
                installed: h.installed,
                running: h.running,
                telemetry: h.telemetry,
                recipient: None,
            }
        }
    };
    if let Some(r) = &hb.recipient {
        r.parse::<crate::confidential::Recipient>()
            .map_err(|e| WireError::Malformed {
                what: "heartbeat",
                detail: e.to_string(),
            })?;
    }
    Ok(hb)
}

/// Device → learner: one run's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportMessage {
    /// The run (also inside the report; the learner ingests idempotently by it).
    pub run_id: String,
    /// The report as `follower run --output` writes it ([`crate::report::Report`], JSON).
    pub report_json: String,
}

/// What became of a pushed trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckOutcome {
    /// Verified and installed.
    Installed,
    /// This version (or a newer one) was already installed.
    AlreadyInstalled,
    /// Refused, with the reason (verification, rollback, malformed).
    Refused(String),
}

/// Device → learner: the outcome of a pushed trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The trace id (from the topic when the payload did not decode).
    pub trace_id: String,
    /// The version pushed, when it could be read.
    pub version: Option<String>,
    /// Installed, already there, or refused.
    pub outcome: AckOutcome,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// Device → learner: something needs a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalationMessage {
    /// The device.
    pub device_id: DeviceId,
    /// The trace (`-` for a goal no trace matched).
    pub trace_id: String,
    /// The run, when one was running.
    pub run_id: Option<String>,
    /// Why.
    pub reason: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// How an escalation's `reason` begins when no installed trace matched a goal (its
/// `trace_id` is `-`); the goal follows as a JSON string. [`no_trace_for_goal`] writes it,
/// [`unmatched_goal`] reads it back: the learner writes a first trace for such goals.
pub const NO_TRACE_FOR_GOAL: &str = "no installed trace matches the goal ";

/// The escalation reason for a goal no installed trace matched.
#[must_use]
pub fn no_trace_for_goal(goal: &str) -> String {
    format!(
        "{NO_TRACE_FOR_GOAL}{}",
        serde_json::to_string(goal).unwrap_or_default()
    )
}

/// The goal in an escalation reason written by [`no_trace_for_goal`], if it is one.
#[must_use]
pub fn unmatched_goal(reason: &str) -> Option<String> {
    serde_json::from_str(reason.strip_prefix(NO_TRACE_FOR_GOAL)?).ok()
}

/// Device → learner: online (published at connect) or offline (the last will), retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Whether the device is connected.
    pub online: bool,
    /// Seconds since the Unix epoch (for the last will: when the connection was made).
    pub at: u64,
}

/// What a command asks of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Run an installed trace with these inputs.
    Run {
        /// The trace id.
        trace_id: String,
        /// `--var` inputs.
        vars: Vec<(String, String)>,
    },
    /// Stop a run after its current step (SIGTERM); `None` = every run.
    Stop(Option<String>),
    /// Abort a run's current step (a second SIGTERM); `None` = every run.
    Abort(Option<String>),
    /// Kill a run's process at once (SIGKILL; resumable later); `None` = every run.
    Kill(Option<String>),
}

/// What the command keys sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The device it is for (a command for another device is refused).
    pub device_id: DeviceId,
    /// Grows with every command to this device; the device refuses one not above the last
    /// it accepted (replay and reordering protection).
    pub counter: u64,
    /// Seconds since the Unix epoch.
    pub issued_at: u64,
    /// After this time (seconds since the Unix epoch) the device refuses it.
    pub expires_at: u64,
    /// What to do.
    pub action: Action,
}

/// A command with its signatures, as published on `devices/{id}/commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    /// The postcard encoding of the [`Command`] the signatures cover.
    #[serde(with = "serde_bytes")]
    pub command: Vec<u8>,
    /// Signatures by `commands` keys.
    pub signatures: Vec<SignatureEntry>,
}

/// Domain tag of command signatures (a trace signature can never pass for one).
const COMMAND_CONTEXT: &[u8] = b"tracefleet command v1\0";

fn command_message(command_bytes: &[u8]) -> Vec<u8> {
    let mut m = COMMAND_CONTEXT.to_vec();
    m.extend_from_slice(command_bytes);
    m
}

/// Signs `command` with each key (give the `commands` keys a threshold needs).
#[must_use]
pub fn sign_command(command: &Command, keys: &[&SecretKey]) -> SignedCommand {
    let bytes = postcard::to_allocvec(command).unwrap_or_default();
    let message = command_message(&bytes);
    SignedCommand {
        signatures: keys
            .iter()
            .map(|k| signed::sign_message(&message, k))
            .collect(),
        command: bytes,
    }
}

/// Why a device refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The payload or the signed command inside does not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Too few valid signatures by trusted command keys.
    #[error(
        "command signatures: {valid} valid of {threshold} needed (signed by {signers}; trusted command keys: {trusted})"
    )]
    Signatures {
        /// Valid distinct signatures.
        valid: usize,
        /// Needed.
        threshold: usize,
        /// Signers found.
        signers: String,
        /// Trusted keys.
        trusted: String,
    },
    /// For another device.
    #[error("command for device {found:?}: expected {expected:?}")]
    OtherDevice {
        /// This device.
        expected: String,
        /// The command's device.
        found: String,
    },
    /// Counter not above the last accepted one.
    #[error("command counter {found}: expected more than {last} (a replayed or reordered command)")]
    Replayed {
        /// The last accepted counter.
        last: u64,
        /// The command's.
        found: u64,
    },
    /// Past its expiry.
    #[error("command expired at {expires_at} (now {now})")]
    Expired {
        /// Its expiry.
        expires_at: u64,
        /// Now.
        now: u64,
    },
}

/// Verifies a command payload for `device` against `root`'s command keys, its expiry and the
/// last accepted counter; returns the command and the keys that signed it.
///
/// # Errors
/// [`CommandError`] naming what was expected and what was found.
pub fn verify_command(
    payload: &[u8],
    root: &TrustRoot,
    device: &str,
    last_counter: u64,
    now: u64,
) -> Result<(Command, Vec<KeyId>), CommandError> {
    let signed: SignedCommand = decode(payload, "signed command")?;
    let (trusted, threshold) = root.trusted(KeyRole::Commands, now);
    let by = signed::check_threshold(
        &command_message(&signed.command),
        &signed.signatures,
        &trusted,
        KeyRole::Commands,
        threshold,
    )
    .map_err(|f| CommandError::Signatures {
        valid: f.valid,
        threshold: f.threshold,
        signers: f.signers,
        trusted: f.trusted,
    })?;
    let command: Command =
        postcard::from_bytes(&signed.command).map_err(|e| WireError::Malformed {
            what: "command",
            detail: e.to_string(),
        })?;
    if command.device_id != device {
        return Err(CommandError::OtherDevice {
            expected: device.to_owned(),
            found: command.device_id.to_string(),
        });
    }
    if now > command.expires_at {
        return Err(CommandError::Expired {
            expires_at: command.expires_at,
            now,
        });
    }
    if command.counter <= last_counter {
        return Err(CommandError::Replayed {
            last: last_counter,
            found: command.counter,
        });
    }
    Ok((command, by))
}

/// Encodes a message: the format byte, then postcard.
#[must_use]
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising plain structs into a Vec cannot fail.
    postcard::to_extend(message, vec![WIRE_FORMAT_VERSION]).unwrap_or_default()
}

/// Decodes a message of at most [`MAX_MESSAGE_BYTES`]; `what` names it in errors.
///
/// # Errors
/// [`WireError`]: too large, wrong format byte, malformed, trailing bytes.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &'static str) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge {
            found: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    match bytes.first() {
        Some(&WIRE_FORMAT_VERSION) => {}
        found => {
            return Err(WireError::Format {
                found: found.copied(),
            });
        }
    }
    let (value, rest) =
        postcard::take_from_bytes(&bytes[1..]).map_err(|e| WireError::Malformed {
            what,
            detail: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(WireError::Malformed {
            what,
            detail: format!("{} bytes after the message: expected none", rest.len()),
        });
    }
    Ok(value)
}

/// Decodes a report message and the report inside it (checked to name the same run).
///
/// # Errors
/// [`WireError`].
pub fn decode_report(bytes: &[u8]) -> Result<(ReportMessage, crate::report::Report), WireError> {
    let m: ReportMessage = decode(bytes, "report message")?;
    let report: crate::report::Report =
        serde_json::from_str(&m.report_json).map_err(|e| WireError::Malformed {
            what: "report",
            detail: e.to_string(),
        })?;
    if report.run_id != m.run_id {
        return Err(WireError::Malformed {
            what: "report",
            detail: format!(
                "run_id {:?} inside, {:?} outside: expected the same",
                report.run_id, m.run_id
            ),
        });
    }
    // The ids a learner stores, counts and prints: the same rules as the compiler's and the
    // follower's (a hostile device wrote `../../etc/passwd` and terminal escapes here).
    let bad = |detail: String| WireError::Malformed {
        what: "report",
        detail,
    };
    // Run ids: the topic-level rule (followers write UUIDs; simulators and tests other safe
    // names), so no path separators, wildcards, control or bidi characters.
    check_name("run id", &report.run_id)?;
    report
        .trace_id
        .parse::<TraceId>()
        .map_err(|e| bad(e.to_string()))?;
    report
        .trace_version
        .parse::<Version>()
        .map_err(|e| bad(e.to_string()))?;
    Ok((m, report))
}

/// The id and version of a signed trace pushed on a trace topic, without verifying it (the
/// device verifies through its install path; this is for acks of refused pushes).
#[must_use]
pub fn pushed_trace_version(bytes: &[u8]) -> Option<(TraceId, Version)> {
    signed::decode_signed(bytes)
        .ok()
        .map(|s| (s.header.trace_id, s.header.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_goal_with_no_trace_is_read_back_from_its_escalation_reason() {
        for goal in [
            "reboot the reactor",
            "quote \" and \\ and \u{1b} and ünïcode",
            "",
        ] {
            let reason = no_trace_for_goal(goal);
            assert!(reason.starts_with(NO_TRACE_FOR_GOAL));
            assert_eq!(unmatched_goal(&reason).as_deref(), Some(goal));
        }
        assert_eq!(unmatched_goal("the agent could not start a run"), None);
        assert_eq!(
            unmatched_goal("no installed trace matches the goal not json"),
            None
        );
    }

    #[test]
    fn topics_round_trip_and_refuse_wildcards_and_escapes() {
        for t in [
            Topic::Heartbeat("pi-01".into()),
            Topic::Reports("pi-01".into()),
            Topic::Acks("pi-01".into()),
            Topic::Escalations("pi-01".into()),
            Topic::Status("pi-01".into()),
            Topic::Commands("pi-01".into()),
            Topic::FleetTrace("dpkg-log-triage".into()),
            Topic::GroupTrace("canary".into(), "dpkg-log-triage".into()),
            Topic::DeviceTrace("pi-01".into(), "dpkg-log-triage".into()),
        ] {
            assert_eq!(Topic::parse(&t.name()), Ok(t.clone()));
        }
        for bad in [
            "tracefleet/v1/devices/+/reports",
            "tracefleet/v1/devices/#",
            "tracefleet/v1/devices/a/b/reports",
            "tracefleet/v1/devices/../reports",
            "tracefleet/v2/devices/a/reports",
            "tracefleet/v1/devices/a/other",
            "tracefleet/v1/groups/g/traces/",
            "tracefleet/v1/devices/a/traces/+",
            "tracefleet/v1/devices/a/traces/t/x",
            "",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
        assert!(check_name("device id", &"x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn decode_checks_format_byte_size_and_trailing_bytes() {
        let s = Status {
            online: true,
            at: 7,
        };
        let bytes = encode(&s);
        assert_eq!(decode::<Status>(&bytes, "status"), Ok(s));
        assert_eq!(
            decode::<Status>(&[], "status"),
            Err(WireError::Format { found: None })
        );
        let mut wrong = bytes.clone();
        wrong[0] = 9;
        assert_eq!(
            decode::<Status>(&wrong, "status"),
            Err(WireError::Format { found: Some(9) })
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<Status>(&trailing, "status"),
            Err(WireError::Malformed { detail, .. }) if detail.contains("after the message")
        ));
        assert!(matches!(
            decode::<Status>(&vec![1u8; MAX_MESSAGE_BYTES + 1], "status"),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn heartbeats_are_read_with_and_without_a_recipient() {
        let id = crate::confidential::Identity::generate();
        let hb = Heartbeat {
            device_id: "pi-01".parse().unwrap(),
            sent_at: 7,
            follower_version: "0.1.0".into(),
            groups: vec!["lab".into()],
            installed: vec![],
            running: vec![],
            telemetry: Telemetry::default(),
            recipient: Some(id.recipient().to_string()),
        };
        assert_eq!(decode_heartbeat(&encode(&hb)), Ok(hb.clone()));
        // What an older follower sends: the same fields without the recipient.
        let old = encode(&(
            &hb.device_id,
            hb.sent_at,
            &hb.follower_version,
            &hb.groups,
            &hb.installed,
            &hb.running,
            &hb.telemetry,
        ));
        let read = decode_heartbeat(&old).unwrap();
        assert_eq!(read.recipient, None);
        assert_eq!(read.groups, hb.groups);
        let mut bad = hb.clone();
        bad.recipient = Some("age1nope".into());
        assert!(matches!(
            decode_heartbeat(&encode(&bad)),
            Err(WireError::Malformed { detail, .. }) if detail.contains("expected an age X25519 recipient")
        ));
        let mut trailing = encode(&hb);
        trailing.push(0);
        assert!(decode_heartbeat(&trailing).is_err());
    }

    fn root_with_command_key(key: &SecretKey) -> TrustRoot {
        use crate::trust::{RoleKey, RoleKeys};
        let rk = |k: &SecretKey| RoleKeys {
            threshold: 1,
            keys: vec![RoleKey {
                public_key: k.public().to_bytes(),
                expires_at: u64::MAX,
            }],
        };
        let other = SecretKey::from_seed(KeyRole::Root, [9; 32]);
        let traces = SecretKey::from_seed(KeyRole::Traces, [8; 32]);
        TrustRoot {
            version: 1,
            created_at: 0,
            expires_at: u64::MAX,
            root: rk(&other),
            traces: rk(&traces),
            commands: rk(key),
        }
    }

    #[test]
    fn commands_verify_once_for_their_device_until_they_expire() {
        let key = SecretKey::from_seed(KeyRole::Commands, [3; 32]);
        let root = root_with_command_key(&key);
        let command = Command {
            device_id: "pi-01".parse().unwrap(),
            counter: 5,
            issued_at: 100,
            expires_at: 200,
            action: Action::Stop(None),
        };
        let payload = encode(&sign_command(&command, &[&key]));
        let (c, by) = verify_command(&payload, &root, "pi-01", 4, 150).unwrap();
        assert_eq!((c, by), (command, vec![key.public().key_id()]));
        assert!(matches!(
            verify_command(&payload, &root, "pi-01", 5, 150),
            Err(CommandError::Replayed { last: 5, found: 5 })
        ));
        assert!(matches!(
            verify_command(&payload, &root, "pi-02", 0, 150),
            Err(CommandError::OtherDevice { .. })
        ));
        assert!(matches!(
            verify_command(&payload, &root, "pi-01", 0, 201),
            Err(CommandError::Expired { .. })
        ));
        // A trace key cannot sign commands; a changed command breaks the signature.
        let traces = SecretKey::from_seed(KeyRole::Traces, [8; 32]);
        let forged = encode(&sign_command(
            &Command {
                counter: 6,
                ..verify_command(&payload, &root, "pi-01", 0, 150).unwrap().0
            },
            &[&traces],
        ));
        assert!(matches!(
            verify_command(&forged, &root, "pi-01", 0, 150),
            Err(CommandError::Signatures { valid: 0, .. })
        ));
        let mut signed: SignedCommand = decode(&payload, "signed command").unwrap();
        signed.command = postcard::to_allocvec(&Command {
            counter: 99,
            ..verify_command(&payload, &root, "pi-01", 0, 150).unwrap().0
        })
        .unwrap();
        assert!(matches!(
            verify_command(&encode(&signed), &root, "pi-01", 0, 150),
            Err(CommandError::Signatures { valid: 0, .. })
        ));
    }
}
