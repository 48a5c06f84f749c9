//! The learner's audit log: an append-only, hash-chained and signed record of every action
//! that changes what devices trust or run (keys, trust roots, signatures, bundles, rollouts,
//! commands, regenerations).
//!
//! Details hold strings, integers and lists, never floats (JSON need not give a float back bit
//! for bit, and the signature covers the re-encoded record).
//!
//! # Format
//! `DIR/audit.jsonl`, JSON Lines: one entry a line, fields in this order —
//! `seq` (1, 2, … without gaps), `time` (Unix seconds), `actor` (`user@host`, or
//! `learner serve CLIENT_ID as user@host` for what `serve` does by itself), `action` (`sign`, `rollout start`,
//! …), `subject` (what it acted on, e.g. `dpkg-log-triage 1.1.0`), `detail` (a JSON object),
//! `prev` (SHA-256 in hex of the previous line's bytes; 64 zeros for the first entry), `key`
//! (the audit public key, 32 bytes in hex) and `sig` (the ed25519 signature, RFC 8032, in
//! hex, over [`DOMAIN`] followed by the line's JSON without `sig`). A line must be exactly
//! the compact JSON encoding of its entry in that field order (objects in `detail` with
//! sorted keys): any other spelling of the same content is refused as altered. The chain follows
//! Schneier and Kelsey, "Secure audit logs to support computer forensics" (1999), and
//! Certificate Transparency's append-only log (RFC 6962) in spirit; it is a plain chain, not
//! a Merkle tree.
//!
//! # Keys
//! The audit key is an ed25519 key of role `audit` ([`KeyRole::Audit`]): `DIR/audit.key`
//! (0600), created on first use, and its public half `DIR/audit.key.pub`. Devices never trust
//! it. Pin the public key somewhere the learner machine cannot write (`verify --key`): whoever
//! holds the secret key can rewrite the whole log.
//!
//! # What verification finds
//! [`verify`] names the first entry that was altered (its signature fails, or its bytes differ
//! from what the next entry chained to), removed (a gap in `seq`) or moved (an entry out of
//! order). Cutting entries off the end leaves a shorter valid chain: [`Head`] — a `seq` and the
//! SHA-256 of its line, printed by `learner audit verify` — recorded elsewhere and given back
//! (`--head`) catches that.
//!
//! # Concurrency and crashes
//! Appends take an exclusive `flock(2)` on the log, read its last line, and write the new
//! line with one `write(2)` on an `O_APPEND` descriptor, then `fsync`. A last line without its
//! newline (power lost during a write) stops further appends until an operator looks.

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use tracefleet::signed::{KeyRole, SecretKey};

/// The domain tag in front of every signed entry, so that an audit signature can never be
/// taken for a signature of anything else.
pub const DOMAIN: &[u8] = b"tracefleet-audit-v1\n";

/// The log file in an audit directory.
pub const LOG_FILE: &str = "audit.jsonl";

/// The secret audit key in an audit directory.
pub const KEY_FILE: &str = "audit.key";

/// The longest line an append writes (the entry with its signature); longer details are
/// refused so that reading the last line stays bounded.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// `prev` of the first entry.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry without its signature: what the signature covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the log, from 1.
    pub seq: u64,
    /// When, in Unix seconds.
    pub time: u64,
    /// Who: `user@host`.
    pub actor: String,
    /// What was done, e.g. `sign`, `rollout abort`.
    pub action: String,
    /// What it was done to, e.g. `dpkg-log-triage 1.1.0`.
    pub subject: String,
    /// Particulars (a JSON object).
    pub detail: serde_json::Value,
    /// SHA-256 (hex) of the previous line's bytes.
    pub prev: String,
    /// The audit public key (hex).
    pub key: String,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// What is signed.
    #[serde(flatten)]
    pub record: Record,
    /// The ed25519 signature (hex) over [`DOMAIN`] ‖ the record's JSON.
    pub sig: String,
}

