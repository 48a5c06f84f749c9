//! Authoring what devices trust, from files on the learner's disk: a trust root naming the
//! root, trace-signing and command-signing keys ([`create_root`]), and a USB bundle of signed
//! traces, models and root updates ([`create_bundle`]), both signed. Formats are
//! [`tracefleet::trust`]'s and [`tracefleet::bundle`]'s.

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracefleet::signed::{self, KeyRole, PublicKey, SecretKey};
use tracefleet::trust::{RoleKey, RoleKeys, TrustRoot, sign_root};

use tracefleet::time::unix_now;

/// Reads `path`, refused when it is larger than `limit` bytes.
///
/// # Errors
/// A file that cannot be read, or one over the limit (its size and the limit named).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if meta.len() > limit {
        bail!(
            "{} is {} bytes: expected at most {limit}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A trust root to create: public key files per role, thresholds, validity.
#[derive(Debug, Clone)]
pub struct RootPlan<'a> {
    /// Root version (1 for a new fleet; current + 1 for a rotation).
    pub version: u32,
    /// Validity from now.
    pub expires: Duration,
    /// Root public key files.
    pub root_keys: &'a [PathBuf],
    /// Root signatures needed to accept a later root.
    pub root_threshold: u32,
    /// Trace-signing public key files.
    pub traces_keys: &'a [PathBuf],
    /// Trace signatures a device needs.
    pub traces_threshold: u32,
    /// Command-signing public key files (empty: the trace-signing keys' material).
    pub commands_keys: &'a [PathBuf],
    /// Command signatures a device needs.
    pub commands_threshold: u32,
    /// Secret root key files that sign it.
    pub signers: &'a [PathBuf],
}

/// Creates and signs a trust root; returns it, its file's bytes and how many signatures it
/// carries.
///
/// # Errors
/// A key file that cannot be read or has the wrong role (named), or signing.
pub fn create_root(plan: &RootPlan<'_>) -> Result<(TrustRoot, Vec<u8>, usize)> {
    let RootPlan {
        version,
        expires,
        root_keys,
        root_threshold,
        traces_keys,
        traces_threshold,
        commands_keys,
        commands_threshold,
        signers,
    } = *plan;
    let now = unix_now();
    let expires_at = now.saturating_add(expires.as_secs());
    let role = |files: &[PathBuf], want: KeyRole, threshold: u32| -> Result<RoleKeys> {
        let keys = files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                let k = PublicKey::from_file(&text).with_context(|| format!("{}", f.display()))?;
                if k.role != want {
                    bail!("{}: a {} key: expected a {want} key", f.display(), k.role);
                }
                Ok(RoleKey {
                    public_key: k.to_bytes(),
                    expires_at,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RoleKeys { threshold, keys })
    };
    let commands = if commands_keys.is_empty() {
        // Commands default to the trace-signing keys' material under the commands role.
        let mut r = role(traces_keys, KeyRole::Traces, commands_threshold)?;
        r.threshold = commands_threshold;
        r
    } else {
        role(commands_keys, KeyRole::Commands, commands_threshold)?
    };
    let root = TrustRoot {
        version,
        created_at: now,
        expires_at,
        root: role(root_keys, KeyRole::Root, root_threshold)?,
        traces: role(traces_keys, KeyRole::Traces, traces_threshold)?,
        commands,
    };
    let secrets = signers
        .iter()
        .map(|f| crate::keys::read_secret(f))
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&SecretKey> = secrets.iter().collect();
    let bytes = sign_root(&root, &refs)?;
    Ok((root, bytes, refs.len()))
}

/// Packs signed traces, models and root updates into one signed bundle file at `output`
/// (written beside it as `.part`, synced, then renamed), valid for `expires` but never
/// beyond the trust root devices verify it with.
///
/// # Errors
/// An input that cannot be read or is not what it should be (named), a bundle that would
/// outlive its trust root, or writing.
pub fn create_bundle(
    output: &Path,
    signed_files: &[PathBuf],
    models: &[PathBuf],
    roots: &[PathBuf],
    trust_root: &Path,
    key_files: &[PathBuf],
    expires: Duration,
) -> Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    use tracefleet::bundle::{EntryKind, EntryName, Manifest, ManifestEntry};
    let secrets = crate::keys::read_trace_keys(key_files)?;
    let refs: Vec<&SecretKey> = secrets.iter().collect();
    let root_bytes = read_limited(trust_root, tracefleet::trust::MAX_ROOT_BYTES as u64)?;
    let (_, root) = tracefleet::trust::decode_root(&root_bytes)
        .with_context(|| format!("{}", trust_root.display()))?;
    let now = unix_now();
    let expires_at = now.saturating_add(expires.as_secs());
    if expires_at > root.expires_at {
        bail!(
            "the bundle would expire after trust root v{} (in {} s): a bundle must not outlive its metadata; pass a shorter --expires",
            root.version,
            root.expires_at.saturating_sub(now)
        );
    }
    // (file, kind, entry name)
    let mut items: Vec<(PathBuf, EntryKind, String)> = Vec::new();
    for f in signed_files {
        let bytes = read_limited(f, signed::MAX_SIGNED_BYTES as u64)?;
        let s = signed::decode_signed(&bytes).with_context(|| format!("{}", f.display()))?;
        items.push((
            f.clone(),
            EntryKind::Trace,
            format!("{}-{}.tfs", s.header.trace_id, s.header.version),
        ));
    }
    for m in models {
        // A device refuses a model that is not a complete GGUF file: say so here instead.
        tracefleet::gguf::read_file(m).map_err(|e| anyhow!("model {}: {e}", m.display()))?;
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        items.push((m.clone(), EntryKind::Model, name));
    }
    let mut entries = Vec::new();
    for (path, kind, name) in &items {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut h = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            size += n as u64;
        }
        entries.push(ManifestEntry {
            name: EntryName::try_from(name.clone())?,
            kind: *kind,
            size,
            sha256: h.finalize().into(),
        });
    }
    let root_files = roots
        .iter()
        .map(|r| read_limited(r, tracefleet::trust::MAX_ROOT_BYTES as u64))
        .collect::<Result<Vec<_>>>()?;
    let manifest = Manifest {
        created_at: now,
        expires_at,
        entries,
    };
    let header = tracefleet::bundle::encode_header(root_files, &manifest, &refs)?;
    let tmp = output.with_extension("part");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    out.write_all(&header)?;
    for (path, _, _) in &items {
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        std::io::copy(&mut f, &mut out).with_context(|| format!("copying {}", path.display()))?;
    }
    out.into_inner()
        .map_err(|e| anyhow!("writing {}: {e}", tmp.display()))?
        .sync_all()?;
    std::fs::rename(&tmp, output).with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}
