//! The trust root: which keys a device trusts, for what, and how many must agree.
//!
//! Modelled on TUF's root metadata (The Update Framework specification, §4.3 and the client
//! workflow §5.3) in compact form. A [`TrustRoot`] names the root keys, the trace-signing keys
//! and the command-signing keys, each role with a threshold and each key with an expiry; it is
//! versioned and expires as a whole. Root-file layout: `b"TFR"`, a format-version byte
//! ([`ROOT_FORMAT_VERSION`]), then postcard of [`SignedRoot`]: the canonical postcard bytes of
//! the [`TrustRoot`] and signatures over `b"tracefleet/v1/trust-root\0" ‖ those bytes`.
//!
//! Rules (pure functions of bytes, the current root and `now`):
//! - a first root ([`verify_initial`]) must be signed by a threshold of its own root keys;
//! - a new root ([`verify_update`]) must have version current + 1 and be signed by a
//!   threshold of the *current* root keys and a threshold of its *own* root keys; a chain of
//!   updates is walked version by version ([`verify_chain`]), and only the final root must be
//!   unexpired (as in TUF §5.3.4–5.3.10);
//! - revocation is by omission: a key absent from the newest root no longer counts.

use crate::ids::IdError;
use crate::signed::{
    self, KeyId, KeyRole, PublicKey, SecretKey, SignatureEntry, ThresholdFailure, VerifyError,
    check_threshold, sign_message,
};
use serde::{Deserialize, Serialize};

/// Magic bytes at the start of a trust-root file.
pub const ROOT_MAGIC: &[u8; 3] = b"TFR";
/// The trust-root format version this build writes and reads.
pub const ROOT_FORMAT_VERSION: u8 = 1;
/// Largest trust-root file accepted (bytes).
pub const MAX_ROOT_BYTES: usize = 64 * 1024;
/// Most keys per role.
pub const MAX_KEYS_PER_ROLE: usize = 32;
const SIGNING_CONTEXT: &[u8] = b"tracefleet/v1/trust-root\0";

/// One key of a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKey {
    /// The 32-byte ed25519 public key.
    pub public_key: [u8; 32],
    /// After this time (unix seconds) the key no longer counts.
    pub expires_at: u64,
}

/// The keys of one role and how many of them must sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    /// Distinct keys needed (1 ≤ threshold ≤ keys).
    pub threshold: u32,
    /// The keys.
    pub keys: Vec<RoleKey>,
}

/// The keys a trust root gives a role it does not hold: none, with a threshold never reached.
static NO_KEYS: RoleKeys = RoleKeys {
    threshold: u32::MAX,
    keys: Vec::new(),
};

impl RoleKeys {
    /// The unexpired keys as [`PublicKey`]s of `role`.
    pub fn active(&self, role: KeyRole, now: u64) -> Vec<PublicKey> {
        self.keys
            .iter()
            .filter(|k| now < k.expires_at)
            .filter_map(|k| PublicKey::from_bytes(role, &k.public_key).ok())
            .collect()
    }
}

/// The trust root document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRoot {
    /// Starts at 1; each rotation adds exactly one.
    pub version: u32,
    /// Creation time, unix seconds.
    pub created_at: u64,
    /// After this time the root (and everything it vouches for) is refused.
    pub expires_at: u64,
    /// Keys that sign trust roots.
    pub root: RoleKeys,
    /// Keys that sign traces and bundles.
    pub traces: RoleKeys,
    /// Keys that sign fleet commands.
    pub commands: RoleKeys,
}

impl TrustRoot {
    /// The keys of a role.
    pub fn role(&self, role: KeyRole) -> &RoleKeys {
        match role {
            KeyRole::Root => &self.root,
            KeyRole::Traces => &self.traces,
            KeyRole::Commands => &self.commands,
            // No key of a trust root is an audit key, and no threshold of none is reached.
            KeyRole::Audit => &NO_KEYS,
        }
    }

    /// Unexpired keys of `role` and its threshold.
    pub fn trusted(&self, role: KeyRole, now: u64) -> (Vec<PublicKey>, usize) {
        let r = self.role(role);
        (r.active(role, now), r.threshold as usize)
    }

