//! The device's identity for confidential traces: an age X25519 identity file,
//! `<state-dir>/identity.txt`, mode 0600, in the format `age-keygen` writes
//! ([`tracefleet::confidential`]). Created by `follower trust init`, `follower identity` and
//! the agent's start when missing, never replaced by the follower; read only when a
//! confidential trace is verified, so a damaged file stops those and nothing else.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use tracefleet::confidential::{self, Identity};
use tracefleet::signed;

/// The identity file's name inside the state directory.
pub const FILE_NAME: &str = "identity.txt";

/// Why the identity could not be read or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading, creating or checking the file.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// It does not hold one X25519 identity.
    #[error("identity file {path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        source: confidential::ConfidentialError,
    },
    /// Others may read it.
    #[error(
        "identity file {path} has mode {mode:o}: expected no access for group and others (chmod 600); refusing to use a secret key others can read"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

/// `<state_dir>/identity.txt`.
#[must_use]
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Reads the identity; `None` when the file does not exist.
///
/// # Errors
/// [`IdentityError`]: unreadable, readable by group or others, or not one X25519 identity.
pub fn load(state_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    use std::os::unix::fs::PermissionsExt as _;
    let p = path(state_dir);
    let shown = p.display().to_string();
    let meta = match std::fs::metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(IdentityError::Io {
                path: shown,
                source,
            });
        }
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Exposed { path: shown, mode });
    }
    if meta.len() > confidential::MAX_IDENTITY_FILE_BYTES as u64 {
        return Err(IdentityError::Invalid {
            path: shown,
            source: confidential::ConfidentialError::BadIdentity(format!(
                "{} bytes: expected at most {}",
                meta.len(),
                confidential::MAX_IDENTITY_FILE_BYTES
            )),
        });
    }
    let text = std::fs::read_to_string(&p).map_err(|source| IdentityError::Io {
        path: shown.clone(),
        source,
    })?;
    Identity::from_file(&text)
        .map(Some)
        .map_err(|source| IdentityError::Invalid {
            path: shown,
            source,
        })
}

/// Reads the identity, creating it (0600, never over an existing file) when missing. The
/// flag says whether it was created now.
///
/// # Errors
/// [`IdentityError`], as [`load`], or the file cannot be created.
pub fn ensure(state_dir: &Path) -> Result<(Identity, bool), IdentityError> {
    if let Some(id) = load(state_dir)? {
        return Ok((id, false));
    }
    let p = path(state_dir);
    let io = |at: &Path| {
        let at = at.display().to_string();
        move |source| IdentityError::Io { path: at, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let id = Identity::generate();
    let text = id.to_file(&tracefleet::time::rfc3339_now());
    // Written beside it under a name no other process picks (a UUIDv7: time and 74 random
    // bits) and linked into place: a crash leaves no half-written key, and of two processes
    // creating it at once one wins and the other reads the winner's.
    let tmp = state_dir.join(format!(".{FILE_NAME}.{}", uuid::Uuid::now_v7().simple()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let written = f
        .write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::hard_link(&tmp, &p));
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            // The new name is durable once the directory is.
            if let Ok(dir) = std::fs::File::open(state_dir) {
                let _ = dir.sync_all();
            }
            Ok((id, true))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(state_dir)?
            .map(|id| (id, false))
            .ok_or_else(|| io(&p)(e)),
        Err(e) => Err(io(&p)(e)),
    }
}

/// The identity to verify `bytes` with: read only when they are a confidential trace
/// ([`signed::is_sealed`]); `None` otherwise or when the device has none (the verification
/// then says so).
///
/// # Errors
/// [`IdentityError`] from [`load`], for a confidential trace only.
pub fn for_trace(state_dir: &Path, bytes: &[u8]) -> Result<Option<Identity>, IdentityError> {
    if signed::is_sealed(bytes) {
        load(state_dir)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn created_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).unwrap().is_none());
        let (id, created) = ensure(dir.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = ensure(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(again.recipient(), id.recipient());
        assert_eq!(
            load(dir.path()).unwrap().unwrap().recipient(),
            id.recipient()
        );
        // No temporary left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    #[test]
    fn a_readable_or_damaged_file_is_refused_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _) = ensure(dir.path()).unwrap();
        let p = path(dir.path());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("has mode 644"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "AGE-SECRET-KEY-1BROKEN\n").unwrap();
        let e = ensure(dir.path()).unwrap_err().to_string();
        assert!(e.contains("line 1: expected an age X25519 identity"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "AGE-SECRET-KEY-1BROKEN\n"
        );
        // A plain trace never reads it.
        assert!(for_trace(dir.path(), b"TFS\x01rest").unwrap().is_none());
        assert!(for_trace(dir.path(), b"TFS\x02rest").is_err());
    }
}
