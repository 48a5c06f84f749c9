//! Grep and Glob as pure functions over the host's two file primitives
//! ([`Host::list_files`], [`Host::read_file`]), so the path policy is enforced in one place.

use super::*;
use tracefleet::trace::GrepOutput;

/// Lists the files a search covers: `root` itself when it is a file, else every file under
/// it (the base directory when `None`), as paths the host resolves.
fn search_files(host: &mut dyn Host, root: Option<&str>) -> Result<Vec<String>, String> {
    let root = root.unwrap_or(".");
    match host.file_kind(root)? {
        FileKind::File(_) => Ok(vec![root.to_owned()]),
        FileKind::Directory => Ok(host
            .list_files(root)?
            .into_iter()
            .map(|rel| {
                if root == "." {
                    rel
                } else {
                    format!("{}/{rel}", root.trim_end_matches('/'))
                }
            })
            .collect()),
        FileKind::Missing => Err(format!(
            "expected a file or directory at {root}, found nothing"
        )),
        FileKind::Other => Err(format!(
            "expected a file or directory at {root}, found a special file"
        )),
    }
}

pub(super) fn grep(
    host: &mut dyn Host,
    pattern: &str,
    root: Option<&str>,
    name_glob: Option<&str>,
    case_insensitive: bool,
    mode: GrepOutput,
) -> Result<String, String> {
    let re = regex::RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
    let name_glob = name_glob
        .map(glob::Pattern::new)
        .transpose()
        .map_err(|e| format!("invalid glob: {e}"))?;
    let mut out = String::new();
    for file in search_files(host, root)? {
        let name = file.rsplit('/').next().unwrap_or(&file);
        if name_glob.as_ref().is_some_and(|g| !g.matches(name)) {
            continue;
        }
        // Unreadable or oversize files are skipped, as grep -s does.
        let Ok(text) = host.read_file(&file, None, None) else {
            continue;
        };
        let mut count = 0usize;
        for (n, line) in text.lines().enumerate() {
            if re.is_match(line) {
                count += 1;
                if mode == GrepOutput::Content {
                    out.push_str(&format!("{file}:{}:{line}\n", n + 1));
                }
            }
        }
        match mode {
            GrepOutput::FilesWithMatches if count > 0 => out.push_str(&format!("{file}\n")),
            GrepOutput::Count if count > 0 => out.push_str(&format!("{file}:{count}\n")),
            _ => {}
        }
        if out.len() > crate::effects::MAX_STDOUT_BYTES {
            return Err(format!(
                "Grep output exceeds {} bytes: narrow the pattern or path",
                crate::effects::MAX_STDOUT_BYTES
            ));
        }
    }
    Ok(out)
}

pub(super) fn glob_files(
    host: &mut dyn Host,
    pattern: &str,
    root: Option<&str>,
) -> Result<String, String> {
    let g = glob::Pattern::new(pattern).map_err(|e| format!("invalid glob {pattern:?}: {e}"))?;
    let opts = glob::MatchOptions {
        require_literal_separator: true,
        ..glob::MatchOptions::new()
    };
    let root = root.unwrap_or(".");
    let mut out = String::new();
    for rel in host.list_files(root)? {
        if g.matches_with(&rel, opts) {
            if root == "." {
                out.push_str(&rel);
            } else {
                out.push_str(&format!("{}/{rel}", root.trim_end_matches('/')));
            }
            out.push('\n');
        }
    }
    Ok(out)
}
