//! Checks a trace source and lowers it to the IR ([`crate::trace`]). The compiled form's
//! encoding lives in [`crate::compiled`] and is re-exported here.
//!
//! Where LLMunix was lax, this compiler is strict: unknown tools, unknown validation types,
//! unknown or missing parameters, unresolved `{variables}`, dependencies on missing or later
//! steps and duplicate step numbers are errors with `file:line:column`.
//!
//! The lowering, by concern: `raw` (the serde shapes of the YAML blocks), `lower` (the trace:
//! header, inputs, step order, variables, conditions, outputs), `step` (one step: dependencies,
//! tool call, error handling, `foreach`), `tool` (each tool's parameters, JSON Schema),
//! `checks` (validations and pre/postconditions), `judgement` (an LLM step's reference
//! examples and answer policy), `deps` (the step graph and its cycles),
//! `params` (parameters consumed by name, typed accessors).

mod checks;
mod cx;
mod deps;
mod judgement;
mod lower;
mod params;
mod raw;
mod step;
mod tool;

pub use crate::compiled::{
    COMPILED_FORMAT_VERSION, COMPILED_MAGIC, DecodeError, MAX_COMPILED_BYTES, decode_compiled,
    encode_compiled,
};

pub use cx::{CHECK_TYPES, MAX_MAX_TOKENS, TOOLS};

use crate::diag::{Diagnostic, Diagnostics, Severity};
use crate::source;
use crate::trace::Trace;
use cx::Cx;

/// Parses and checks a trace source.
///
/// Returns the trace and any warnings.
///
/// # Errors
/// Every problem found, each with `file:line:column` (warnings included).
pub fn compile_source(file: &str, text: &str) -> Result<(Trace, Vec<Diagnostic>), Diagnostics> {
    let src = source::parse(file, text);
    let mut cx = Cx {
        file: file.to_owned(),
        form: src.form,
        diags: src.diagnostics.clone(),
    };
    let trace = cx.lower(&src);
    let mut diags = Diagnostics(cx.diags);
    diags.sort();
    match trace {
        Some(t) if !diags.has_errors() => Ok((t, diags.0)),
        _ => {
            if !diags.has_errors() {
                diags.0.push(Diagnostic {
                    severity: Severity::Error,
                    file: file.to_owned(),
                    line: 1,
                    column: 1,
                    message: "trace did not compile".into(),
                });
            }
            Err(diags)
        }
    }
}
