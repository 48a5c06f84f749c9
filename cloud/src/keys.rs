//! Key generation and key files on the learner's disk.
//!
//! A generated key is written as two files: the secret key at the path given (mode 0600,
//! created exclusively so an existing key is never overwritten) and the public key beside it
//! with `.pub` appended. Formats are [`tracefleet::signed`]'s.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use tracefleet::signed::{KeyRole, PublicKey, SecretKey};

/// Why key handling failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The OS random source failed.
    #[error("cannot get randomness from the OS: {0}")]
    Random(String),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A key file is malformed.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: tracefleet::signed::KeyFileError,
    },
}

/// The public key file that belongs to secret key file `secret`.
pub fn public_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// Generates a key with OS randomness and writes the secret (0600) and public key files.
///
/// # Errors
/// [`KeyError::Io`] when a file exists already or cannot be written.
pub fn generate(role: KeyRole, secret_path: &Path) -> Result<PublicKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let key = SecretKey::from_seed(role, seed);
    seed.fill(0);
    write_new(secret_path, key.to_file().as_bytes(), 0o600)?;
    let public = key.public();
    let pub_path = public_path(secret_path);
    if let Err(e) = write_new(&pub_path, public.to_file().as_bytes(), 0o644) {
        let _ = std::fs::remove_file(secret_path);
        return Err(e);
    }
    Ok(public)
}

/// Reads a secret key file.
///
/// # Errors
/// [`KeyError`] when it cannot be read or is malformed.
pub fn read_secret(path: &Path) -> Result<SecretKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    SecretKey::from_file(&text).map_err(|source| KeyError::Format {
        path: path.to_owned(),
        source,
    })
}

/// Reads secret trace-signing keys (role `traces`).
///
/// # Errors
/// When a file cannot be read, is malformed, or holds a key of another role.
pub fn read_trace_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<SecretKey>> {
    paths
        .iter()
        .map(|path| {
            let secret = read_secret(path)?;
            if secret.role != KeyRole::Traces {
                anyhow::bail!(
                    "{}: a {} key: expected a trace-signing key (role traces)",
                    path.display(),
                    secret.role
                );
            }
            Ok(secret)
        })
        .collect()
}

/// Signs compiled trace bytes with every key, valid from now for `expires`; encrypted to
/// `recipients` first when there are any (a confidential trace, [`tracefleet::confidential`]).
///
/// # Errors
/// Without a key, when the validity window cannot be represented, or what
/// [`tracefleet::signed::sign_sealed`] refuses.
pub fn sign_all(
    compiled: &[u8],
    keys: &[SecretKey],
    expires: std::time::Duration,
    recipients: &[tracefleet::confidential::Recipient],
) -> anyhow::Result<tracefleet::signed::SignedTrace> {
    use anyhow::Context as _;
    let (first, rest) = keys.split_first().context("no signing key")?;
    let now = tracefleet::time::unix_now();
    let expires_at = now.saturating_add(expires.as_secs());
    let mut signed = if recipients.is_empty() {
        tracefleet::signed::sign(compiled, first, now, expires_at)?
    } else {
        tracefleet::signed::sign_sealed(compiled, recipients, first, now, expires_at)?
    };
    for k in rest {
        tracefleet::signed::add_signature(&mut signed, k);
    }
    Ok(signed)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generate_writes_private_secret_and_public_key_and_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("traces.key");
        let public = generate(KeyRole::Traces, &p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = read_secret(&p).unwrap();
        assert_eq!(back.public(), public);
        let pub_text = std::fs::read_to_string(public_path(&p)).unwrap();
        assert_eq!(PublicKey::from_file(&pub_text).unwrap(), public);
        assert!(!pub_text.contains("secret"));
        let before = std::fs::read(&p).unwrap();
        assert!(generate(KeyRole::Traces, &p).is_err());
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "existing key must not be overwritten"
        );
    }
}
