//! The bundle: one file that carries signed traces (and optionally model files and trust-root
//! updates) to an air-gapped device, e.g. on a USB stick.
//!
//! Layout: `b"TFB"`, a format-version byte ([`BUNDLE_FORMAT_VERSION`]), a little-endian `u32`
//! header length (at most [`MAX_HEADER_BYTES`]), the postcard-encoded [`BundleHeader`], then
//! the entries' bytes back to back in manifest order and nothing after them. The header holds
//! trust-root files to apply first (a rotation chain, possibly empty) and the [`Manifest`]
//! (every entry's name, kind, size and SHA-256; creation and expiry times) with signatures by
//! trace-signing keys over `b"tracefleet/v1/bundle-manifest\0" ‖ manifest bytes`. Entries are
//! streamed and hashed on install, so a model of gigabytes never sits in memory.
//!
//! Refused (TUF's attack list): a manifest not signed by a threshold of trusted trace keys, an
//! expired manifest, a manifest that outlives the root that vouches for it (freeze), an entry
//! whose size or hash disagrees (mix-and-match), a truncated bundle (partial), bytes after the
//! last entry, entry names that could leave their directory, and oversize headers.

use crate::signed::{KeyRole, SecretKey, SignatureEntry, check_threshold, sign_message};
use crate::trust::TrustRoot;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Magic bytes at the start of a bundle.
pub const BUNDLE_MAGIC: &[u8; 3] = b"TFB";
/// The bundle format version this build writes and reads.
pub const BUNDLE_FORMAT_VERSION: u8 = 1;
/// Largest bundle header (bytes).
pub const MAX_HEADER_BYTES: u32 = 4 * 1024 * 1024;
/// Most entries in a bundle.
pub const MAX_ENTRIES: usize = 1024;
/// Most trust-root updates a bundle may carry.
pub const MAX_ROOT_UPDATES: usize = 64;
/// Largest single entry (bytes): 64 GiB.
pub const MAX_ENTRY_BYTES: u64 = 64 << 30;
const SIGNING_CONTEXT: &[u8] = b"tracefleet/v1/bundle-manifest\0";

/// An entry's file name: 1–128 characters of `[A-Za-z0-9._-]`, starting with a letter or
/// digit. It can never name a directory, a parent or an absolute path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntryName(String);

impl EntryName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for EntryName {
    type Error = BundleError;
    fn try_from(s: String) -> Result<Self, BundleError> {
        let ok = (1..=128).contains(&s.len())
            && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s))
        } else {
            Err(BundleError::Name(s.chars().take(80).collect()))
        }
    }
}

impl From<EntryName> for String {
    fn from(n: EntryName) -> Self {
        n.0
    }
}

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A signed trace (`TFS`), verified on its own as well.
    Trace,
    /// A model file (GGUF).
    Model,
}

/// One entry of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// File name.
    pub name: EntryName,
    /// What it is.
    pub kind: EntryKind,
    /// Exact size in bytes.
    pub size: u64,
    /// SHA-256 of the bytes.
    pub sha256: [u8; 32],
}

/// What the bundle holds, signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Creation, unix seconds.
    pub created_at: u64,
    /// After this the bundle is refused; never later than the vouching root's expiry.
    pub expires_at: u64,
    /// The entries, in payload order.
    pub entries: Vec<ManifestEntry>,
}

/// The bundle header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// Trust-root files to apply before verifying the manifest, oldest first.
    pub roots: Vec<Vec<u8>>,
    /// Canonical postcard bytes of the [`Manifest`].
    #[serde(with = "serde_bytes")]
    pub manifest: Vec<u8>,
    /// Signatures by trace-signing keys over the manifest.
    pub signatures: Vec<SignatureEntry>,
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not a bundle or malformed.
    #[error("not a valid bundle: {0}")]
    Format(String),
    /// A name that could leave its directory.
    #[error(
        "bundle entry name {0:?}: expected 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-' starting with a letter or digit (no paths)"
    )]
    Name(String),
    /// The manifest signatures.
    #[error(
        "bundle manifest signature check failed: {valid} valid signature(s) from trusted trace-signing keys, expected at least {threshold}; signed by [{signers}]"
    )]
    Signatures {
        /// Valid distinct signatures.
        valid: usize,
        /// Needed.
        threshold: usize,
        /// Signers.
        signers: String,
    },
    /// Expired.
    #[error("bundle expired at {expires_at} (unix seconds); now is {now}")]
    Expired {
        /// Expiry.
        expires_at: u64,
        /// Time of the check.
        now: u64,
    },
    /// Outlives its root (freeze attack defence).
    #[error(
        "bundle expires at {bundle} but the trust root v{root_version} that vouches for it expires at {root}: a bundle must not outlive its metadata"
    )]
    OutlivesRoot {
        /// Bundle expiry.
        bundle: u64,
        /// Root version.
        root_version: u32,
        /// Root expiry.
        root: u64,
    },
    /// Entry content disagrees with the manifest.
    #[error("bundle entry {name}: {detail}")]
    Entry {
        /// The entry.
        name: String,
        /// What disagrees.
        detail: String,
    },
}

