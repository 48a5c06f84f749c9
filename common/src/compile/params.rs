//! Parameters consumed by name (leftovers are reported), and typed accessors that say what
//! was expected and what was found.

use super::cx::{Cx, Params};
use crate::trace::Template;
use serde_norway::Value;

impl Cx {
    pub(crate) fn req_path(&mut self, p: &mut Params<'_>) -> Option<Template> {
        match self
            .opt_string(p, "path")
            .or_else(|| self.opt_string(p, "file_path"))
        {
            Some(s) => Some(Template(s)),
            None => {
                self.error(
                    p.line,
                    format!("{}: missing required parameter `path`", p.what),
                );
                None
            }
        }
    }

    pub(crate) fn req_template(&mut self, p: &mut Params<'_>, key: &str) -> Option<Template> {
        self.req_string(p, key).map(Template)
    }

    pub(crate) fn req_string(&mut self, p: &mut Params<'_>, key: &str) -> Option<String> {
        let v = self.opt_string(p, key);
        if v.is_none() && !p.map.contains_key(key) {
            self.error(
                p.line,
                format!("{}: missing required parameter `{key}`", p.what),
            );
        }
        v
    }

    pub(crate) fn opt_string(&mut self, p: &mut Params<'_>, key: &str) -> Option<String> {
        let v = p.map.remove(key)?;
        match scalar_text(&v) {
            Some(s) => Some(s),
            None => {
                self.error(
                    p.line_of(key),
                    format!(
                        "{}: parameter `{key}`: expected text, found {}",
                        p.what,
                        kind_of(&v)
                    ),
                );
                None
            }
        }
    }

    pub(crate) fn opt_u64(&mut self, p: &mut Params<'_>, key: &str) -> Option<u64> {
        let v = p.map.remove(key)?;
        match v.as_u64() {
            Some(n) => Some(n),
            None => {
                self.error(
                    p.line_of(key),
                    format!(
                        "{}: parameter `{key}`: expected a non-negative integer, found {}",
                        p.what,
                        kind_of(&v)
                    ),
                );
                None
            }
        }
    }

    pub(crate) fn opt_bool(&mut self, p: &mut Params<'_>, key: &str) -> Option<bool> {
        let v = p.map.remove(key)?;
        match v.as_bool() {
            Some(b) => Some(b),
            None => {
                self.error(
                    p.line_of(key),
                    format!(
                        "{}: parameter `{key}`: expected true or false, found {}",
                        p.what,
                        kind_of(&v)
                    ),
                );
                None
            }
        }
    }

    pub(crate) fn opt_f64(&mut self, p: &mut Params<'_>, key: &str) -> Option<f64> {
        let v = p.map.remove(key)?;
        match v.as_f64() {
            Some(n) => Some(n),
            None => {
                self.error(
                    p.line_of(key),
                    format!(
                        "{}: parameter `{key}`: expected a number, found {}",
                        p.what,
                        kind_of(&v)
                    ),
                );
                None
            }
        }
    }

    /// Reports parameters nobody consumed.
    pub(crate) fn finish(&mut self, p: Params<'_>) {
        for key in p.map.keys() {
            self.error(
                p.line_of(key),
                format!("{}: unknown parameter `{key}`", p.what),
            );
        }
    }
}

/// Text of a YAML scalar (strings, numbers and booleans as written); `None` for collections.
pub(crate) fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
