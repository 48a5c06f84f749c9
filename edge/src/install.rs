//! Installing what arrives from outside: signed traces and bundles.
//!
//! A signed trace ([`install_signed`], used by `follower install` and by the agent for pushed
//! traces) is verified against the device's trust root and written in one transaction that
//! refuses a version not above the installed one.
//!
//! A bundle is streamed: its header is verified first (trust-root updates it carries, then the
//! manifest's signatures, expiry and freeze rule), then every entry is copied into a staging
//! directory beside the store while it is hashed, and checked against the manifest. Only when
//! every entry is verified are models moved into place and the trust roots and traces written
//! to the store in one SQLite transaction: after a crash at any point the device holds the old
//! state or the new one, never a mix. The staging directory is removed on every path.

use crate::store::{Store, StoreError};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use tracefleet::bundle::{self, BundleError, EntryKind};
use tracefleet::ids::Version;
use tracefleet::signed;
use tracefleet::trust::{self, TrustError};

/// Why an install was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// The bundle's format, signatures, expiry or contents.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A trust-root update inside the bundle.
    #[error("trust-root update in the bundle: {0}")]
    Trust(#[from] TrustError),
    /// A signed trace inside the bundle.
    #[error("{name}: {source}")]
    Trace {
        /// The entry.
        name: String,
        /// Why.
        source: signed::VerifyError,
    },
    /// The device store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The device's identity, needed for a confidential trace.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The device has no trust root.
    #[error("this device has no trust root yet (run `follower trust init ROOT.tfr`)")]
    NoRoot,
    /// A signed trace larger than a signed trace may be.
    #[error("{size} bytes: expected at most {max} for a signed trace", max = signed::MAX_SIGNED_BYTES)]
    TooLarge {
        /// Its size in bytes.
        size: usize,
    },
    /// A signed trace's verification.
    #[error(transparent)]
    Signed(#[from] signed::VerifyError),
    /// A signed trace for another trace id than the one expected (a pushed trace on the
    /// topic of another).
    #[error("trace {found} published on the topic of {expected}: expected the same id")]
    WrongTrace {
        /// The expected id.
        expected: String,
        /// The signed trace's id.
        found: String,
    },
    /// Reading or staging files.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let what = what.into();
    move |source| InstallError::Io { what, source }
}

/// What a bundle install changed.
#[derive(Debug, Default)]
pub struct Installed {
    /// Trust-root versions applied.
    pub roots: Vec<u32>,
    /// Traces installed.
    pub traces: Vec<(String, Version)>,
    /// Model files placed in `<state-dir>/models/`.
    pub models: Vec<String>,
    /// Confidential traces left out because this device is not one of their recipients
    /// (entry name, why).
    pub skipped: Vec<(String, String)>,
}

/// A signed trace installed by [`install_signed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedInstalled {
    /// Its id.
    pub trace_id: String,
    /// Its version.
    pub version: Version,
    /// The trust-root version it was verified against.
    pub root_version: u32,
    /// Whether it has judgement steps with scored reference examples (whose fidelity the
    /// device measures: [`tracefleet::Trace::judged_steps`]).
    pub judged: bool,
}

/// Why [`install_signed`] installed nothing, and which trace it was when the refusal came
/// after verification (the store refused it: not above the installed version, or SQLite).
#[derive(Debug)]
pub struct SignedRefused {
    /// The verified trace's id; `None` when it was refused before or by verification.
    pub trace_id: Option<String>,
    /// Why.
    pub error: InstallError,
}