    /// Checks the document's own consistency.
    ///
    /// # Errors
    /// [`TrustError::Invalid`] saying what is wrong.
    pub fn validate(&self) -> Result<(), TrustError> {
        let bad = |m: String| Err(TrustError::Invalid(m));
        if self.version == 0 {
            return bad("version 0: expected 1 or more".into());
        }
        if self.expires_at <= self.created_at {
            return bad(format!(
                "expires at {} but was created at {}: expected expiry after creation",
                self.expires_at, self.created_at
            ));
        }
        for role in [KeyRole::Root, KeyRole::Traces, KeyRole::Commands] {
            let r = self.role(role);
            if r.keys.is_empty() || r.keys.len() > MAX_KEYS_PER_ROLE {
                return bad(format!(
                    "role {role} has {} keys: expected 1 to {MAX_KEYS_PER_ROLE}",
                    r.keys.len()
                ));
            }
            if r.threshold == 0 || r.threshold as usize > r.keys.len() {
                return bad(format!(
                    "role {role} threshold {} with {} keys: expected 1 to {}",
                    r.threshold,
                    r.keys.len(),
                    r.keys.len()
                ));
            }
            for (i, k) in r.keys.iter().enumerate() {
                if PublicKey::from_bytes(role, &k.public_key).is_err() {
                    return bad(format!("role {role} key {i} is not a valid ed25519 key"));
                }
                if r.keys[..i].iter().any(|o| o.public_key == k.public_key) {
                    return bad(format!(
                        "role {role} lists a key twice: a threshold must count distinct keys"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Canonical bytes (what is signed).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }
}

/// A trust root with its signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRoot {
    /// Canonical postcard bytes of the [`TrustRoot`].
    #[serde(with = "serde_bytes")]
    pub root: Vec<u8>,
    /// Signatures by root keys.
    pub signatures: Vec<SignatureEntry>,
}

fn message(root_bytes: &[u8]) -> Vec<u8> {
    let mut m = SIGNING_CONTEXT.to_vec();
    m.extend_from_slice(root_bytes);
    m
}

/// Signs a trust root with each of `keys` (root keys of this root and, for a rotation, of the
/// current one) and encodes the root file.
///
/// # Errors
/// [`TrustError::Invalid`] when the root is inconsistent or a key is not a root key.
pub fn sign_root(root: &TrustRoot, keys: &[&SecretKey]) -> Result<Vec<u8>, TrustError> {
    root.validate()?;
    if let Some(k) = keys.iter().find(|k| k.role != KeyRole::Root) {
        return Err(TrustError::Invalid(format!(
            "a {} key cannot sign a trust root: expected root keys",
            k.role
        )));
    }
    let bytes = root.canonical_bytes();
    let m = message(&bytes);
    let signed = SignedRoot {
        root: bytes,
        signatures: keys.iter().map(|k| sign_message(&m, k)).collect(),
    };
    let mut out = ROOT_MAGIC.to_vec();
    out.push(ROOT_FORMAT_VERSION);
    Ok(postcard::to_extend(&signed, out).unwrap_or_default())
}

/// Why a trust root was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// Not a trust-root file, or malformed.
    #[error("not a valid trust root: {0}")]
    Format(String),
    /// Inconsistent contents.
    #[error("invalid trust root: {0}")]
    Invalid(String),
    /// Too few valid root signatures.
    #[error(
        "trust root v{version} is not signed by {which}: {valid} valid signature(s), expected at least {threshold}; signed by [{signers}], trusted root keys [{trusted}]"
    )]
    Signatures {
        /// The root being checked.
        version: u32,
        /// Whose keys were required ("its own root keys", "the current root keys (v3)").
        which: String,
        /// Valid distinct signatures.
        valid: usize,
        /// Needed.
        threshold: usize,
        /// Signers found.
        signers: String,
        /// Keys that would count.
        trusted: String,
    },
    /// The root has expired.
    #[error("trust root v{version} expired at {expires_at} (unix seconds); now is {now}")]
    Expired {
        /// Root version.
        version: u32,
        /// Expiry.
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// Not the next version.
    #[error("trust root v{found} cannot follow v{current}: expected v{}", current + 1)]
    Version {
        /// Installed version.
        current: u32,
        /// Offered version.
        found: u32,
    },
    /// A key id in a file did not parse.
    #[error(transparent)]
    Id(#[from] IdError),
}

fn sig_error(version: u32, which: String, t: ThresholdFailure) -> TrustError {
    TrustError::Signatures {
        version,
        which,
        valid: t.valid,
        threshold: t.threshold,
        signers: t.signers,
        trusted: t.trusted,
    }
}

/// Decodes a root file without checking signatures.
///
/// # Errors
/// [`TrustError::Format`] for size, magic, version, malformed or trailing bytes, and
/// [`TrustError::Invalid`] for an inconsistent document.
pub fn decode_root(bytes: &[u8]) -> Result<(SignedRoot, TrustRoot), TrustError> {
    let f = |m: String| TrustError::Format(m);
    if bytes.len() > MAX_ROOT_BYTES {
        return Err(f(format!(
            "{} bytes: expected at most {MAX_ROOT_BYTES}",
            bytes.len()
        )));
    }
    if bytes.len() < 4 || &bytes[..3] != ROOT_MAGIC {
        return Err(f(format!(
            "expected magic bytes \"TFR\" and a format byte, found \"{}\" ({} bytes)",
            bytes[..bytes.len().min(4)].escape_ascii(),
            bytes.len()
        )));
    }
    if bytes[3] != ROOT_FORMAT_VERSION {
        return Err(f(format!(
            "format version {}: this build reads version {ROOT_FORMAT_VERSION}",
            bytes[3]
        )));
    }
    let (signed, rest) =
        postcard::take_from_bytes::<SignedRoot>(&bytes[4..]).map_err(|e| f(e.to_string()))?;
    if !rest.is_empty() {
        return Err(f(format!("{} trailing bytes: expected none", rest.len())));
    }
    let (root, rest) =
        postcard::take_from_bytes::<TrustRoot>(&signed.root).map_err(|e| f(e.to_string()))?;
    if !rest.is_empty() {
        return Err(f(format!(
            "{} trailing bytes after the root document: expected none",
            rest.len()
        )));
    }
    if signed.signatures.len() > signed::MAX_SIGNATURES {
        return Err(f(format!(
            "{} signatures: expected at most {}",
            signed.signatures.len(),
            signed::MAX_SIGNATURES
        )));
    }
    root.validate()?;
    Ok((signed, root))
}

fn check_signed_by(
    signed: &SignedRoot,
    by: &TrustRoot,
    version: u32,
    which: String,
) -> Result<Vec<KeyId>, TrustError> {
    // Per-key expiry governs trace and command keys; root keys live as long as their root
    // (a rotation replaces them), as in TUF.
    let keys: Vec<PublicKey> = by
        .root
        .keys
        .iter()
        .filter_map(|k| PublicKey::from_bytes(KeyRole::Root, &k.public_key).ok())
        .collect();
    check_threshold(
        &message(&signed.root),
        &signed.signatures,
        &keys,
        KeyRole::Root,
        by.root.threshold as usize,
    )
    .map_err(|t| sig_error(version, which, t))
}

/// Accepts a first (provisioned) trust root: signed by a threshold of its own root keys and
/// not expired.
///
/// # Errors
/// See [`TrustError`].
pub fn verify_initial(bytes: &[u8], now: u64) -> Result<TrustRoot, TrustError> {
    let (signed, root) = decode_root(bytes)?;
    check_signed_by(&signed, &root, root.version, "its own root keys".into())?;
    if now >= root.expires_at {
        return Err(TrustError::Expired {
            version: root.version,
            expires_at: root.expires_at,
            now,
        });
    }
    Ok(root)
}

/// Accepts the next trust root after `current`, without the expiry check (a chain may pass
/// through expired intermediate roots; see [`verify_chain`]).
///
/// # Errors
/// See [`TrustError`].
pub fn verify_update(current: &TrustRoot, bytes: &[u8]) -> Result<TrustRoot, TrustError> {
    let (signed, new) = decode_root(bytes)?;
    if current.version.checked_add(1) != Some(new.version) {
        return Err(TrustError::Version {
            current: current.version,
            found: new.version,
        });
    }
    check_signed_by(
        &signed,
        current,
        new.version,
        format!("the current root keys (v{})", current.version),
    )?;
    check_signed_by(&signed, &new, new.version, "its own root keys".into())?;
    Ok(new)
}

/// Walks `updates` (root files in version order) from `current`; the final root must be
/// unexpired. Returns every accepted root with its bytes, oldest first.
///
/// # Errors
/// The first refusal; nothing after it is accepted.
pub fn verify_chain<'a>(
    current: &TrustRoot,
    updates: &[&'a [u8]],
    now: u64,
) -> Result<Vec<(TrustRoot, &'a [u8])>, TrustError> {
    let mut accepted = Vec::new();
    let mut at = current.clone();
    for bytes in updates {
        let next = verify_update(&at, bytes)?;
        accepted.push((next.clone(), *bytes));
        at = next;
    }
    if now >= at.expires_at {
        return Err(TrustError::Expired {
            version: at.version,
            expires_at: at.expires_at,
            now,
        });
    }
    Ok(accepted)
}

/// Verifies a signed trace against a trust root: its unexpired trace-signing keys and their
/// threshold; a root past its expiry vouches for nothing. `identity` decrypts a confidential
/// trace (see [`signed::verify`]).
///
/// # Errors
/// [`VerifyError::RootExpired`], or what [`signed::verify`] refuses.
pub fn verify_with_root(
    bytes: &[u8],
    root: &TrustRoot,
    now: u64,
    identity: Option<&crate::confidential::Identity>,
) -> Result<signed::Verified, VerifyError> {
    if now >= root.expires_at {
        return Err(VerifyError::RootExpired {
            version: root.version,
            expires_at: root.expires_at,
            now,
        });
    }
    let (keys, threshold) = root.trusted(KeyRole::Traces, now);
    signed::verify(bytes, &keys, threshold, now, identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: KeyRole, seed: u8) -> SecretKey {
        SecretKey::from_seed(role, [seed; 32])
    }

    fn role(keys: &[&SecretKey], threshold: u32) -> RoleKeys {
        RoleKeys {
            threshold,
            keys: keys
                .iter()
                .map(|k| RoleKey {
                    public_key: k.public().to_bytes(),
                    expires_at: 1_000,
                })
                .collect(),
        }
    }

    fn root(version: u32, roots: &[&SecretKey], threshold: u32) -> TrustRoot {
        TrustRoot {
            version,
            created_at: 10,
            expires_at: 1_000,
            root: role(roots, threshold),
            traces: role(&[&key(KeyRole::Traces, 50)], 1),
            commands: role(&[&key(KeyRole::Commands, 60)], 1),
        }
    }

    #[test]
    fn initial_root_needs_its_own_threshold() {
        let (a, b) = (key(KeyRole::Root, 1), key(KeyRole::Root, 2));
        let r = root(1, &[&a, &b], 2);
        let both = sign_root(&r, &[&a, &b]).unwrap();
        assert_eq!(verify_initial(&both, 100).unwrap(), r);
        let one = sign_root(&r, &[&a]).unwrap();
        let e = verify_initial(&one, 100).unwrap_err().to_string();
        assert!(
            e.contains("1 valid signature(s), expected at least 2"),
            "{e}"
        );
        // The same key twice does not make two.
        let twice = sign_root(&r, &[&a, &a]).unwrap();
        assert!(verify_initial(&twice, 100).is_err());
        assert!(
            verify_initial(&both, 1_000)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
    }

    #[test]
    fn rotation_needs_old_and_new_keys_and_walks_version_by_version() {
        let (old, new) = (key(KeyRole::Root, 1), key(KeyRole::Root, 2));
        let v1 = root(1, &[&old], 1);
        let v2 = root(2, &[&new], 1);
        let by_both = sign_root(&v2, &[&old, &new]).unwrap();
        assert_eq!(verify_update(&v1, &by_both).unwrap(), v2);
        let only_new = sign_root(&v2, &[&new]).unwrap();
        let e = verify_update(&v1, &only_new).unwrap_err().to_string();
        assert!(e.contains("the current root keys (v1)"), "{e}");
        let only_old = sign_root(&v2, &[&old]).unwrap();
        assert!(
            verify_update(&v1, &only_old)
                .unwrap_err()
                .to_string()
                .contains("its own root keys")
        );
        // Skipping a version is refused; so is going back.
        let v3 = root(3, &[&new], 1);
        let v3b = sign_root(&v3, &[&old, &new]).unwrap();
        assert!(
            verify_update(&v1, &v3b)
                .unwrap_err()
                .to_string()
                .contains("expected v2")
        );
        assert!(
            verify_update(&v2, &by_both)
                .unwrap_err()
                .to_string()
                .contains("expected v3")
        );
        // A chain v1 → v2 → v3 is accepted step by step.
        let v3_signed = sign_root(&v3, &[&new]).unwrap();
        let chain = verify_chain(&v1, &[&by_both, &v3_signed], 100).unwrap();
        assert_eq!(chain.last().unwrap().0, v3);
    }

    #[test]
    fn inconsistent_roots_and_garbage_are_refused() {
        let a = key(KeyRole::Root, 1);
        let mut r = root(1, &[&a], 2);
        assert!(
            sign_root(&r, &[&a])
                .unwrap_err()
                .to_string()
                .contains("threshold 2 with 1 keys")
        );
        r.root.threshold = 1;
        let traces = key(KeyRole::Traces, 9);
        assert!(
            sign_root(&r, &[&traces])
                .unwrap_err()
                .to_string()
                .contains("cannot sign a trust root")
        );
        assert!(decode_root(b"TFR").is_err());
        assert!(
            decode_root(b"nope")
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut good = sign_root(&r, &[&a]).unwrap();
        good.push(0);
        assert!(
            decode_root(&good)
                .unwrap_err()
                .to_string()
                .contains("trailing")
        );
    }
}