/// An entry's position and line hash, to be recorded outside the learner machine and
/// checked later (catches entries cut off the end). Written `SEQ:SHA256HEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The entry's `seq`.
    pub seq: u64,
    /// SHA-256 (hex) of its line.
    pub hash: String,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl std::str::FromStr for Head {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = s.split_once(':').ok_or_else(|| {
            format!("{s:?}: expected SEQ:SHA256 (as `learner audit verify` prints)")
        })?;
        let seq: u64 = seq
            .parse()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| format!("{seq:?}: expected the entry number (from 1) before ':'"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash:?}: expected 64 hex digits after ':'"));
        }
        Ok(Head {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// What [`verify`] found in an intact log.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The entries, in order.
    pub entries: Vec<Entry>,
    /// The last entry's head (`None` for an empty log).
    pub head: Option<Head>,
    /// The audit public key every entry is signed with (hex; `None` for an empty log).
    pub key: Option<String>,
}

/// The first thing wrong with a log: which entry, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {entry}: {problem}")]
pub struct Broken {
    /// The entry named: its expected `seq` (= its line number when intact).
    pub entry: u64,
    /// What is wrong with it.
    pub problem: String,
}

/// Where a command's audit log lives and who it records as the actor.
#[derive(Debug, Clone)]
pub struct AuditLog {
    dir: PathBuf,
    actor: String,
}

impl AuditLog {
    /// The log in `dir`, recording `actor`.
    pub fn new(dir: PathBuf, actor: String) -> Self {
        Self { dir, actor }
    }

    /// The audit directory: `explicit` (`--audit-dir` / `TRACEFLEET_AUDIT_DIR`), else
    /// `configured` (`[audit] dir` in learner.toml), else `$XDG_STATE_HOME/tracefleet/audit`
    /// (`~/.local/state/tracefleet/audit`).
    ///
    /// # Errors
    /// When none is given and neither `XDG_STATE_HOME` nor `HOME` is set.
    pub fn locate(explicit: Option<&Path>, configured: Option<&Path>) -> Result<PathBuf> {
        if let Some(d) = explicit.or(configured) {
            return Ok(d.to_owned());
        }
        let state = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            Some(s) => PathBuf::from(s),
            None => PathBuf::from(
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .context("no audit directory: expected --audit-dir, TRACEFLEET_AUDIT_DIR, [audit] dir in learner.toml, XDG_STATE_HOME or HOME")?,
            )
            .join(".local/state"),
        };
        Ok(state.join("tracefleet/audit"))
    }

    /// `user@host` of this process (the login name from `USER`, else the uid's passwd entry).
    pub fn this_user() -> String {
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| {
                nix::unistd::User::from_uid(nix::unistd::getuid())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()));
        format!("{user}@{}", host())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Appends an entry, creating the directory (0700), the log and the audit key on first use.
    ///
    /// # Errors
    /// When the directory, key or log cannot be created, read or written; when the log's last
    /// line is not a well-formed entry or lacks its newline; when the entry would exceed
    /// [`MAX_LINE_BYTES`].
    pub fn append(&self, action: &str, subject: &str, detail: serde_json::Value) -> Result<Entry> {
        let path = self.path();
        let ctx = || format!("audit log {}", path.display());
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(ctx)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .with_context(ctx)?;
        let mut file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(ctx)?;
        let last = last_line(&mut file).with_context(ctx)?;
        let key = self.key(last.is_none())?;
        let (seq, prev) = match last {
            None => (1, GENESIS.to_owned()),
            Some(line) => {
                let last: Entry = serde_json::from_slice(&line).with_context(|| {
                    format!(
                        "{}: the last entry is malformed: expected an audit entry (run `learner audit verify`)",
                        path.display()
                    )
                })?;
                let next = last.record.seq.checked_add(1).with_context(|| {
                    format!(
                        "{}: the last entry's seq is {}: expected a count (run `learner audit verify`)",
                        path.display(),
                        last.record.seq
                    )
                })?;
                (next, hex::encode(Sha256::digest(&line)))
            }
        };
        let record = Record {
            seq,
            time: tracefleet::time::unix_now(),
            actor: self.actor.clone(),
            action: action.to_owned(),
            subject: subject.to_owned(),
            detail,
            prev,
            key: hex::encode(key.public().to_bytes()),
        };
        let sig = tracefleet::signed::sign_message(&signed_bytes(&record)?, &key);
        let entry = Entry {
            record,
            sig: hex::encode(sig.signature),
        };
        let mut line = serde_json::to_vec(&entry)?;
        if line.len() > MAX_LINE_BYTES {
            bail!(
                "{}: an entry of {} bytes: expected at most {MAX_LINE_BYTES}",
                path.display(),
                line.len()
            );
        }
        line.push(b'\n');
        file.write_all(&line).with_context(ctx)?;
        file.sync_all().with_context(ctx)?;
        Ok(entry)
    }

    /// The audit key, created on first use (`new_log`): a log with entries whose key is gone
    /// is refused, not given a new key (which would break the chain's one-key rule and
    /// replace the public key operators compare against).
    fn key(&self, new_log: bool) -> Result<SecretKey> {
        let path = self.dir.join(KEY_FILE);
        if !path.exists() {
            if !new_log {
                bail!(
                    "{}: the audit key is missing but {} has entries: expected the key they were signed with (restore it; a new key would not continue this log)",
                    path.display(),
                    self.path().display()
                );
            }
            crate::keys::generate(KeyRole::Audit, &path)?;
        }
        let key = crate::keys::read_secret(&path)?;
        if key.role != KeyRole::Audit {
            bail!(
                "{}: a {} key: expected the audit key (role audit)",
                path.display(),
                key.role
            );
        }
        Ok(key)
    }
}