/// Verifies a signed trace against the device's trust root (signatures, content hash,
/// expiry; the trace id must be `expect_id` when given) and installs it. The version check
/// and the write are one transaction: a version not above the installed one is refused with
/// [`StoreError::Rollback`] (inside [`InstallError::Store`]) and nothing changes.
///
/// # Errors
/// [`SignedRefused`]; nothing is installed then. Recording the refusal is the caller's.
#[allow(clippy::result_large_err)] // a refusal is rare; its error is moved once
pub fn install_signed(
    store: &mut Store,
    bytes: &[u8],
    expect_id: Option<&str>,
    now: u64,
    now_text: &str,
) -> Result<SignedInstalled, SignedRefused> {
    let unverified = |error: InstallError| SignedRefused {
        trace_id: None,
        error,
    };
    if bytes.len() > signed::MAX_SIGNED_BYTES {
        return Err(unverified(InstallError::TooLarge { size: bytes.len() }));
    }
    let (root, _) = store
        .trust_root()
        .map_err(|e| unverified(e.into()))?
        .ok_or_else(|| unverified(InstallError::NoRoot))?;
    let identity =
        crate::identity::for_trace(store.state_dir(), bytes).map_err(|e| unverified(e.into()))?;
    let v = trust::verify_with_root(bytes, &root, now, identity.as_ref())
        .map_err(|e| unverified(e.into()))?;
    let trace_id = v.trace.id.to_string();
    if let Some(expected) = expect_id
        && trace_id != expected
    {
        return Err(unverified(InstallError::WrongTrace {
            expected: expected.to_owned(),
            found: trace_id,
        }));
    }
    let version = v.trace.version;
    let judged = v.trace.judged_steps().next().is_some();
    match store.install_trace(Some(root.version), &trace_id, version, bytes, now_text) {
        Ok(()) => Ok(SignedInstalled {
            trace_id,
            version,
            root_version: root.version,
            judged,
        }),
        Err(e) => Err(SignedRefused {
            trace_id: Some(trace_id),
            error: e.into(),
        }),
    }
}

