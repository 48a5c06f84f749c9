//! The path policy of a [`LocalHost`]: relative paths resolve inside the base directory,
//! reads reach only the base directory and the read-only roots, writes only the base
//! directory (no `..`, no symlink out; directories created one checked component at a
//! time), and temporary files for atomic writes beside their target.

use super::*;

impl LocalHost {
    /// `timeout`, shortened so that it ends no later than the run's deadline.
    pub(super) fn within_deadline(&self, timeout: Duration) -> Duration {
        match self.deadline {
            Some((at, _)) => timeout.min(at.saturating_duration_since(Instant::now())),
            None => timeout,
        }
    }

    pub(super) fn absolute(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub(super) fn allowed_for_read(&self, canonical: &Path) -> bool {
        canonical.starts_with(&self.base_dir)
            || self.read_roots.iter().any(|r| canonical.starts_with(r))
    }

    pub(super) fn roots_text(&self) -> String {
        let mut v = vec![self.base_dir.display().to_string()];
        v.extend(
            self.read_roots
                .iter()
                .map(|r| format!("{} (read-only)", r.display())),
        );
        v.join(", ")
    }

    /// Resolves a path for reading: it must exist and canonicalise inside an allowed root.
    pub(super) fn resolve_read(&self, path: &str) -> Result<PathBuf, String> {
        let abs = self.absolute(path);
        let canonical = abs
            .canonicalize()
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        if self.allowed_for_read(&canonical) {
            Ok(canonical)
        } else {
            Err(format!(
                "read of {path} refused: it resolves to {}, outside the allowed roots [{}]",
                canonical.display(),
                self.roots_text()
            ))
        }
    }

    /// Resolves a path for writing: lexically inside the base directory, no `..`, no symlink
    /// on the way or at the target. Missing directories are created one by one, each only
    /// after its parent was checked, so nothing is ever created outside the base directory.
    pub(super) fn resolve_write(&self, path: &str) -> Result<PathBuf, String> {
        if Path::new(path)
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            return Err(format!(
                "write to {path} refused: `..` is not allowed in write paths"
            ));
        }
        let abs = self.absolute(path);
        let rel = abs.strip_prefix(&self.base_dir).map_err(|_| {
            format!(
                "write to {path} refused: expected a path inside the base directory {}",
                self.base_dir.display()
            )
        })?;
        let parts: Vec<&std::ffi::OsStr> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect();
        let Some((name, dirs)) = parts.split_last() else {
            return Err(format!("write to {path} refused: expected a file name"));
        };
        let mut cur = self.base_dir.clone();
        for d in dirs {
            cur.push(d);
            match std::fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "write to {path} refused: {} is a symbolic link",
                        cur.display()
                    ));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(format!(
                        "write to {path} refused: {} is not a directory",
                        cur.display()
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&cur)
                        .map_err(|e| format!("cannot create {}: {e}", cur.display()))?;
                }
                Err(e) => return Err(format!("cannot inspect {}: {e}", cur.display())),
            }
        }
        let target = cur.join(name);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(format!(
                "write to {path} refused: the target is a symbolic link"
            ));
        }
        Ok(target)
    }
}

/// Creates a uniquely named temporary file in `dir` (same file system as the target, so the
/// final rename is atomic).
pub(super) fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for i in 0..100u32 {
        let name = format!(
            ".tracefleet-tmp-{}-{}-{i}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        );
        let p = dir.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("could not create a temporary file"))
}
