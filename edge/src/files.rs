//! Files the follower is handed (trust roots, signed traces, sources) read with a size limit
//! checked before reading, and files it writes for people (reports) replaced atomically.

use anyhow::{Context, Result, bail};
use std::path::Path;

/// Reads a file refusing more than `limit` bytes (checked before reading).
///
/// # Errors
/// The file is missing, not a regular file, larger than `limit`, or unreadable; the message
/// names the path.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if !meta.is_file() {
        bail!("{}: expected a regular file", path.display());
    }
    if meta.len() > limit {
        bail!(
            "{} is {} bytes: expected at most {limit}",
            path.display(),
            meta.len()
        );
    }
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
///
/// # Errors
/// Writing or renaming failed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_within_the_limit_and_refuses_beyond_it_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"12345").unwrap();
        assert_eq!(read_limited(&p, 5).unwrap(), b"12345");
        let e = read_limited(&p, 4).unwrap_err().to_string();
        assert!(e.ends_with("is 5 bytes: expected at most 4"), "{e}");
        let e = read_limited(dir.path(), 100).unwrap_err().to_string();
        assert!(e.ends_with(": expected a regular file"), "{e}");
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report.json");
        std::fs::write(&p, b"old").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