fn message(manifest: &[u8]) -> Vec<u8> {
    let mut m = SIGNING_CONTEXT.to_vec();
    m.extend_from_slice(manifest);
    m
}

/// Encodes the bundle header (magic, version, length, header). The caller appends the
/// entries' bytes in manifest order.
///
/// # Errors
/// [`BundleError::Format`] when the header exceeds [`MAX_HEADER_BYTES`].
pub fn encode_header(
    roots: Vec<Vec<u8>>,
    manifest: &Manifest,
    keys: &[&SecretKey],
) -> Result<Vec<u8>, BundleError> {
    let manifest_bytes =
        postcard::to_allocvec(manifest).map_err(|e| BundleError::Format(e.to_string()))?;
    let m = message(&manifest_bytes);
    let header = BundleHeader {
        roots,
        signatures: keys.iter().map(|k| sign_message(&m, k)).collect(),
        manifest: manifest_bytes,
    };
    let body = postcard::to_allocvec(&header).map_err(|e| BundleError::Format(e.to_string()))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_HEADER_BYTES)
        .ok_or_else(|| {
            BundleError::Format(format!(
                "header of {} bytes: expected at most {MAX_HEADER_BYTES}",
                body.len()
            ))
        })?;
    let mut out = BUNDLE_MAGIC.to_vec();
    out.push(BUNDLE_FORMAT_VERSION);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads and decodes the header from the start of a bundle; the reader is left at the first
