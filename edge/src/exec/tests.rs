//! Unit tests of the interpreter against a scripted host (moved from `exec.rs` unchanged).

use super::*;
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// A scripted host: shell answers come from a queue; files live in a map.
#[derive(Default)]
struct FakeHost {
    shell_answers: VecDeque<ShellOutput>,
    commands: Vec<(String, Vec<(String, String)>)>,
    files: HashMap<String, String>,
    slept: Vec<Duration>,
    clock: Duration,
    /// Scripted model answers, in order.
    generations: VecDeque<Generation>,
    /// The model requests made, in order.
    requests: Vec<GenerateRequest>,
    /// The size of each batch of model requests.
    batches: Vec<usize>,
}

impl Host for FakeHost {
    fn read_file(&mut self, path: &str, _: Option<u64>, _: Option<u64>) -> Result<String, String> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| format!("no file {path}"))
    }
    fn write_file(&mut self, path: &str, content: &str) -> Result<(), String> {
        self.files.insert(path.to_owned(), content.to_owned());
        Ok(())
    }
    fn list_files(&mut self, dir: &str) -> Result<Vec<String>, String> {
        let prefix = if dir == "." {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut v: Vec<String> = self
            .files
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        v.sort();
        Ok(v)
    }
    fn file_kind(&mut self, path: &str) -> Result<FileKind, String> {
        if path == "."
            || self
                .files
                .keys()
                .any(|k| k.starts_with(&format!("{path}/")))
        {
            return Ok(FileKind::Directory);
        }
        Ok(self
            .files
            .get(path)
            .map_or(FileKind::Missing, |c| FileKind::File(c.len() as u64)))
    }
    fn shell(
        &mut self,
        command: &str,
        env: &[(String, String)],
        _: Duration,
    ) -> Result<ShellOutput, String> {
        self.commands.push((command.to_owned(), env.to_vec()));
        self.shell_answers
            .pop_front()
            .ok_or_else(|| "no scripted answer".to_owned())
    }
    fn generate_batch(&mut self, requests: &[GenerateRequest]) -> Vec<Result<Generation, String>> {
        self.batches.push(requests.len());
        requests.iter().map(|r| self.generate(r)).collect()
    }
    fn generate(&mut self, request: &GenerateRequest) -> Result<Generation, String> {
        self.requests.push(request.clone());
        self.generations
            .pop_front()
            .ok_or_else(|| "no model in this test".into())
    }
    fn sleep(&mut self, d: Duration) {
        self.slept.push(d);
        self.clock += d;
    }
    fn monotonic(&self) -> Duration {
        self.clock
    }
    fn timestamp(&self) -> String {
        "2026-11-21T00:00:00Z".into()
    }
}

fn out(stdout: &str, code: i32) -> ShellOutput {
    ShellOutput {
        signal: None,
        stdout: stdout.into(),
        stderr: String::new(),
        exit_code: Some(code),
    }
}

fn trace(body: &str) -> Trace {
    let src = format!("---\ntrace_id: t\nversion: \"1.0\"\ngoal_signature: g\n{body}");
    tracefleet::compile_source("t.trace.md", &src)
        .unwrap_or_else(|d| panic!("{d}"))
        .0
}

#[test]
fn shell_policy_is_enforced_even_when_the_compiler_was_bypassed() {
    let mut t = trace(
        "---\n### Step 1: a\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: grep x f\nallowed_commands: [grep]\n```\n",
    );
    assert_eq!(check_supported(&t), Ok(()));
    for (command, expected) in [
        (
            "grep x f | rm -rf /",
            "command `rm` is not in allowed_commands [grep]",
        ),
        ("grep x \"$(cat /etc/shadow)\"", "command substitution '$('"),
        ("grep x `id`", "command substitution '`'"),
    ] {
        t.steps[0].tool = Tool::Bash {
            command: Template(command.into()),
        };
        let e = check_supported(&t).unwrap_err();
        assert!(e.starts_with("step 1: ") && e.contains(expected), "{e}");
    }
    t.steps[0].allowed_commands = None;
    t.steps[0].command_substitution = true;
    assert_eq!(check_supported(&t), Ok(()));
}