/// Removes the staging directory whatever happens.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Verifies and installs a bundle. `progress(done, total)` is called as entry bytes are
/// copied.
///
/// # Errors
/// See [`InstallError`]; nothing is installed then.
pub fn install_bundle(
    store: &mut Store,
    state_dir: &Path,
    file: &Path,
    now: u64,
    now_text: &str,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Installed, InstallError> {
    let shown = file.display().to_string();
    let f = std::fs::File::open(file).map_err(io(format!("cannot open {shown}")))?;
    let file_len = f
        .metadata()
        .map_err(io(format!("cannot stat {shown}")))?
        .len();
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let (header, manifest, header_len) = bundle::read_header(&mut r)?;

    // Trust-root updates first: the manifest is verified by the newest root.
    let (current, _) = store.trust_root()?.ok_or(InstallError::NoRoot)?;
    let base = Some(current.version);
    let slices: Vec<&[u8]> = header.roots.iter().map(Vec::as_slice).collect();
    let chain = if slices.is_empty() {
        Vec::new()
    } else {
        trust::verify_chain(&current, &slices, now)?
    };
    let root = chain.last().map_or(current, |(r, _)| r.clone());
    bundle::verify_manifest(&header, &manifest, &root, now)?;

    // The sizes must add up to the file: fewer bytes is a truncated bundle, more is data the
    // manifest does not vouch for.
    let payload: u64 = manifest.entries.iter().map(|e| e.size).sum();
    if header_len + payload != file_len {
        let detail = if header_len + payload > file_len {
            format!(
                "truncated: the manifest lists {payload} bytes of entries, the file holds {}",
                file_len.saturating_sub(header_len)
            )
        } else {
            format!(
                "{} bytes after the last entry: expected none",
                file_len - header_len - payload
            )
        };
        return Err(BundleError::Format(detail).into());
    }

    // Staging left behind by an install that was killed is garbage: nothing points at it.
    // Only directories older than an hour go, so a concurrent install keeps its own.
    remove_stale(&state_dir.join("staging"));
    let staging_dir = state_dir
        .join("staging")
        .join(uuid::Uuid::now_v7().simple().to_string());
    std::fs::create_dir_all(&staging_dir)
        .map_err(io(format!("cannot create {}", staging_dir.display())))?;
    let staging = Staging(staging_dir);
    let mut done = 0u64;
    let mut traces = Vec::new();
    let mut skipped = Vec::new();
    let mut models = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for entry in &manifest.entries {
        let path = staging.0.join(entry.name.as_str());
        let mut out =
            std::fs::File::create(&path).map_err(io(format!("cannot stage {}", entry.name)))?;
        let mut hasher = Sha256::new();
        let mut left = entry.size;
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = r
                .read(&mut buf[..want])
                .map_err(io(format!("reading {shown}")))?;
            if n == 0 {
                return Err(BundleError::Entry {
                    name: entry.name.to_string(),
                    detail: format!("truncated: {left} of {} bytes missing", entry.size),
                }
                .into());
            }
            hasher.update(&buf[..n]);
            std::io::Write::write_all(&mut out, &buf[..n])
                .map_err(io(format!("staging {}", entry.name)))?;
            left -= n as u64;
            done += n as u64;
            progress(done, payload);
        }
        out.sync_all()
            .map_err(io(format!("staging {}", entry.name)))?;
        let digest: [u8; 32] = hasher.finalize().into();
        if digest != entry.sha256 {
            return Err(BundleError::Entry {
                name: entry.name.to_string(),
                detail: format!("sha256 {} does not match the manifest's {} (tampered or mixed with another bundle)", hex::encode(digest), hex::encode(entry.sha256)),
            }
            .into());
        }
        match entry.kind {
            EntryKind::Trace => {
                let bytes =
                    std::fs::read(&path).map_err(io(format!("reading staged {}", entry.name)))?;
                // A damaged identity file leaves out the confidential traces only.
                let identity = match crate::identity::for_trace(store.state_dir(), &bytes) {
                    Ok(identity) => identity,
                    Err(e) => {
                        skipped.push((entry.name.to_string(), e.to_string()));
                        continue;
                    }
                };
                match trust::verify_with_root(&bytes, &root, now, identity.as_ref()) {
                    Ok(v) => traces.push((v.trace.id.to_string(), v.trace.version, bytes)),
                    // One bundle may carry confidential traces for several sets of devices:
                    // one not meant for this device is left out, not a reason to refuse the
                    // others (its signatures and expiry were checked before decryption).
                    Err(
                        e @ (signed::VerifyError::NoIdentity { .. }
                        | signed::VerifyError::Confidential {
                            source:
                                tracefleet::confidential::ConfidentialError::NotARecipient { .. },
                            ..
                        }),
                    ) => skipped.push((entry.name.to_string(), e.to_string())),
                    Err(source) => {
                        return Err(InstallError::Trace {
                            name: entry.name.to_string(),
                            source,
                        });
                    }
                }
            }
            EntryKind::Model => {
                crate::models::check_file(&path).map_err(|e| BundleError::Entry {
                    name: entry.name.to_string(),
                    detail: e.to_string(),
                })?;
                models.push((entry.name.to_string(), path, hex::encode(entry.sha256)));
            }
        }
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra).map_err(io(format!("reading {shown}")))? != 0 {
        return Err(BundleError::Format("bytes after the last entry: expected none".into()).into());
    }

    // Everything verified. In one transaction: re-check the root, check every version, write
    // the rows, place the models, commit. A refused bundle places no model.
    let models_dir = state_dir.join("models");
    let roots: Vec<(u32, &[u8])> = chain.iter().map(|(r, b)| (r.version, *b)).collect();
    let rows: Vec<(&str, Version, &[u8])> = traces
        .iter()
        .map(|(id, v, b)| (id.as_str(), *v, b.as_slice()))
        .collect();
    let mut place_models = || -> Result<(), StoreError> {
        std::fs::create_dir_all(&models_dir).map_err(|e| {
            StoreError::Files(format!("cannot create {}: {e}", models_dir.display()))
        })?;
        for (name, path, _) in &models {
            std::fs::rename(path, models_dir.join(name))
                .map_err(|e| StoreError::Files(format!("cannot place model {name}: {e}")))?;
        }
        if let Ok(dir) = std::fs::File::open(&models_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    };
    store.install_all(base, &roots, &rows, now_text, &mut place_models)?;
    // The placed models join the device's registry (`follower models list`).
    for (name, _, sha256) in &models {
        crate::models::register_placed(store, state_dir, name, sha256.clone(), now_text).map_err(
            |e| StoreError::Files(format!("model {name} placed but not registered: {e}")),
        )?;
    }
    Ok(Installed {
        roots: roots.iter().map(|(v, _)| *v).collect(),
        traces: traces.into_iter().map(|(id, v, _)| (id, v)).collect(),
        models: models.into_iter().map(|(n, _, _)| n).collect(),
        skipped,
    })
}

/// Removes staging directories not modified for an hour.
fn remove_stale(staging: &Path) {
    let Ok(entries) = std::fs::read_dir(staging) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{NOW, key, signed_trace, store_with_root, traces_key};
    use tracefleet::signed::KeyRole;

    const AT: &str = "2026-01-01T00:00:00Z";

    /// What the store holds of installed traces: (id, version, signed bytes).
    fn installed(store: &Store) -> Vec<(String, Version, Vec<u8>)> {
        store.installed_traces().unwrap()
    }

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    /// A store with the test root and trace `t` `version` installed, and its signed bytes.
    fn with_t(version: &str) -> (tempfile::TempDir, Store, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_root(dir.path());
        let bytes = signed_trace("t", version, &traces_key());
        let got = install_signed(&mut store, &bytes, Some("t"), NOW, AT).unwrap();
        assert_eq!(got.version, v(version));
        (dir, store, bytes)
    }

    #[test]
    fn a_validly_signed_trace_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_root(dir.path());
        let bytes = signed_trace("t", "1.0.0", &traces_key());
        let got = install_signed(&mut store, &bytes, Some("t"), NOW, AT).unwrap();
        assert_eq!(
            got,
            SignedInstalled {
                trace_id: "t".into(),
                version: v("1.0.0"),
                root_version: 1,
                // The test trace has no judgement step.
                judged: false,
            }
        );
        assert_eq!(installed(&store), [("t".into(), v("1.0.0"), bytes.clone())]);
        // Without an expected id (`follower install FILE`) as well.
        let newer = signed_trace("t", "1.0.1", &traces_key());
        install_signed(&mut store, &newer, None, NOW, AT).unwrap();
        assert_eq!(store.installed_signed("t").unwrap().unwrap(), newer);
    }

    #[test]
    fn a_tampered_trace_is_refused_and_the_store_is_unchanged() {
        let (_dir, mut store, good) = with_t("1.0.0");
        let before = installed(&store);

        // The version raised after signing: the signature no longer covers the header.
        let mut s = signed::decode_signed(&signed_trace("t", "1.0.1", &traces_key())).unwrap();
        s.header.version = v("9.0.0");
        let raised = signed::encode_signed(&s);
        // The compiled bytes changed after signing: the content hash no longer matches.
        let mut s = signed::decode_signed(&signed_trace("t", "1.0.2", &traces_key())).unwrap();
        let last = s.compiled.len() - 1;
        s.compiled[last] ^= 1;
        let edited = signed::encode_signed(&s);
        // Signed by a key the root does not trust.
        let stranger = signed_trace("t", "1.0.3", &key(KeyRole::Traces, 9));
        // Not a signed trace at all.
        let mut cut = good.clone();
        cut.truncate(good.len() / 2);

        for (what, bytes) in [
            ("raised", raised),
            ("edited", edited),
            ("stranger", stranger),
            ("cut", cut),
        ] {
            let refused = install_signed(&mut store, &bytes, Some("t"), NOW, AT).unwrap_err();
            assert!(refused.trace_id.is_none(), "{what}: refused before install");
            assert!(
                matches!(refused.error, InstallError::Signed(_)),
                "{what}: {}",
                refused.error
            );
            assert_eq!(installed(&store), before, "{what}");
        }
    }

    #[test]
    fn a_downgrade_or_the_same_version_is_refused_and_the_store_is_unchanged() {
        let (_dir, mut store, current) = with_t("1.1.0");
        for older in ["1.0.9", "1.1.0"] {
            let bytes = signed_trace("t", older, &traces_key());
            let refused = install_signed(&mut store, &bytes, Some("t"), NOW, AT).unwrap_err();
            assert_eq!(
                refused.trace_id.as_deref(),
                Some("t"),
                "verified, then refused"
            );
            match refused.error {
                InstallError::Store(StoreError::Rollback {
                    installed, offered, ..
                }) => assert_eq!((installed, offered), (v("1.1.0"), v(older))),
                other => panic!("{older}: {other}"),
            }
            assert_eq!(
                installed(&store),
                [("t".into(), v("1.1.0"), current.clone())]
            );
        }
    }

    #[test]
    fn refusals_before_verification() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = signed_trace("t", "1.0.0", &traces_key());
        // No trust root yet.
        let mut bare = Store::open(&dir.path().join("bare")).unwrap();
        let e = install_signed(&mut bare, &bytes, None, NOW, AT).unwrap_err();
        assert!(matches!(e.error, InstallError::NoRoot), "{}", e.error);

        let mut store = store_with_root(&dir.path().join("rooted"));
        // Pushed on the topic of another trace.
        let e = install_signed(&mut store, &bytes, Some("other"), NOW, AT).unwrap_err();
        assert!(
            matches!(&e.error, InstallError::WrongTrace { expected, found } if expected == "other" && found == "t"),
            "{}",
            e.error
        );
        // Too large to be a signed trace: refused before it is read.
        let huge = vec![0u8; signed::MAX_SIGNED_BYTES + 1];
        let e = install_signed(&mut store, &huge, None, NOW, AT).unwrap_err();
        assert!(
            matches!(e.error, InstallError::TooLarge { .. }),
            "{}",
            e.error
        );
        // Past the root's expiry.
        let e = install_signed(&mut store, &bytes, None, crate::testkit::EXPIRES, AT).unwrap_err();
        assert!(matches!(e.error, InstallError::Signed(_)), "{}", e.error);
        assert!(store.installed_traces().unwrap().is_empty());
    }
}
