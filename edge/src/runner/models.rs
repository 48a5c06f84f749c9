//! The models a run's LLM steps use: `--model FILE` as the default, other names from the
//! device's registry, each checked before llama.cpp sees it.

use crate::infer::{ModelSpec, model_name_of};
use crate::store::{ModelRow, Store};
use anyhow::{Context, Result};
use std::path::Path;
use tracefleet::Trace;
use tracefleet::time::rfc3339_now;

/// The models a run's LLM steps use, each checked before llama.cpp sees it, and the default
/// for steps that name none. `--model FILE` is the default (named by its file stem); other
/// names come from the device's registry, whose files are hashed again when they changed since
/// they were last verified.
///
/// # Errors
/// A step needs a model that is neither given nor registered, or a model fails its check.
pub fn run_models(
    store: &Store,
    state_dir: &Path,
    trace: &Trace,
    model_file: Option<&Path>,
) -> Result<(Vec<ModelSpec>, Option<String>)> {
    let mut specs: Vec<ModelSpec> = Vec::new();
    let mut default = None;
    if let Some(file) = model_file {
        let name = model_name_of(file);
        specs.push(ModelSpec::from_file(&name, file)?);
        default = Some(name);
    }
    let now = rfc3339_now();
    let add_registered = |row: ModelRow, specs: &mut Vec<ModelSpec>| -> Result<String> {
        if !specs.iter().any(|s| s.name == row.name) {
            specs.push(registered_spec(store, state_dir, &row, &now)?);
        }
        Ok(row.name)
    };
    for step in trace.llm_steps() {
        let tracefleet::trace::Tool::Llm(call) = &step.tool else {
            continue;
        };
        let found = match &call.model {
            Some(name) if specs.iter().any(|s| &s.name == name) => Ok(()),
            Some(name) => crate::models::find(store, name)
                .map_err(anyhow::Error::from)
                .and_then(|row| add_registered(row, &mut specs).map(|_| ())),
            None if default.is_some() => Ok(()),
            None => crate::models::only(store)
                .map_err(anyhow::Error::from)
                .and_then(|row| add_registered(row, &mut specs))
                .map(|name| default = Some(name)),
        };
        found.with_context(|| {
            format!(
                "trace {} step {} needs a model (pass --model FILE.gguf, set TRACEFLEET_MODEL, or register one with `follower models add`)",
                trace.id, step.number
            )
        })?;
    }
    Ok((specs, default))
}

/// A registered model checked for use ([`crate::models::verify`]: header, and the hash when
/// the file changed), described by the header that check read.
///
/// # Errors
/// The model's file fails its check.
pub fn registered_spec(
    store: &Store,
    state_dir: &Path,
    row: &ModelRow,
    now: &str,
) -> Result<ModelSpec> {
    let (path, info, _) = crate::models::verify(store, state_dir, row, false, now)?;
    Ok(ModelSpec {
        name: row.name.clone(),
        path,
        info,
        size: row.size,
    })
}