fn run_with(t: &Trace, host: &mut FakeHost) -> Report {
    let cx = RunContext {
        run_id: "r".into(),
        device_id: "d".parse().unwrap(),
        base_dir: "/b".into(),
        fidelity: BTreeMap::new(),
    };
    let inputs = resolve_inputs(t, &BTreeMap::new()).unwrap();
    let mut events = 0;
    let (mut started, mut finished) = (Vec::new(), Vec::new());
    let r = run(t, &cx, &inputs, host, &mut |e| match e {
        Event::StepStarted(s) => started.push(s.step),
        Event::StepFinished(s, _) => {
            finished.push(s.step);
            events += 1;
        }
        Event::FidelityMeasured(_) => {}
    });
    // Every step that finished was journaled as started, once per run of it.
    started.sort_unstable();
    finished.sort_unstable();
    assert_eq!(started, finished);
    assert_eq!(
        events,
        r.step_results
            .iter()
            .filter(|s| s.status != StepStatus::NotRun)
            .count()
    );
    r
}

const STEP: &str = "### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: check\noutput_variable: first\n```\n**Validation**:\n```yaml\n- check: ready\n  type: content_contains\n  parameters:\n    text: ready\n```\n";

#[test]
fn retry_backs_off_exponentially_then_succeeds() {
    let t = trace(&format!(
        "---\n{STEP}**Error Handling**:\n```yaml\non_error: {{action: retry, retry_count: 3, delay_seconds: 1}}\n```\n"
    ));
    let mut h = FakeHost {
        shell_answers: [out("not yet", 0), out("boom", 1), out("ready", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success);
    assert_eq!(r.step_results[0].attempts, 3);
    assert_eq!(
        h.slept,
        vec![Duration::from_secs(1), Duration::from_secs(2)]
    );
    assert!(r.all_validations_passed);
}

#[test]
fn skip_goes_on_but_never_binds_the_failed_output() {
    let t = trace(&format!(
        "---\n{STEP}**Error Handling**:\n```yaml\non_error: {{action: skip}}\n```\n### Step 2: uses it\n**Tool Call**:\n```yaml\ntool: Write\nparameters:\n  file_path: out.txt\n  content: \"{{first}}\"\n```\n"
    ));
    let mut h = FakeHost {
        shell_answers: [out("not yet", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.step_results[0].status, StepStatus::Skipped);
    assert_eq!(r.step_results[1].status, StepStatus::Failed);
    assert!(
        r.step_results[1]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("`{first}` has no value")
    );
    assert!(!h.files.contains_key("out.txt"));
    assert!(!r.all_validations_passed);
    assert_eq!(r.failed_step, Some(2));
}

#[test]
fn failed_precondition_runs_no_step() {
    let t = trace(&format!(
        "preconditions:\n  - condition: input exists\n    validation_type: file_exists\n    parameters: {{path: in.txt}}\n---\n{STEP}"
    ));
    let mut h = FakeHost::default();
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Failed);
    assert!(!r.all_preconditions_met);
    assert_eq!(r.step_results[0].status, StepStatus::NotRun);
    assert!(h.commands.is_empty());
}

#[test]
fn shell_values_travel_in_the_environment() {
    let t = trace(
        "inputs:\n  target: \"$(reboot)\"\n---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: ls {target}\n```\n",
    );
    let mut h = FakeHost {
        shell_answers: [out("", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success);
    let (cmd, env) = &h.commands[0];
    assert_eq!(cmd, "ls \"${TF_VAR_target}\"");
    assert_eq!(
        env,
        &vec![("TF_VAR_target".to_owned(), "$(reboot)".to_owned())]
    );
}

#[test]
fn json_schema_validation_passes_and_fails_with_the_instance_path() {
    let t = trace(
        "---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: cat r.json\n```\n**Validation**:\n```yaml\n- check: the risk record\n  type: json_schema\n  parameters:\n    schema:\n      type: object\n      required: [risk]\n      properties:\n        risk: {enum: [low, medium, high]}\n        count: {type: integer, minimum: 0}\n```\n",
    );
    for (answer, ok, detail) in [
        (
            r#"{"risk": "low", "count": 3}"#,
            true,
            "valid against the schema",
        ),
        (r#"{"risk": "extreme"}"#, false, "at /risk:"),
        (r#"{"count": -1, "risk": "low"}"#, false, "at /count:"),
        (r#"{"count": 1}"#, false, "\"risk\" is a required property"),
        ("not json", false, "expected JSON, found an error at line 1"),
    ] {
        let mut h = FakeHost {
            shell_answers: [out(answer, 0)].into(),
            ..FakeHost::default()
        };
        let r = run_with(&t, &mut h);
        let v = &r.step_results[0].validations[0];
        assert_eq!(v.passed, ok, "{answer}: {v:?}");
        assert!(v.detail.contains(detail), "{answer}: {}", v.detail);
    }
}

#[test]
fn nonzero_exit_fails_unless_expected() {
    let t = trace(
        "---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: grep x f\n```\n**Validation**:\n```yaml\n- check: no match is fine\n  type: command_exit_code\n  parameters: {expected: 1}\n```\n### Step 2: t\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: false\n```\n",
    );
    let mut h = FakeHost {
        shell_answers: [out("", 1), out("", 1)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.step_results[0].status, StepStatus::Success);
    assert_eq!(r.step_results[1].status, StepStatus::Failed);
    assert!(
        r.step_results[1]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("exited with status 1")
    );
}

#[test]
fn foreach_runs_each_line_and_zero_items_is_a_no_op() {
    let t = trace(
        "inputs:\n  names: \"a\\nb\\n\\nc\"\n---\n### Step 1: each\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo {n}\nforeach: {lines: names, as: n}\n```\n",
    );
    let mut h = FakeHost {
        shell_answers: [out("A\n", 0), out("B\n", 0), out("C\n", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success);
    assert_eq!(r.step_results[0].items, Some(3));
    assert_eq!(r.step_results[0].output, "A\nB\nC");
    let items: Vec<&str> = h
        .commands
        .iter()
        .map(|(_, env)| env[0].1.as_str())
        .collect();
    assert_eq!(items, vec!["a", "b", "c"]);

    let mut empty = BTreeMap::new();
    empty.insert("names".to_owned(), "\n\n".to_owned());
    let inputs = resolve_inputs(&t, &empty).unwrap();
    let cx = RunContext {
        run_id: "r".into(),
        device_id: "d".parse().unwrap(),
        base_dir: "/b".into(),
        fidelity: BTreeMap::new(),
    };
    let mut h = FakeHost::default();
    let r = run(&t, &cx, &inputs, &mut h, &mut |_| {});
    assert_eq!(r.status, RunStatus::Success);
    assert_eq!(r.step_results[0].items, Some(0));
    assert!(h.commands.is_empty());
}

fn generation(text: &str, prompt: u32, completion: u32, secs: f64, stop: &str) -> Generation {
    Generation {
        text: text.into(),
        usage: LlmUsage {
            model: "m".into(),
            prompt_tokens: prompt,
            cached_prompt_tokens: 0,
            completion_tokens: completion,
            // Prompt and generation each took `secs`.
            prompt_tokens_per_sec: f64::from(prompt) / secs,
            generation_tokens_per_sec: f64::from(completion) / secs,
            stop_reason: stop.into(),
            grammar: true,
            answer_confidence: None,
            uncertain: false,
        },
    }
}

fn cached(mut g: Generation, tokens: u32) -> Generation {
    g.usage.cached_prompt_tokens = tokens;
    g
}

#[test]
fn a_foreach_llm_step_reports_the_sums_over_its_items_and_each_items_figures() {
    let t = trace(
        "inputs:\n  lines: \"x\\ny\\nz\"\n---\n### Step 1: judge\n**Tool Call**:\n```yaml\ntool: LLM\nparameters:\n  prompt: \"judge {l}\"\n  grammar: 'root ::= \"a\" | \"b\"'\nforeach: {lines: lines, as: l}\n```\n",
    );
    let mut h = FakeHost {
        generations: [
            generation("a", 100, 1, 1.0, "grammar"),
            cached(generation("b", 200, 3, 1.0, "grammar"), 90),
            cached(generation("a", 300, 2, 2.0, "eos"), 90),
        ]
        .into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success, "{r:?}");
    let s = &r.step_results[0];
    assert_eq!(s.items, Some(3));
    assert_eq!(s.llm_items.len(), 3);
    assert_eq!(
        s.llm_items
            .iter()
            .map(|u| u.prompt_tokens)
            .collect::<Vec<_>>(),
        [100, 200, 300]
    );
    // The items went to the model as one batch, in order.
    assert_eq!(h.batches, [3]);
    assert_eq!(
        h.requests
            .iter()
            .map(|r| r.prompt.as_str())
            .collect::<Vec<_>>(),
        ["judge x", "judge y", "judge z"]
    );
    assert_eq!(
        s.llm_items
            .iter()
            .map(|u| u.cached_prompt_tokens)
            .collect::<Vec<_>>(),
        [0, 90, 90]
    );
    let sum = s.llm.as_ref().unwrap();
    assert_eq!((sum.prompt_tokens, sum.completion_tokens), (600, 6));
    assert_eq!(sum.cached_prompt_tokens, 180);
    // 600 prompt tokens in 1 + 1 + 2 s; 6 generated in the same 4 s.
    assert!((sum.prompt_tokens_per_sec - 150.0).abs() < 1e-9, "{sum:?}");
    assert!(
        (sum.generation_tokens_per_sec - 1.5).abs() < 1e-9,
        "{sum:?}"
    );
    assert_eq!(sum.stop_reason, "mixed");
    assert_eq!((r.prompt_tokens, r.completion_tokens), (600, 6));
}

#[test]
fn foreach_over_a_glob_and_a_failing_item() {
    let t = trace(
        "---\n### Step 1: each log\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: wc -l {f}\nforeach: {glob: \"*.log\", as: f}\n```\n",
    );
    let mut h = FakeHost {
        shell_answers: [out("1\n", 0), out("", 2)].into(),
        ..FakeHost::default()
    };
    h.files.insert("a.log".into(), "x".into());
    h.files.insert("b.log".into(), "y".into());
    h.files.insert("c.txt".into(), "z".into());
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Failed);
    assert!(
        r.step_results[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("item \"b.log\""),
        "{:?}",
        r.step_results[0].error
    );
    assert_eq!(h.commands.len(), 2);
}

#[test]
fn fallback_recovers_and_the_fallback_step_runs_only_in_that_role() {
    let t = trace(
        "---\n### Step 1: primary\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: primary\noutput_variable: got\n```\n**Error Handling**:\n```yaml\non_error: {action: retry, retry_count: 1, fallback_step: 3}\n```\n### Step 2: uses it\n**Tool Call**:\n```yaml\ntool: Write\nparameters:\n  file_path: out.txt\n  content: \"{got}\"\n```\n**Dependencies**: Step 1\n### Step 3: plan b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: plan-b\n```\n**Dependencies**: None\n",
    );
    let mut h = FakeHost {
        shell_answers: [out("", 1), out("", 1), out("from b", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with_events(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert_eq!(r.step_results[0].status, StepStatus::Recovered);
    assert_eq!(r.step_results[0].attempts, 2);
    assert_eq!(r.step_results[2].status, StepStatus::Success);
    // The fallback-only step is not one of the main flow's: 2 of 2, not "2 of 3".
    assert_eq!((r.completed_steps, r.total_steps), (2, 2));
    assert_eq!(h.files.get("out.txt").map(String::as_str), Some("from b"));
    let cmds: Vec<&str> = h.commands.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(
        cmds,
        vec!["primary", "primary", "plan-b"],
        "plan b ran once, as the fallback"
    );
}

#[test]
fn escalation_fails_the_run_and_is_reported() {
    let t = trace(
        "---\n### Step 1: needs a human\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: check\n```\n**Error Handling**:\n```yaml\non_error: {action: human_escalate, escalation_message: \"call the site engineer\"}\n```\n",
    );
    let mut h = FakeHost {
        shell_answers: [out("", 3)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.escalations.len(), 1);
    assert_eq!(r.escalations[0].message, "call the site engineer");
    assert!(r.escalations[0].error.contains("status 3"));
}

fn run_with_events(t: &Trace, host: &mut FakeHost) -> Report {
    let cx = RunContext {
        run_id: "r".into(),
        device_id: "d".parse().unwrap(),
        base_dir: "/b".into(),
        fidelity: BTreeMap::new(),
    };
    let inputs = resolve_inputs(t, &BTreeMap::new()).unwrap();
    run(t, &cx, &inputs, host, &mut |_| {})
}

#[test]
fn a_failing_bash_step_says_what_it_wrote_to_stderr_and_which_signal_killed_it() {
    let t = trace(
        "---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: ls nowhere\n```\n",
    );
    let mut h = FakeHost {
        shell_answers: [ShellOutput {
            stdout: String::new(),
            stderr: "warming up\nls: cannot access 'nowhere': No such file or directory\n".into(),
            exit_code: Some(2),
            signal: None,
        }]
        .into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    let e = r.step_results[0].error.as_deref().unwrap();
    assert_eq!(
        e,
        "command exited with status 2; stderr: warming up | ls: cannot access 'nowhere': No such file or directory"
    );
    let mut h = FakeHost {
        shell_answers: [ShellOutput {
            stdout: String::new(),
            stderr: String::new(),
            exit_code: None,
            signal: Some(9),
        }]
        .into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    let e = r.step_results[0].error.as_deref().unwrap();
    assert_eq!(e, "command was killed by signal 9 (SIGKILL)");
}

/// A scripted answer with a confidence.
fn answer(text: &str, confidence: f64) -> Generation {
    let mut g = generation(text, 10, 1, 1.0, "eos");
    g.usage.answer_confidence = Some(confidence);
    g
}

/// A judgement step with three examples (the first one a few-shot example when `few_shot`),
/// `policy` lines added to its parameters, and a Bash step 2 (fallback-only when named).
fn judged(policy: &str) -> Trace {
    trace(&format!(
        "inputs:\n  entry:\n    default: \"ntp 123/___\"\n---\n### Step 1: judge\n**Tool Call**:\n```yaml\ntool: LLM\nparameters:\n  prompt: \"Entry: {{entry}}. Answer:\"\n  grammar: 'root ::= \"tcp\" | \"udp\"'\n  examples:\n    - vars: {{entry: \"ssh 22/___\"}}\n      expect: tcp\n    - vars: {{entry: \"domain 53/___\"}}\n      expect: udp\n    - vars: {{entry: \"http 80/___\"}}\n      expect: tcp\n{policy}```\n### Step 2: by hand\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: echo udp\n```\n**Dependencies**: None\n"
    ))
}

#[test]
fn a_judgement_step_whose_model_disagrees_with_its_reference_answers_escalates_and_never_succeeds()
{
    let t = judged("");
    // Two of three reference answers wrong: fidelity 1/3 < 0.8. The step itself never asks.
    let mut h = FakeHost {
        generations: [answer("tcp", 0.9), answer("tcp", 0.9), answer("udp", 0.9)].into(),
        shell_answers: [out("ok", 0)].into(),
        ..FakeHost::default()
    };
    let mut measured = Vec::new();
    let cx = RunContext {
        run_id: "r".into(),
        device_id: "d".parse().unwrap(),
        base_dir: "/b".into(),
        fidelity: BTreeMap::new(),
    };
    let inputs = resolve_inputs(&t, &BTreeMap::new()).unwrap();
    let r = run(&t, &cx, &inputs, &mut h, &mut |e| {
        if let Event::FidelityMeasured(f) = e {
            measured.push(f.clone());
        }
    });
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.failed_step, Some(1));
    assert_eq!(h.requests.len(), 3, "only the three examples were asked");
    assert_eq!(r.escalations.len(), 1);
    let why = "model m agrees with 1 of 3 reference answers of step 1 (0.33 < 0.80)";
    assert!(r.escalations[0].message.contains("reference answers"));
    assert!(r.escalations[0].error.contains(why), "{:?}", r.escalations);
    assert!(r.error.as_deref().unwrap_or("").contains(why));
    assert_eq!(r.fidelity.len(), 1);
    assert_eq!((r.fidelity[0].agreements, r.fidelity[0].total), (1, 3));
    assert_eq!(
        r.fidelity[0].disagreements,
        vec![(1, "tcp".to_owned()), (2, "udp".to_owned())]
    );
    assert_eq!(measured, r.fidelity, "the measurement was journaled");
    assert_ne!(r.step_results[0].status, StepStatus::Success);
}

#[test]
fn a_judgement_step_whose_model_agrees_runs_and_a_known_fidelity_is_not_measured_again() {
    let t = judged("");
    let mut h = FakeHost {
        generations: [
            answer("tcp", 0.9),
            answer("udp", 0.9),
            answer("tcp", 0.9),
            answer("udp", 0.7),
        ]
        .into(),
        shell_answers: [out("ok", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert_eq!(r.step_results[0].output, "udp");
    assert_eq!(r.fidelity[0].short(), "3/3 (1.00)");
    // The step's own prompt is the input, not an example.
    assert_eq!(h.requests[3].prompt, "Entry: ntp 123/___. Answer:");
    assert_eq!(h.requests[0].prompt, "Entry: ssh 22/___. Answer:");

    // Known (stored) fidelity: nothing is measured, the step runs.
    let mut h = FakeHost {
        generations: [answer("udp", 0.7)].into(),
        shell_answers: [out("ok", 0)].into(),
        ..FakeHost::default()
    };
    let cx = RunContext {
        run_id: "r".into(),
        device_id: "d".parse().unwrap(),
        base_dir: "/b".into(),
        fidelity: [(1, r.fidelity[0].clone())].into(),
    };
    let inputs = resolve_inputs(&t, &BTreeMap::new()).unwrap();
    let r = run(&t, &cx, &inputs, &mut h, &mut |_| {});
    assert_eq!(r.status, RunStatus::Success);
    assert_eq!(h.requests.len(), 1);
}

#[test]
fn few_shot_examples_go_into_the_prompt_and_are_not_scored() {
    let t = judged("  few_shot: 1\n");
    let mut h = FakeHost {
        generations: [answer("udp", 0.9), answer("tcp", 0.9), answer("udp", 0.9)].into(),
        shell_answers: [out("ok", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    // Two scored examples, then the step: three requests, each with the first example as a
    // prior turn.
    assert_eq!(h.requests.len(), 3);
    assert_eq!(r.fidelity[0].total, 2);
    for req in &h.requests {
        assert_eq!(
            req.shots,
            vec![("Entry: ssh 22/___. Answer:".to_owned(), "tcp".to_owned())]
        );
    }
}

#[test]
fn uncertain_answers_follow_on_uncertain() {
    let agreeing = || [answer("tcp", 0.9), answer("udp", 0.9), answer("tcp", 0.9)];
    // escalate (the default): the run fails with an escalation naming the confidence.
    let t = judged("  min_answer_confidence: 0.6\n");
    let mut h = FakeHost {
        generations: agreeing().into_iter().chain([answer("udp", 0.4)]).collect(),
        shell_answers: [out("ok", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(r.escalations.len(), 1);
    assert!(
        r.escalations[0]
            .error
            .contains("confidence 0.40, under the step's min_answer_confidence 0.60"),
        "{:?}",
        r.escalations
    );
    let llm = r.step_results[0].llm.as_ref().unwrap();
    assert!(llm.uncertain);
    assert_eq!(llm.answer_confidence, Some(0.4));
    assert_eq!(h.requests.len(), 4, "an uncertain answer is not retried");

    // Above the threshold: the answer is used.
    let mut h = FakeHost {
        generations: agreeing().into_iter().chain([answer("udp", 0.6)]).collect(),
        shell_answers: [out("ok", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success);
    assert!(!r.step_results[0].llm.as_ref().unwrap().uncertain);

    // fallback_step: step 2 runs instead, the step is recovered.
    let t = judged("  min_answer_confidence: 0.6\n  on_uncertain: {fallback_step: 2}\n");
    let mut h = FakeHost {
        generations: agreeing().into_iter().chain([answer("tcp", 0.3)]).collect(),
        shell_answers: [out("udp", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success, "{:?}", r.error);
    assert_eq!(r.step_results[0].status, StepStatus::Recovered);
    assert_eq!(r.step_results[0].output, "udp");
    assert!(r.escalations.is_empty());

    // accept: used, marked uncertain.
    let t = judged("  min_answer_confidence: 0.6\n  on_uncertain: accept\n");
    let mut h = FakeHost {
        generations: agreeing().into_iter().chain([answer("tcp", 0.3)]).collect(),
        shell_answers: [out("ok", 0)].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    assert_eq!(r.status, RunStatus::Success);
    assert_eq!(r.step_results[0].output, "tcp");
    assert!(r.step_results[0].llm.as_ref().unwrap().uncertain);
}

#[test]
fn what_a_sensitive_step_produced_reaches_no_part_of_the_report() {
    // Step 1 (plain) fails and is recovered by step 3 (sensitive); step 2 (sensitive) fails
    // with stderr; a postcondition renders step 3's output. None of it may show.
    let t = trace(
        "postconditions:\n  - condition: got it\n    type: content_contains\n    parameters:\n      path: out.txt\n      text: \"{got}-nope\"\n---\n### Step 1: primary\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: primary\noutput_variable: got\n```\n**Error Handling**:\n```yaml\non_error: {action: retry, retry_count: 0, fallback_step: 3}\n```\n### Step 2: secret read\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: reader\nsensitive: true\n```\n**Error Handling**:\n```yaml\non_error: {action: skip}\n```\n**Dependencies**: Step 1\n### Step 3: plan b\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: plan-b\nsensitive: true\n```\n**Dependencies**: None\n",
    );
    let mut h = FakeHost {
        shell_answers: [
            out("", 1),
            out("SECRET-FROM-B\n", 0),
            ShellOutput {
                stdout: "SECRET-PARTIAL".into(),
                stderr: "SECRET-IN-STDERR".into(),
                exit_code: Some(3),
                signal: None,
            },
        ]
        .into(),
        files: [("out.txt".to_owned(), "x".to_owned())].into(),
        ..FakeHost::default()
    };
    let r = run_with(&t, &mut h);
    let json = serde_json::to_string(&r).unwrap();
    assert!(!json.contains("SECRET"), "{json}");
    assert_eq!(r.step_results[0].status, StepStatus::Recovered);
    assert_eq!(r.step_results[0].output_bytes, Some(14), "{json}");
    assert_eq!(
        r.step_results[1].error.as_deref(),
        Some("exit code 3; details withheld on the device (sensitive step)")
    );
}
