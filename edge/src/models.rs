//! The device's models: GGUF files registered in the store and kept in `<state-dir>/models/`.
//!
//! A model is registered by `follower models add FILE` (or arrives in a bundle): its GGUF header
//! is read with every length checked ([`tracefleet::gguf`]), every tensor's data must lie inside
//! the file, the bytes kept are hashed (SHA-256) and, when a manifest (`models/models.toml`)
//! or `--sha256` names the file, must match it. Before a run loads a model the follower
//! checks the header again and compares the file's identity (device, inode, size, mtime,
//! ctime) with the one recorded when it was last hashed; a changed file is hashed again and
//! refused unless it still has the registered hash. So a broken, truncated or swapped model file never reaches
//! llama.cpp.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tracefleet::gguf::{self, GgufInfo};

use crate::store::{ModelRow, Store, StoreError};

/// Context a model's RAM estimate is made for, tokens (capped by the model's own).
pub const DEFAULT_CONTEXT: u64 = 4096;

/// Why a model cannot be registered or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The file is not a complete GGUF model.
    #[error("model file {path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What was expected and what was found.
        reason: String,
    },
    /// The file's hash or size is not the one it must have.
    #[error("model file {path}: {what} is {found}, expected {expected} ({source_of_truth})")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// `sha256` or `size`.
        what: &'static str,
        /// What the file has.
        found: String,
        /// What it must have.
        expected: String,
        /// Where the expectation comes from.
        source_of_truth: String,
    },
    /// No such model on this device.
    #[error("model `{asked}` is not registered on this device; it has: {available}")]
    Unknown {
        /// Asked for.
        asked: String,
        /// Registered names, or `none` with how to add one.
        available: String,
    },
    /// A manifest that does not parse.
    #[error("manifest {path}: {reason}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// Parse error.
        reason: String,
    },
    /// Reading or writing files.
    #[error("{0}")]
    Io(String),
    /// The state database.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One entry of a model manifest (`models/models.toml`, `[[model]]` tables).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Name steps ask for.
    pub name: String,
    /// File name.
    pub file: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
    /// Size, bytes.
    pub size: u64,
    /// `general.architecture`.
    pub architecture: String,
    /// Quantization (`Q4_1`, …).
    pub quantization: String,
    /// Training context, tokens.
    pub context_length: u64,
    /// RAM needed to run it, MiB.
    pub ram_needed_mb: u64,
    /// Licence (SPDX).
    pub license: String,
    /// Where the file comes from.
    #[serde(default)]
    pub source: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(default)]
    model: Vec<ManifestEntry>,
}

/// Reads a model manifest.
///
/// # Errors
/// [`ModelError::Manifest`] when it cannot be read or parsed.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>, ModelError> {
    let bad = |reason: String| ModelError::Manifest {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let m: Manifest = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    Ok(m.model)
}

/// `<state-dir>/models`.
pub fn models_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("models")
}

