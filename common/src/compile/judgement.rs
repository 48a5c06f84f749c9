//! An LLM step's reference examples and answer policy (`examples:`, `min_fidelity:`,
//! `min_answer_confidence:`, `on_uncertain:`, `few_shot:`), checked against the step: every
//! example binds the variables the prompt and system message use (and no others), and its
//! expected answer fits the step's constraint — a field of the JSON Schema, or one of the
//! alternatives of a grammar that is a choice of literals.

use super::cx::{Cx, Params};
use super::params::{kind_of, scalar_text};
use crate::ids::VarName;
use crate::judgement::{
    DEFAULT_MIN_FIDELITY, Example, Expect, Judgement, MAX_EXAMPLES, OnUncertain,
};
use crate::trace::Template;
use serde_norway::Value;
use std::collections::BTreeSet;

/// The step's constraint, as the examples are checked against it.
pub(crate) struct Constraint<'a> {
    pub(crate) grammar: Option<&'a str>,
    pub(crate) json_schema: Option<&'a str>,
}

impl Cx {
    pub(crate) fn lower_judgement(
        &mut self,
        p: &mut Params<'_>,
        prompt: &Template,
        system: Option<&Template>,
        constraint: &Constraint<'_>,
    ) -> Judgement {
        let used: BTreeSet<&str> = prompt
            .variables()
            .into_iter()
            .chain(system.into_iter().flat_map(Template::variables))
            .collect();
        let examples = match p.map.remove("examples") {
            None => Vec::new(),
            Some(Value::Sequence(items)) => {
                let line = p.line_of("examples");
                if items.len() > MAX_EXAMPLES {
                    self.error(
                        line,
                        format!(
                            "{}: {} examples: expected at most {MAX_EXAMPLES}",
                            p.what,
                            items.len()
                        ),
                    );
                }
                let alternatives = constraint.grammar.and_then(literal_alternatives);
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| {
                        self.example(p, line, i + 1, v, &used, constraint, alternatives.as_ref())
                    })
                    .collect()
            }
            Some(other) => {
                self.error(
                    p.line_of("examples"),
                    format!(
                        "{}: `examples`: expected a list of {{vars: …, expect: …}}, found {}",
                        p.what,
                        kind_of(&other)
                    ),
                );
                Vec::new()
            }
        };
        let min_fidelity = self.unit_interval(p, "min_fidelity");
        if min_fidelity.is_some() && examples.is_empty() {
            self.error(
                p.line_of("min_fidelity"),
                format!(
                    "{}: `min_fidelity` without `examples`: fidelity is measured on the step's examples",
                    p.what
                ),
            );
        }
        let min_answer_confidence = self.unit_interval(p, "min_answer_confidence");
        if min_answer_confidence.is_some()
            && constraint.grammar.is_none()
            && constraint.json_schema.is_none()
        {
            self.error(
                p.line_of("min_answer_confidence"),
                format!(
                    "{}: `min_answer_confidence` needs a `grammar` or `json_schema`: confidence is measured on constrained answers",
                    p.what
                ),
            );
        }
        let on_uncertain = self.on_uncertain(p);
        let few_shot = self.opt_u64(p, "few_shot").unwrap_or(0);
        if few_shot > 0 && few_shot >= examples.len() as u64 {
            self.error(
                p.line_of("few_shot"),
                format!(
                    "{}: `few_shot` is {few_shot} with {} examples: expected fewer, since the examples in the prompt are never the ones scored",
                    p.what,
                    examples.len()
                ),
            );
        }
        Judgement {
            examples,
            min_fidelity: min_fidelity.unwrap_or(DEFAULT_MIN_FIDELITY),
            min_answer_confidence,
            on_uncertain,
            few_shot: u32::try_from(few_shot).unwrap_or(u32::MAX),
        }
    }

    fn unit_interval(&mut self, p: &mut Params<'_>, key: &str) -> Option<f32> {
        let v = self.opt_f64(p, key)?;
        if !(0.0..=1.0).contains(&v) {
            self.error(
                p.line_of(key),
                format!("{}: `{key}` is {v}: expected 0 to 1", p.what),
            );
            return None;
        }
        Some(v as f32)
    }

    fn on_uncertain(&mut self, p: &mut Params<'_>) -> OnUncertain {
        let line = p.line_of("on_uncertain");
        match p.map.remove("on_uncertain") {
            None => OnUncertain::Escalate,
            Some(Value::String(s)) if s == "escalate" || s == "human_escalate" => {
                OnUncertain::Escalate
            }
            Some(Value::String(s)) if s == "accept" => OnUncertain::Accept,
            Some(Value::Mapping(m)) if m.len() == 1 => {
                match m.get("fallback_step").and_then(Value::as_u64) {
                    Some(n) => OnUncertain::Fallback(u32::try_from(n).unwrap_or(u32::MAX)),
                    None => {
                        self.error(line, format!("{}: `on_uncertain`: expected escalate, accept or {{fallback_step: N}}", p.what));
                        OnUncertain::Escalate
                    }
                }
            }
            Some(other) => {
                let found = scalar_text(&other)
                    .map_or_else(|| kind_of(&other).to_owned(), |s| format!("{s:?}"));
                self.error(line, format!("{}: `on_uncertain` is {found}: expected escalate, accept or {{fallback_step: N}}", p.what));
                OnUncertain::Escalate
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn example(
        &mut self,
        p: &Params<'_>,
        line: usize,
        n: usize,
        v: &Value,
        used: &BTreeSet<&str>,
        constraint: &Constraint<'_>,
        alternatives: Option<&Vec<String>>,
    ) -> Option<Example> {
        let what = format!("{}: example {n}", p.what);
        let Value::Mapping(m) = v else {
            self.error(
                line,
                format!(
                    "{what}: expected a mapping {{vars: …, expect: …}}, found {}",
                    kind_of(v)
                ),
            );
            return None;
        };
        for key in m.keys() {
            let k = scalar_text(key).unwrap_or_default();
            if !["vars", "expect", "expect_regex"].contains(&k.as_str()) {
                self.error(
                    line,
                    format!("{what}: unknown key `{k}`: expected vars, expect or expect_regex"),
                );
            }
        }
        let mut vars = Vec::new();
        match m.get("vars") {
            None if used.is_empty() => {}
            Some(Value::Mapping(vm)) => {
                for (k, val) in vm {
                    let name = scalar_text(k).unwrap_or_default();
                    let Some(text) = scalar_text(val) else {
                        self.error(
                            line,
                            format!(
                                "{what}: variable `{name}`: expected text, found {}",
                                kind_of(val)
                            ),
                        );
                        continue;
                    };
                    match name.parse::<VarName>() {
                        Ok(var) if used.contains(var.as_str()) => vars.push((var, text)),
                        Ok(var) => self.error(
                            line,
                            format!("{what} binds `{var}`, which the step's prompt and system message do not use"),
                        ),
                        Err(e) => self.error(line, format!("{what}: {e}")),
                    }
                }
            }
            Some(other) => {
                self.error(
                    line,
                    format!(
                        "{what}: `vars`: expected a mapping of variable to value, found {}",
                        kind_of(other)
                    ),
                );
                return None;
            }
            None => {}
        }
        vars.sort();
        for missing in used
            .iter()
            .filter(|u| !vars.iter().any(|(v, _)| v.as_str() == **u))
        {
            self.error(
                line,
                format!("{what} does not bind `{{{missing}}}`, which the step uses"),
            );
        }
        let expect = match (m.get("expect"), m.get("expect_regex")) {
            (Some(_), Some(_)) | (None, None) => {
                self.error(
                    line,
                    format!("{what}: expected exactly one of `expect` and `expect_regex`"),
                );
                return None;
            }
            (None, Some(r)) => {
                let Some(r) = scalar_text(r) else {
                    self.error(line, format!("{what}: `expect_regex`: expected text"));
                    return None;
                };
                if let Err(e) = regex::RegexBuilder::new(&r).size_limit(1 << 20).build() {
                    self.error(
                        line,
                        format!("{what}: `expect_regex` is not a valid regular expression: {e}"),
                    );
                    return None;
                }
                if constraint.json_schema.is_some() {
                    self.error(line, format!("{what}: the step has a json_schema: expected `expect` as a mapping of the fields compared"));
                    return None;
                }
                Expect::Regex(r)
            }
            (Some(e), None) => self.expect(&what, line, e, constraint, alternatives)?,
        };
        Some(Example { vars, expect })
    }

    fn expect(
        &mut self,
        what: &str,
        line: usize,
        e: &Value,
        constraint: &Constraint<'_>,
        alternatives: Option<&Vec<String>>,
    ) -> Option<Expect> {
        if let Some(schema) = constraint.json_schema {
            let Value::Mapping(_) = e else {
                self.error(line, format!("{what}: the step has a json_schema: expected `expect` as a mapping of the fields compared, found {}", kind_of(e)));
                return None;
            };
            let fields = match serde_json::to_value(e) {
                Ok(serde_json::Value::Object(f)) => f,
                _ => {
                    self.error(
                        line,
                        format!("{what}: `expect` is not representable as a JSON object"),
                    );
                    return None;
                }
            };
            let schema: serde_json::Value = serde_json::from_str(schema).ok()?;
            for (field, value) in &fields {
                match schema.get("properties").and_then(|p| p.get(field)) {
                    Some(sub) => {
                        if let Ok(v) = jsonschema::validator_for(sub)
                            && let Err(err) = v.validate(value)
                        {
                            self.error(line, format!("{what}: field `{field}` = {value} does not fit the step's json_schema: {err}"));
                        }
                    }
                    None if schema.get("properties").is_some() => self.error(
                        line,
                        format!(
                            "{what}: field `{field}` is not a property of the step's json_schema"
                        ),
                    ),
                    None => {}
                }
            }
            return Some(Expect::Fields(
                serde_json::Value::Object(fields).to_string(),
            ));
        }
        let Some(text) = scalar_text(e) else {
            self.error(
                line,
                format!(
                    "{what}: `expect`: expected the answer as text, found {}",
                    kind_of(e)
                ),
            );
            return None;
        };
        if let Some(alts) = alternatives
            && !alts.iter().any(|a| a.trim() == text.trim())
        {
            self.error(
                line,
                format!(
                    "{what}: `expect` is {text:?}, which the step's grammar cannot produce: expected one of {}",
                    alts.iter()
                        .map(|a| format!("{a:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            return None;
        }
        Some(Expect::Text(text))
    }
}

/// The strings a grammar can produce when it is one rule `root ::= "a" | "b" | …` of plain
/// double-quoted literals (the label grammar of a classification step); `None` for any other
/// grammar (its examples are not checked against it here: the device measures them).
pub(crate) fn literal_alternatives(grammar: &str) -> Option<Vec<String>> {
    let body: String = grammar
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    let (head, rhs) = body.split_once("::=")?;
    if head.trim() != "root" || rhs.contains("::=") {
        return None;
    }
    rhs.split('|')
        .map(|alt| {
            let alt = alt.trim();
            let inner = alt.strip_prefix('"')?.strip_suffix('"')?;
            if inner.contains(['"', '\\']) {
                return None;
            }
            Some(inner.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::literal_alternatives;
    use crate::compile::compile_source;
    use crate::judgement::{Expect, OnUncertain};
    use crate::trace::Tool;

    /// A one-step (plus a fallback) trace whose LLM step has `params` (YAML lines at the
    /// indentation of `parameters:`'s children).
    fn source(params: &str) -> String {
        format!(
            "---\ntrace_id: judge\nversion: \"1.0.0\"\ngoal_signature: judge\ninputs:\n  entry:\n    default: x\n---\n\n### Step 1: Judge\n\n**Tool Call**:\n```yaml\ntool: LLM\nparameters:\n  prompt: \"Entry: {{entry}}. tcp or udp?\"\n{params}```\n\n**Dependencies**: None\n\n### Step 2: Ask a person\n\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"echo ask\"\n```\n\n**Dependencies**: None\n"
        )
    }

    fn errors(params: &str) -> String {
        match compile_source("judge.trace.md", &source(params)) {
            Ok(_) => String::new(),
            Err(d) => d.to_string(),
        }
    }

    const GRAMMAR: &str = "  grammar: 'root ::= \"tcp\" | \"udp\"'\n";

    #[test]
    fn examples_thresholds_and_policy_compile_into_the_step() {
        let params = format!(
            "{GRAMMAR}  examples:\n    - vars: {{entry: \"ssh 22/___\"}}\n      expect: tcp\n    - vars: {{entry: \"ntp 123/___\"}}\n      expect: udp\n    - vars: {{entry: \"x 1/___\"}}\n      expect_regex: \"^(tcp|udp)$\"\n  min_fidelity: 0.9\n  min_answer_confidence: 0.6\n  on_uncertain: {{fallback_step: 2}}\n  few_shot: 1\n"
        );
        let (trace, _) = compile_source("judge.trace.md", &source(&params)).unwrap();
        let Tool::Llm(call) = &trace.steps[0].tool else {
            panic!("not an LLM step")
        };
        let j = &call.judgement;
        assert_eq!(j.examples.len(), 3);
        assert_eq!(j.examples[0].var("entry"), Some("ssh 22/___"));
        assert_eq!(j.examples[1].expect, Expect::Text("udp".into()));
        assert_eq!(j.examples[2].expect, Expect::Regex("^(tcp|udp)$".into()));
        assert_eq!((j.min_fidelity, j.min_answer_confidence), (0.9, Some(0.6)));
        assert_eq!(j.on_uncertain, OnUncertain::Fallback(2));
        assert_eq!(j.shots().len(), 1);
        assert_eq!(j.scored().len(), 2);
        // Compiled and decoded again, invariants included.
        let back = crate::compiled::decode_compiled(&crate::compiled::encode_compiled(&trace));
        assert_eq!(back.unwrap(), trace);
    }

    #[test]
    fn the_default_min_fidelity_is_0_8_with_examples() {
        let params = format!("{GRAMMAR}  examples:\n    - vars: {{entry: a}}\n      expect: tcp\n");
        let (trace, _) = compile_source("judge.trace.md", &source(&params)).unwrap();
        let Tool::Llm(call) = &trace.steps[0].tool else {
            panic!()
        };
        assert_eq!(call.judgement.min_fidelity, 0.8);
        assert_eq!(call.judgement.on_uncertain, OnUncertain::Escalate);
    }

    #[test]
    fn examples_that_do_not_fit_the_step_are_refused_with_what_was_expected() {
        let cases = [
            (
                format!("{GRAMMAR}  examples:\n    - vars: {{entry: a}}\n      expect: sctp\n"),
                "`expect` is \"sctp\", which the step's grammar cannot produce: expected one of \"tcp\", \"udp\"",
            ),
            (
                format!("{GRAMMAR}  examples:\n    - vars: {{other: a}}\n      expect: tcp\n"),
                "binds `other`, which the step's prompt and system message do not use",
            ),
            (
                format!("{GRAMMAR}  examples:\n    - vars: {{}}\n      expect: tcp\n"),
                "does not bind `{entry}`",
            ),
            (
                format!("{GRAMMAR}  examples:\n    - vars: {{entry: a}}\n"),
                "expected exactly one of `expect` and `expect_regex`",
            ),
            (
                format!("{GRAMMAR}  examples:\n    - vars: {{entry: a}}\n      expect_regex: \"(\"\n"),
                "`expect_regex` is not a valid regular expression",
            ),
            (
                format!("{GRAMMAR}  examples:\n    - vars: {{entry: a}}\n      expect: tcp\n  few_shot: 1\n"),
                "`few_shot` is 1 with 1 examples: expected fewer",
            ),
            (
                format!("{GRAMMAR}  min_fidelity: 0.9\n"),
                "`min_fidelity` without `examples`",
            ),
            (
                "  min_answer_confidence: 0.5\n".to_owned(),
                "`min_answer_confidence` needs a `grammar` or `json_schema`",
            ),
            (
                format!("{GRAMMAR}  min_answer_confidence: 1.5\n"),
                "`min_answer_confidence` is 1.5: expected 0 to 1",
            ),
            (
                format!("{GRAMMAR}  on_uncertain: retry\n"),
                "`on_uncertain` is \"retry\": expected escalate, accept or {fallback_step: N}",
            ),
            (
                format!("{GRAMMAR}  on_uncertain: {{fallback_step: 7}}\n"),
                "on_uncertain fallback_step 7 of step 1 does not exist",
            ),
            (
                "  json_schema: '{\"type\":\"object\",\"properties\":{\"risk\":{\"enum\":[\"low\",\"high\"]}}}'\n  examples:\n    - vars: {entry: a}\n      expect: {risk: medium}\n".to_owned(),
                "field `risk` = \"medium\" does not fit the step's json_schema",
            ),
            (
                "  json_schema: '{\"type\":\"object\",\"properties\":{\"risk\":{\"type\":\"string\"}}}'\n  examples:\n    - vars: {entry: a}\n      expect: low\n".to_owned(),
                "the step has a json_schema: expected `expect` as a mapping",
            ),
        ];
        for (params, wanted) in cases {
            let e = errors(&params);
            assert!(e.contains(wanted), "{params}\n→ {e}\nexpected: {wanted}");
        }
    }

    #[test]
    fn literal_alternatives_of_a_label_grammar_only() {
        assert_eq!(
            literal_alternatives("root ::= \"tcp\" | \"udp\"\n"),
            Some(vec!["tcp".into(), "udp".into()])
        );
        assert_eq!(
            literal_alternatives("root ::=\n  \"yes\"\n  | \"no\" # comment\n"),
            Some(vec!["yes".into(), "no".into()])
        );
        assert_eq!(literal_alternatives("root ::= [a-z]+"), None);
        assert_eq!(literal_alternatives("root ::= a\na ::= \"x\""), None);
        assert_eq!(literal_alternatives("root ::= \"a\\\"b\""), None);
    }
}