/// entry. Also returns how many bytes the start and header took (where the entries begin).
///
/// # Errors
/// [`BundleError::Format`] for a wrong magic or version, an oversize or malformed header, or a
/// read error; [`BundleError::Name`] for a bad entry name.
pub fn read_header(
    r: &mut impl std::io::Read,
) -> Result<(BundleHeader, Manifest, u64), BundleError> {
    let f = |m: String| BundleError::Format(m);
    let mut start = [0u8; 8];
    r.read_exact(&mut start)
        .map_err(|e| f(format!("cannot read the 8-byte start: {e}")))?;
    if &start[..3] != BUNDLE_MAGIC {
        return Err(f(format!(
            "expected magic bytes \"TFB\", found \"{}\"",
            start[..3].escape_ascii()
        )));
    }
    if start[3] != BUNDLE_FORMAT_VERSION {
        return Err(f(format!(
            "format version {}: this build reads version {BUNDLE_FORMAT_VERSION}",
            start[3]
        )));
    }
    let len = u32::from_le_bytes([start[4], start[5], start[6], start[7]]);
    if len > MAX_HEADER_BYTES {
        return Err(f(format!(
            "header of {len} bytes: expected at most {MAX_HEADER_BYTES}"
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)
        .map_err(|e| f(format!("truncated header ({len} bytes expected): {e}")))?;
    let (header, rest) =
        postcard::take_from_bytes::<BundleHeader>(&body).map_err(|e| f(format!("header: {e}")))?;
    if !rest.is_empty() {
        return Err(f(format!(
            "{} bytes after the header inside its length: expected none",
            rest.len()
        )));
    }
    let (manifest, rest) =
        postcard::take_from_bytes::<Manifest>(&header.manifest).map_err(|e| match e {
            postcard::Error::DeserializeBadEncoding => f("manifest: bad encoding".into()),
            other => f(format!("manifest: {other}")),
        })?;
    if !rest.is_empty() {
        return Err(f("trailing bytes after the manifest: expected none".into()));
    }
    if header.signatures.len() > crate::signed::MAX_SIGNATURES {
        return Err(f(format!(
            "{} signatures: expected at most {}",
            header.signatures.len(),
            crate::signed::MAX_SIGNATURES
        )));
    }
    if header.roots.len() > MAX_ROOT_UPDATES {
        return Err(f(format!(
            "{} trust-root updates: expected at most {MAX_ROOT_UPDATES}",
            header.roots.len()
        )));
    }
    if manifest.entries.len() > MAX_ENTRIES {
        return Err(f(format!(
            "{} entries: expected at most {MAX_ENTRIES}",
            manifest.entries.len()
        )));
    }
    for (i, e) in manifest.entries.iter().enumerate() {
        if e.kind == EntryKind::Trace && e.size > crate::signed::MAX_SIGNED_BYTES as u64 {
            return Err(BundleError::Entry {
                name: e.name.to_string(),
                detail: format!(
                    "a signed trace of {} bytes: expected at most {}",
                    e.size,
                    crate::signed::MAX_SIGNED_BYTES
                ),
            });
        }
        if e.size > MAX_ENTRY_BYTES {
            return Err(BundleError::Entry {
                name: e.name.to_string(),
                detail: format!("{} bytes: expected at most {MAX_ENTRY_BYTES}", e.size),
            });
        }
        if manifest.entries[..i].iter().any(|o| o.name == e.name) {
            return Err(BundleError::Entry {
                name: e.name.to_string(),
                detail: "listed twice: expected unique names".into(),
            });
        }
    }
    Ok((header, manifest, 8 + u64::from(len)))
}

/// Checks the manifest's signatures against `root`'s trace-signing keys, its expiry, and that
/// it does not outlive `root`.
///
/// # Errors
/// See [`BundleError`].
pub fn verify_manifest(
    header: &BundleHeader,
    manifest: &Manifest,
    root: &TrustRoot,
    now: u64,
) -> Result<(), BundleError> {
    let (keys, threshold) = root.trusted(KeyRole::Traces, now);
    check_threshold(
        &message(&header.manifest),
        &header.signatures,
        &keys,
        KeyRole::Traces,
        threshold,
    )
    .map_err(|t| BundleError::Signatures {
        valid: t.valid,
        threshold: t.threshold,
        signers: t.signers,
    })?;
    if manifest.expires_at > root.expires_at {
        return Err(BundleError::OutlivesRoot {
            bundle: manifest.expires_at,
            root_version: root.version,
            root: root.expires_at,
        });
    }
    if now >= manifest.expires_at {
        return Err(BundleError::Expired {
            expires_at: manifest.expires_at,
            now,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::{RoleKey, RoleKeys};
    use sha2::{Digest, Sha256};

    fn root(k: &SecretKey, expires_at: u64) -> TrustRoot {
        let role = RoleKeys {
            threshold: 1,
            keys: vec![RoleKey {
                public_key: k.public().to_bytes(),
                expires_at: u64::MAX,
            }],
        };
        TrustRoot {
            version: 1,
            created_at: 0,
            expires_at,
            root: role.clone(),
            traces: role.clone(),
            commands: role,
        }
    }

    fn manifest(expires_at: u64) -> Manifest {
        Manifest {
            created_at: 1,
            expires_at,
            entries: vec![ManifestEntry {
                name: EntryName::try_from("a.tfs".to_owned()).unwrap(),
                kind: EntryKind::Trace,
                size: 3,
                sha256: Sha256::digest(b"abc").into(),
            }],
        }
    }

    #[test]
    fn header_round_trips_and_verifies() {
        let k = SecretKey::from_seed(KeyRole::Traces, [1; 32]);
        let bytes = encode_header(vec![], &manifest(100), &[&k]).unwrap();
        let (h, m, n) = read_header(&mut bytes.as_slice()).unwrap();
        assert_eq!(n, bytes.len() as u64);
        assert_eq!(m, manifest(100));
        verify_manifest(&h, &m, &root(&k, 1_000), 50).unwrap();
        let e = verify_manifest(&h, &m, &root(&k, 90), 50)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must not outlive"), "{e}");
        assert!(
            verify_manifest(&h, &m, &root(&k, 1_000), 100)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
        let other = SecretKey::from_seed(KeyRole::Traces, [2; 32]);
        assert!(
            verify_manifest(&h, &m, &root(&other, 1_000), 50)
                .unwrap_err()
                .to_string()
                .contains("signature check failed")
        );
    }

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["../x", "/etc/passwd", "a/b", ".hidden", "", "a\\b", "x\0y"] {
            assert!(EntryName::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
        assert!(EntryName::try_from("SmolLM2-135M.Q4_1.gguf".to_owned()).is_ok());
    }

    #[test]
    fn oversize_and_truncated_headers_are_refused() {
        let mut b = b"TFB\x01".to_vec();
        b.extend_from_slice(&(MAX_HEADER_BYTES + 1).to_le_bytes());
        assert!(
            read_header(&mut b.as_slice())
                .unwrap_err()
                .to_string()
                .contains("expected at most")
        );
        let k = SecretKey::from_seed(KeyRole::Traces, [1; 32]);
        let bytes = encode_header(vec![], &manifest(100), &[&k]).unwrap();
        assert!(
            read_header(&mut &bytes[..bytes.len() - 1])
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
    }
}