/// A file's identity: device, inode, size, modification time and status-change time (ns).
/// The status-change time (ctime) is what makes it hold: the kernel sets it to the current
/// time on every write and every metadata change, `utimensat` included, and no system call
/// sets it back — so a file edited and given its old mtime again (`touch -d`) has another
/// stamp. If the stamp is unchanged the bytes were not rewritten through the file system
/// (short of resetting the system clock, which needs root and is out of scope).
pub fn file_stamp(meta: &std::fs::Metadata) -> String {
    format!(
        "{}:{}:{}:{}.{:09}:{}.{:09}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// SHA-256 of everything `input` yields, lowercase hex; `progress` gets the bytes read so far.
///
/// # Errors
/// A read error.
pub fn sha256_of(mut input: impl Read, mut progress: impl FnMut(u64)) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A byte progress bar on stderr for `len` bytes (drawn only on a terminal).
fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// Hashes the file at `path` with a progress bar.
fn hash_file(path: &Path, what: &str) -> Result<String, ModelError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ModelError::Io(format!("cannot open {}: {e}", path.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(len, what);
    let sum = sha256_of(file, |n| bar.set_position(n))
        .map_err(|e| ModelError::Io(format!("cannot read {}: {e}", path.display())))?;
    bar.finish_and_clear();
    Ok(sum)
}

/// Reads and checks the GGUF header of `path` (complete file, every tensor inside it).
///
/// # Errors
/// [`ModelError::BadFile`] saying what was expected and what was found.
pub fn check_file(path: &Path) -> Result<GgufInfo, ModelError> {
    gguf::read_file(path).map_err(|reason| ModelError::BadFile {
        path: path.to_owned(),
        reason,
    })
}

/// Estimated bytes of RAM to run a model of `file_size` bytes described by `info` with a
/// context of `n_ctx` tokens: the weights (mapped, resident once touched), the f16 KV cache,
/// and a compute reserve of an eighth of the weights plus 32 MiB (llama.cpp's graph buffers and
/// logits). An estimate: for SmolLM2-135M Q4_1 and the 576 tokens a 64-token step is admitted
/// with it says 150 MiB; such a `follower run` peaked at 145 MiB RSS (docs/benchmarks.md).
pub fn ram_needed(info: &GgufInfo, file_size: u64, n_ctx: u64) -> u64 {
    let kv = info.kv_cache_bytes(n_ctx).unwrap_or(file_size / 4);
    file_size
        .saturating_add(kv)
        .saturating_add(file_size / 8)
        .saturating_add(32 << 20)
}

/// How `follower models add` registers a file.
#[derive(Debug, Default, Clone)]
pub struct AddOptions {
    /// Register under this name (default: the manifest's name for the file, else the file
    /// name without `.gguf`).
    pub name: Option<String>,
    /// The SHA-256 the file must have.
    pub sha256: Option<String>,
    /// A manifest whose entry for this file (by file name or name) the file must match.
    pub manifest: Option<PathBuf>,
}

/// Checks `file`, places it in `<state-dir>/models/` (hard link when it can, else a copy) and
/// registers it. Nothing is registered or left behind when a check fails.
///
/// # Errors
/// [`ModelError`]: a bad GGUF file, a hash or size that differs from the manifest or
/// `--sha256`, an I/O or store failure.
pub fn add(
    store: &Store,
    state_dir: &Path,
    file: &Path,
    opts: &AddOptions,
    now: &str,
) -> Result<ModelRow, ModelError> {
    check_file(file)?;
    let file_name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .ok_or_else(|| ModelError::Io(format!("{}: not a file name", file.display())))?;
    let entry = match &opts.manifest {
        Some(m) => read_manifest(m)?
            .into_iter()
            .find(|e| e.file == file_name || opts.name.as_deref().is_some_and(|n| n == e.name)),
        None => None,
    };
    let dir = models_dir(state_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ModelError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let dest = dir.join(&file_name);
    let part = dir.join(format!(".{file_name}.part"));
    let _ = std::fs::remove_file(&part);
    let same_file = std::fs::metadata(&dest)
        .ok()
        .zip(std::fs::metadata(file).ok())
        .is_some_and(|(a, b)| a.dev() == b.dev() && a.ino() == b.ino());
    let kept = if same_file {
        dest.clone()
    } else {
        if std::fs::hard_link(file, &part).is_err() {
            copy_synced(file, &part)?;
        }
        part.clone()
    };
    let result = (|| {
        let meta = std::fs::metadata(&kept)
            .map_err(|e| ModelError::Io(format!("cannot stat {}: {e}", kept.display())))?;
        let sha256 = hash_file(&kept, &format!("hashing {file_name}"))?;
        let mut expected = Vec::new();
        if let Some(s) = &opts.sha256 {
            expected.push((s.to_ascii_lowercase(), "--sha256".to_owned()));
        }
        if let Some(e) = &entry {
            if e.size != meta.len() {
                return Err(ModelError::Mismatch {
                    path: file.to_owned(),
                    what: "size",
                    found: meta.len().to_string(),
                    expected: e.size.to_string(),
                    source_of_truth: format!("manifest entry `{}`", e.name),
                });
            }
            expected.push((e.sha256.clone(), format!("manifest entry `{}`", e.name)));
        }
        for (want, from) in expected {
            if want != sha256 {
                return Err(ModelError::Mismatch {
                    path: file.to_owned(),
                    what: "sha256",
                    found: sha256,
                    expected: want,
                    source_of_truth: from,
                });
            }
        }
        // The kept bytes are the ones checked: read the header again from them.
        let name = opts
            .name
            .clone()
            .or_else(|| entry.as_ref().map(|e| e.name.clone()))
            .unwrap_or_else(|| file_name.trim_end_matches(".gguf").to_owned());
        let mut row = describe(&name, &file_name, &kept, sha256, now)?;
        if row.license.is_empty()
            && let Some(e) = &entry
        {
            row.license.clone_from(&e.license);
        }
        Ok(row)
    })();
    let mut row = match result {
        Ok(row) => row,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    if kept == part {
        std::fs::rename(&part, &dest).map_err(|e| {
            let _ = std::fs::remove_file(&part);
            ModelError::Io(format!("cannot place {}: {e}", dest.display()))
        })?;
    }
    let meta = std::fs::metadata(&dest)
        .map_err(|e| ModelError::Io(format!("cannot stat {}: {e}", dest.display())))?;
    row.verified_stamp = file_stamp(&meta);
    store.put_model(&row)?;
    Ok(row)
}

/// The registry row for the model file at `path` (checked here: a complete GGUF file) whose
/// SHA-256 is `sha256`; `verified_stamp` is left empty for the caller to fill once the file is
/// in its final place.
///
/// # Errors
/// [`ModelError::BadFile`] or an I/O error.
pub fn describe(
    name: &str,
    file_name: &str,
    path: &Path,
    sha256: String,
    now: &str,
) -> Result<ModelRow, ModelError> {
    let info = check_file(path)?;
    let size = std::fs::metadata(path)
        .map_err(|e| ModelError::Io(format!("cannot stat {}: {e}", path.display())))?
        .len();
    let context_length = info.arch_uint("context_length").unwrap_or(0);
    let n_ctx = if context_length == 0 {
        DEFAULT_CONTEXT
    } else {
        context_length.min(DEFAULT_CONTEXT)
    };
    Ok(ModelRow {
        name: name.to_owned(),
        file: file_name.to_owned(),
        sha256,
        size,
        architecture: info.architecture().unwrap_or("unknown").to_owned(),
        quantization: info.quantization(),
        context_length,
        parameters: info.parameters(),
        ram_needed_bytes: ram_needed(&info, size, n_ctx),
        license: info
            .string("general.license")
            .map(str::to_owned)
            .unwrap_or_default(),
        added_at: now.to_owned(),
        verified_at: now.to_owned(),
        verified_stamp: String::new(),
    })
}

/// Registers a model file a bundle placed in `<state-dir>/models/<file_name>` (its hash was
/// verified against the signed bundle manifest while it was staged).
///
/// # Errors
/// [`ModelError`] when the file is not a complete GGUF model or the store fails.
pub fn register_placed(
    store: &Store,
    state_dir: &Path,
    file_name: &str,
    sha256: String,
    now: &str,
) -> Result<ModelRow, ModelError> {
    let path = models_dir(state_dir).join(file_name);
    let name = file_name.trim_end_matches(".gguf");
    let mut row = describe(name, file_name, &path, sha256, now)?;
    let meta = std::fs::metadata(&path)
        .map_err(|e| ModelError::Io(format!("cannot stat {}: {e}", path.display())))?;
    row.verified_stamp = file_stamp(&meta);
    store.put_model(&row)?;
    Ok(row)
}

fn copy_synced(from: &Path, to: &Path) -> Result<(), ModelError> {
    let io = |e: std::io::Error| {
        ModelError::Io(format!(
            "cannot copy {} to {}: {e}",
            from.display(),
            to.display()
        ))
    };
    let mut src = std::fs::File::open(from).map_err(io)?;
    let mut dst = std::fs::File::create(to).map_err(io)?;
    let len = src.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(len, "copying");
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = src.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).map_err(io)?;
        done += n as u64;
        bar.set_position(done);
    }
    dst.sync_all().map_err(io)?;
    bar.finish_and_clear();
    Ok(())
}

/// The registered model `name`.
///
/// # Errors
/// [`ModelError::Unknown`] listing what is registered.
pub fn find(store: &Store, name: &str) -> Result<ModelRow, ModelError> {
    let all = store.models()?;
    let names = available(&all);
    all.into_iter()
        .find(|m| m.name == name)
        .ok_or(ModelError::Unknown {
            asked: name.to_owned(),
            available: names,
        })
}

fn available(all: &[ModelRow]) -> String {
    if all.is_empty() {
        "none (add one with `follower models add FILE.gguf`)".into()
    } else {
        all.iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The model a step without an explicit `model:` uses: the only one registered.
///
/// # Errors
/// [`ModelError::Unknown`] when none or several are registered.
pub fn only(store: &Store) -> Result<ModelRow, ModelError> {
    let mut all = store.models()?;
    if all.len() == 1 {
        return Ok(all.remove(0));
    }
    Err(ModelError::Unknown {
        asked: "(the step names none)".into(),
        available: if all.is_empty() {
            available(&all)
        } else {
            format!(
                "{} — name one in the step (`model:`) or pass --model",
                available(&all)
            )
        },
    })
}

/// What [`verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// The file is unchanged since it was last hashed (identity and header checked).
    Unchanged,
    /// The file was hashed again and has the registered hash.
    Rehashed,
}

/// Checks a registered model before use: the header and tensor bounds always; the hash when the
/// file's identity changed since it was last hashed, or always with `full`.
///
/// # Errors
/// [`ModelError::BadFile`] or [`ModelError::Mismatch`]: the file must not be loaded.
pub fn verify(
    store: &Store,
    state_dir: &Path,
    row: &ModelRow,
    full: bool,
    now: &str,
) -> Result<(PathBuf, GgufInfo, Verified), ModelError> {
    let path = models_dir(state_dir).join(&row.file);
    let meta = std::fs::metadata(&path).map_err(|e| ModelError::BadFile {
        path: path.clone(),
        reason: format!("cannot open: {e}"),
    })?;
    if meta.len() != row.size {
        return Err(ModelError::Mismatch {
            path,
            what: "size",
            found: meta.len().to_string(),
            expected: row.size.to_string(),
            source_of_truth: format!("registered for `{}`", row.name),
        });
    }
    let info = check_file(&path)?;
    let stamp = file_stamp(&meta);
    if !full && stamp == row.verified_stamp {
        return Ok((path, info, Verified::Unchanged));
    }
    let sha256 = hash_file(&path, &format!("verifying {}", row.name))?;
    if sha256 != row.sha256 {
        // Forget the last good stamp: nothing may load this file again without a hash that
        // matches, whatever its stamp becomes.
        store.mark_model_verified(&row.name, &row.verified_at, "")?;
        return Err(ModelError::Mismatch {
            path,
            what: "sha256",
            found: sha256,
            expected: row.sha256.clone(),
            source_of_truth: format!("registered for `{}`", row.name),
        });
    }
    store.mark_model_verified(&row.name, now, &stamp)?;
    Ok((path, info, Verified::Rehashed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        let mut seen = 0;
        let h = sha256_of(&b"abc"[..], |n| seen = n).unwrap();
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(seen, 3);
    }

    #[test]
    fn the_repository_manifest_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/models.toml");
        let m = read_manifest(&p).unwrap();
        assert!(
            m.iter()
                .any(|e| e.name == "SmolLM2-135M-Instruct.Q4_1" && e.sha256.len() == 64)
        );
    }
}