fn host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".into())
}

/// The bytes an entry's signature covers: [`DOMAIN`] ‖ the record's JSON.
fn signed_bytes(record: &Record) -> Result<Vec<u8>> {
    let mut m = DOMAIN.to_vec();
    serde_json::to_writer(&mut m, record)?;
    Ok(m)
}

/// The last line of `file` without its newline (`None` when empty).
fn last_line(file: &mut std::fs::File) -> Result<Option<Vec<u8>>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    // The last entry, its newline and the one before's newline fit in this window.
    let window = (MAX_LINE_BYTES as u64 + 2).min(len);
    file.seek(SeekFrom::Start(len - window))?;
    let mut tail = Vec::with_capacity(usize::try_from(window)?);
    file.take(window).read_to_end(&mut tail)?;
    let Some(body) = tail.strip_suffix(b"\n") else {
        bail!(
            "the last line has no newline (a write cut short?): expected complete entries; run `learner audit verify`"
        );
    };
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if start == 0 && window < len {
        bail!("the last line is longer than {MAX_LINE_BYTES} bytes: expected an audit entry");
    }
    Ok(Some(body[start..].to_vec()))
}

/// Checks a whole log (the bytes of `audit.jsonl`): every line an entry, `seq` counting from 1
/// without gaps, every signature valid under one key (`pinned`, when given: the key's 32 bytes
/// in hex), every `prev` the hash of the line before, and `head` (when given) present with
/// that hash.
///
/// # Errors
/// [`Broken`] naming the first entry found altered, removed, moved or missing.
pub fn verify(log: &[u8], pinned: Option<&str>, head: Option<&Head>) -> Result<Verified, Broken> {
    let body = match log.strip_suffix(b"\n") {
        Some(b) => b,
        None if log.is_empty() => log,
        None => {
            let n = log.split(|&b| b == b'\n').count() as u64;
            return Err(Broken {
                entry: n,
                problem: "the last line has no newline: a write cut short, or bytes added".into(),
            });
        }
    };
    let lines: Vec<&[u8]> = if body.is_empty() {
        Vec::new()
    } else {
        body.split(|&b| b == b'\n').collect()
    };
    let parsed: Vec<Result<Entry, String>> = lines
        .iter()
        .map(|l| serde_json::from_slice::<Entry>(l).map_err(|e| e.to_string()))
        .collect();
    let mut key: Option<(String, ed25519_dalek::VerifyingKey)> = match pinned {
        Some(hex_key) => Some((
            hex_key.to_ascii_lowercase(),
            parse_key(hex_key).map_err(|problem| Broken { entry: 1, problem })?,
        )),
        None => None,
    };
    let mut entries = Vec::with_capacity(lines.len());
    let mut prev_hash = GENESIS.to_owned();
    for (i, (line, entry)) in lines.iter().zip(&parsed).enumerate() {
        let expected = i as u64 + 1;
        let broken = |problem: String| Broken {
            entry: expected,
            problem,
        };
        let entry = entry.as_ref().map_err(|e| {
            broken(format!(
                "line {expected} is not an audit entry ({e}): expected a JSON object with seq, time, actor, action, subject, detail, prev, key, sig"
            ))
        })?;
        let seq = entry.record.seq;
        if seq != expected {
            let later = parsed[i + 1..]
                .iter()
                .any(|e| e.as_ref().is_ok_and(|e| e.record.seq == expected));
            return Err(broken(if later {
                format!(
                    "was moved: entry {seq} stands in its place (line {expected}) and entry {expected} comes later"
                )
            } else if seq > expected {
                format!("was removed: line {expected} holds entry {seq}")
            } else {
                format!("line {expected} holds entry {seq} again: expected entry {expected}")
            }));
        }
        let (key_hex, verifying) = match &key {
            Some(k) => k.clone(),
            None => {
                let k = parse_key(&entry.record.key).map_err(&broken)?;
                key = Some((entry.record.key.to_ascii_lowercase(), k));
                (entry.record.key.to_ascii_lowercase(), k)
            }
        };
        if entry.record.key.to_ascii_lowercase() != key_hex {
            return Err(broken(format!(
                "is signed by audit key {}: expected {key_hex}{}",
                entry.record.key,
                if pinned.is_some() {
                    " (--key)"
                } else {
                    " (the key of entry 1)"
                }
            )));
        }
        let sig = hex::decode(&entry.sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or_else(|| broken(format!("sig {:?}: expected 128 hex digits", entry.sig)))?;
        let message = signed_bytes(&entry.record).map_err(|e| broken(e.to_string()))?;
        if verifying
            .verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&sig))
            .is_err()
        {
            return Err(broken(
                "was altered: its signature does not verify over its content".into(),
            ));
        }
        // The line must be exactly what was signed, re-encoded: no field added (it would be
        // dropped before the check), no key moved, no space or escape changed — else the
        // last line could be edited with no later entry to chain to it.
        if serde_json::to_vec(entry).ok().as_deref() != Some(*line) {
            return Err(broken(
                "was altered: its line is not the encoding of what was signed (a field added, moved or re-spelled)".into(),
            ));
        }
        if entry.record.prev != prev_hash {
            return Err(Broken {
                entry: expected.saturating_sub(1).max(1),
                problem: if expected == 1 {
                    format!(
                        "prev {}: expected the genesis value (64 zeros): entries before it were removed",
                        entry.record.prev
                    )
                } else {
                    format!(
                        "was altered: its line's SHA-256 is {prev_hash}, but entry {expected} chained to {}",
                        entry.record.prev
                    )
                },
            });
        }
        prev_hash = hex::encode(Sha256::digest(line));
        entries.push(entry.clone());
    }
    let last = entries.last().map(|e| Head {
        seq: e.record.seq,
        hash: prev_hash.clone(),
    });
    if let Some(h) = head {
        let Some(line) = usize::try_from(h.seq)
            .ok()
            .and_then(|s| s.checked_sub(1))
            .and_then(|i| lines.get(i))
        else {
            return Err(Broken {
                entry: h.seq,
                problem: format!(
                    "is missing: the log ends at entry {} but --head {h} was recorded: entries were cut off the end",
                    entries.len()
                ),
            });
        };
        let found = hex::encode(Sha256::digest(line));
        if found != h.hash {
            return Err(Broken {
                entry: h.seq,
                problem: format!(
                    "differs from the recorded head: its line hashes to {found}, --head says {}: the log was rewritten",
                    h.hash
                ),
            });
        }
    }
    Ok(Verified {
        entries,
        head: last,
        key: key.map(|(k, _)| k),
    })
}

