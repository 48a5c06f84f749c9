//! Checks: validations, pre- and postconditions evaluated against a step's output or a file,
//! JSON Schema validation, and [`check_supported`], which refuses before anything runs what
//! this follower cannot enforce.

use super::*;
use tracefleet::Trace;
use tracefleet::report::CheckResult;
use tracefleet::trace::{Check, CheckKind, Template, Tool};

/// Refuses, before anything runs, a trace that uses what this follower cannot execute yet.
///
/// # Errors
/// What is unsupported and where (step number).
pub fn check_supported(trace: &Trace) -> Result<(), String> {
    for s in &trace.steps {
        if let Tool::Bash { command } = &s.tool {
            // The compiler checked this too; the follower does not rely on it.
            let (text, _) = command.render_shell(|_| Some("")).unwrap_or_default();
            tracefleet::shell::check(&text, s.allowed_commands.as_deref(), s.command_substitution)
                .map_err(|e| format!("step {}: {e}", s.number))?;
        }
    }
    Ok(())
}

/// Most schema violations a json_schema check reports.
const MAX_SCHEMA_ERRORS: usize = 5;

/// Why `text` is not JSON conforming to `schema` (JSON text), or `None` when it is.
///
/// # Errors
/// The schema itself is not usable (the compiler checked it; a tampered file could differ).
pub(super) fn schema_violation(schema: &str, text: &str) -> Result<Option<String>, String> {
    let instance = match serde_json::from_str::<serde_json::Value>(text.trim()) {
        Ok(v) => v,
        Err(e) => {
            return Ok(Some(format!(
                "expected JSON, found an error at line {} column {}: {e}",
                e.line(),
                e.column()
            )));
        }
    };
    let schema: serde_json::Value =
        serde_json::from_str(schema).map_err(|e| format!("the trace's schema is not JSON: {e}"))?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| format!("the trace's schema is not usable: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .take(MAX_SCHEMA_ERRORS)
        .map(|e| {
            let at = e.instance_path().to_string();
            format!("at {}: {e}", if at.is_empty() { "/" } else { &at })
        })
        .collect();
    Ok((!errors.is_empty())
        .then(|| format!("expected JSON matching the schema: {}", errors.join("; "))))
}

/// Evaluates one check. `output`/`exit_code` are the step's (absent for pre/postconditions).
pub(super) fn check(
    c: &Check,
    vars: &Vars,
    host: &mut dyn Host,
    output: Option<&str>,
    exit_code: Option<i32>,
) -> CheckResult {
    let (passed, detail) = match evaluate(&c.kind, vars, host, output, exit_code) {
        Ok(r) => r,
        Err(e) => (false, e),
    };
    CheckResult {
        check: c.description.clone(),
        kind: c.kind.type_name().to_owned(),
        passed,
        detail,
    }
}

fn subject(
    path: &Option<Template>,
    vars: &Vars,
    host: &mut dyn Host,
    output: Option<&str>,
) -> Result<String, String> {
    match (path, output) {
        (Some(p), _) => {
            let p = vars.render(p)?;
            host.read_file(&p, None, None)
        }
        (None, Some(o)) => Ok(o.to_owned()),
        (None, None) => Err("no `path` given and no step output to check".into()),
    }
}

fn evaluate(
    kind: &CheckKind,
    vars: &Vars,
    host: &mut dyn Host,
    output: Option<&str>,
    exit_code: Option<i32>,
) -> Result<(bool, String), String> {
    Ok(match kind {
        CheckKind::FileExists { path } => {
            let p = vars.render(path)?;
            match host.file_kind(&p)? {
                FileKind::File(n) => (true, format!("{p} is a file of {n} bytes")),
                other => (
                    false,
                    format!("expected a file at {p}, found {}", describe(other)),
                ),
            }
        }
        CheckKind::DirectoryExists { path } => {
            let p = vars.render(path)?;
            match host.file_kind(&p)? {
                FileKind::Directory => (true, format!("{p} is a directory")),
                other => (
                    false,
                    format!("expected a directory at {p}, found {}", describe(other)),
                ),
            }
        }
        CheckKind::ContentContains { path, text } => {
            let s = subject(path, vars, host, output)?;
            let t = vars.render(text)?;
            let ok = s.contains(&t);
            (
                ok,
                if ok {
                    format!("found {t:?}")
                } else {
                    format!(
                        "expected the content to contain {t:?}; it does not ({} bytes)",
                        s.len()
                    )
                },
            )
        }
        CheckKind::ContentNotContains { path, text } => {
            let s = subject(path, vars, host, output)?;
            let t = vars.render(text)?;
            let ok = !s.contains(&t);
            (
                ok,
                if ok {
                    format!("{t:?} absent")
                } else {
                    format!("expected the content not to contain {t:?}; it does")
                },
            )
        }
        CheckKind::ContentNotEmpty { path } => {
            let s = subject(path, vars, host, output)?;
            let ok = !s.trim().is_empty();
            (
                ok,
                if ok {
                    format!("{} bytes", s.len())
                } else {
                    "expected non-empty content, found only whitespace or nothing".into()
                },
            )
        }
        CheckKind::RegexMatch { path, pattern } => {
            let s = subject(path, vars, host, output)?;
            let re = regex::RegexBuilder::new(pattern)
                .multi_line(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
            let ok = re.is_match(&s);
            (
                ok,
                if ok {
                    format!("matches /{pattern}/")
                } else {
                    format!(
                        "expected a match for /{pattern}/, found none in {} bytes",
                        s.len()
                    )
                },
            )
        }
        CheckKind::CommandExitCode { expected } => match exit_code {
            Some(c) if c == *expected => (true, format!("exit code {c}")),
            Some(c) => (false, format!("expected exit code {expected}, found {c}")),
            None => (
                false,
                format!("expected exit code {expected}, found no exit code"),
            ),
        },
        CheckKind::FileSizeMinimum { path, bytes } => {
            let size = match path {
                Some(p) => {
                    let p = vars.render(p)?;
                    match host.file_kind(&p)? {
                        FileKind::File(n) => n,
                        other => {
                            return Ok((
                                false,
                                format!("expected a file at {p}, found {}", describe(other)),
                            ));
                        }
                    }
                }
                None => output.map_or(0, |o| o.len() as u64),
            };
            let ok = size >= *bytes;
            (
                ok,
                if ok {
                    format!("{size} bytes ≥ {bytes}")
                } else {
                    format!("expected at least {bytes} bytes, found {size}")
                },
            )
        }
        CheckKind::JsonValid { path } => {
            let s = subject(path, vars, host, output)?;
            match serde_json::from_str::<serde_json::Value>(s.trim()) {
                Ok(_) => (true, "valid JSON".into()),
                Err(e) => (
                    false,
                    format!(
                        "expected valid JSON, found an error at line {} column {}: {e}",
                        e.line(),
                        e.column()
                    ),
                ),
            }
        }
        CheckKind::JsonSchema { path, schema } => {
            let s = subject(path, vars, host, output)?;
            match schema_violation(schema, &s)? {
                None => (true, "valid against the schema".into()),
                Some(why) => (false, why),
            }
        }
        CheckKind::ContentStructureCheck {
            path,
            required_sections,
        } => {
            let s = subject(path, vars, host, output)?;
            let headings: Vec<String> = s
                .lines()
                .filter_map(|l| l.trim_start().strip_prefix('#'))
                .map(|h| h.trim_start_matches('#').trim().to_lowercase())
                .collect();
            let missing: Vec<&str> = required_sections
                .iter()
                .filter(|r| !headings.contains(&r.trim().to_lowercase()))
                .map(String::as_str)
                .collect();
            if missing.is_empty() {
                (
                    true,
                    format!("all {} sections present", required_sections.len()),
                )
            } else {
                (
                    false,
                    format!(
                        "expected headings {missing:?}, not found among {} headings",
                        headings.len()
                    ),
                )
            }
        }
    })
}

fn describe(k: FileKind) -> &'static str {
    match k {
        FileKind::Missing => "nothing",
        FileKind::File(_) => "a file",
        FileKind::Directory => "a directory",
        FileKind::Other => "a special file",
    }
}