fn parse_key(hex_key: &str) -> Result<ed25519_dalek::VerifyingKey, String> {
    hex::decode(hex_key)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| {
            format!("audit key {hex_key:?}: expected an ed25519 public key, 64 hex digits")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log_with(n: usize) -> (tempfile::TempDir, AuditLog) {
        let d = tempfile::tempdir().unwrap();
        let log = AuditLog::new(d.path().join("audit"), "tester@host".into());
        for i in 0..n {
            log.append("sign", &format!("t 1.{i}.0"), json!({ "i": i }))
                .unwrap();
        }
        (d, log)
    }

    fn lines(log: &AuditLog) -> Vec<String> {
        std::fs::read_to_string(log.path())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn join(lines: &[String]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| format!("{l}\n").into_bytes())
            .collect()
    }

    #[test]
    fn appends_chain_and_verify_with_the_created_key() {
        let (_d, log) = log_with(4);
        let bytes = std::fs::read(log.path()).unwrap();
        let v = verify(&bytes, None, None).unwrap();
        assert_eq!(v.entries.len(), 4);
        assert_eq!(v.entries[3].record.seq, 4);
        assert_eq!(v.entries[0].record.prev, GENESIS);
        let head = v.head.clone().unwrap();
        assert_eq!(head.seq, 4);
        verify(&bytes, v.key.as_deref(), Some(&head)).unwrap();
        let key = crate::keys::read_secret(&log.dir().join(KEY_FILE)).unwrap();
        assert_eq!(key.role, KeyRole::Audit);
        assert_eq!(v.key.unwrap(), hex::encode(key.public().to_bytes()));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(log.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn an_altered_entry_is_named() {
        let (_d, log) = log_with(5);
        let mut l = lines(&log);
        l[2] = l[2].replace("t 1.2.0", "t 9.9.9");
        let e = verify(&join(&l), None, None).unwrap_err();
        assert_eq!(e.entry, 3, "{e}");
        assert!(e.problem.contains("altered"), "{e}");
        // Bytes changed but the content the same (a space), or a field added that the
        // signature does not cover: refused as altered, the last line too.
        let mut l = lines(&log);
        l[1] = l[1].replacen(',', ", ", 1);
        let e = verify(&join(&l), None, None).unwrap_err();
        assert_eq!(e.entry, 2, "{e}");
        assert!(e.problem.contains("not the encoding"), "{e}");
        let mut l = lines(&log);
        l[4] = l[4].replacen('{', "{\"approved_by\":\"security\",", 1);
        let e = verify(&join(&l), None, None).unwrap_err();
        assert_eq!(e.entry, 5, "{e}");
        assert!(e.problem.contains("altered"), "{e}");
    }

    #[test]
    fn a_removed_entry_is_named() {
        let (_d, log) = log_with(5);
        let mut l = lines(&log);
        l.remove(1);
        let e = verify(&join(&l), None, None).unwrap_err();
        assert_eq!(e.entry, 2, "{e}");
        assert!(e.problem.contains("removed"), "{e}");
        // The first one removed.
        let mut l = lines(&log);
        l.remove(0);
        assert_eq!(verify(&join(&l), None, None).unwrap_err().entry, 1);
    }

    #[test]
    fn swapped_entries_are_named() {
        let (_d, log) = log_with(5);
        let mut l = lines(&log);
        l.swap(2, 3);
        let e = verify(&join(&l), None, None).unwrap_err();
        assert_eq!(e.entry, 3, "{e}");
        assert!(e.problem.contains("moved"), "{e}");
    }

    #[test]
    fn a_cut_tail_is_caught_only_with_a_recorded_head() {
        let (_d, log) = log_with(5);
        let all = std::fs::read(log.path()).unwrap();
        let head = verify(&all, None, None).unwrap().head.unwrap();
        let mut l = lines(&log);
        l.truncate(3);
        let cut = join(&l);
        assert!(
            verify(&cut, None, None).is_ok(),
            "a shorter chain is valid by itself"
        );
        let e = verify(&cut, None, Some(&head)).unwrap_err();
        assert_eq!(e.entry, 5);
        assert!(e.problem.contains("cut off"), "{e}");
    }

    #[test]
    fn a_log_re_signed_with_another_key_fails_against_the_pinned_key() {
        let (_d, log) = log_with(2);
        let pinned = verify(&std::fs::read(log.path()).unwrap(), None, None)
            .unwrap()
            .key
            .unwrap();
        // An attacker replaces key and log: a valid chain under their key.
        let (_d2, forged) = log_with(3);
        let bytes = std::fs::read(forged.path()).unwrap();
        assert!(verify(&bytes, None, None).is_ok());
        let e = verify(&bytes, Some(&pinned), None).unwrap_err();
        assert_eq!(e.entry, 1);
        assert!(e.problem.contains("--key"), "{e}");
    }

    #[test]
    fn a_torn_last_line_stops_appends_and_verification_names_it() {
        let (_d, log) = log_with(2);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(log.path())
            .unwrap();
        f.write_all(b"{\"seq\":3,").unwrap();
        let err = log.append("sign", "x", json!({})).unwrap_err();
        assert!(format!("{err:#}").contains("no newline"), "{err:#}");
        let e = verify(&std::fs::read(log.path()).unwrap(), None, None).unwrap_err();
        assert_eq!(e.entry, 3);
    }

    #[test]
    fn concurrent_appends_keep_one_chain() {
        let (_d, log) = log_with(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let log = log.clone();
                s.spawn(move || {
                    for i in 0..10 {
                        log.append("command", &format!("dev-{t}"), json!({ "i": i }))
                            .unwrap();
                    }
                });
            }
        });
        let v = verify(&std::fs::read(log.path()).unwrap(), None, None).unwrap();
        assert_eq!(v.entries.len(), 40);
    }

    #[test]
    fn a_log_whose_key_is_gone_is_not_continued_with_a_new_key() {
        let (_d, log) = log_with(2);
        std::fs::remove_file(log.dir().join(KEY_FILE)).unwrap();
        let err = log.append("sign", "x", json!({})).unwrap_err();
        assert!(
            format!("{err:#}").contains("audit key is missing"),
            "{err:#}"
        );
        assert_eq!(lines(&log).len(), 2, "nothing appended");
    }

    #[test]
    fn heads_parse_and_print() {
        let h: Head = format!("7:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(h.to_string(), format!("7:{}", "ab".repeat(32)));
        assert!("7".parse::<Head>().is_err());
        assert!(format!("0:{}", "ab".repeat(32)).parse::<Head>().is_err());
        assert!("x:00".parse::<Head>().is_err());
    }
}
