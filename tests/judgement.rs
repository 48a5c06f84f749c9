//! Judgement steps with the real models: a step whose model disagrees with its reference
//! answers escalates before it runs and never reports success, one whose model agrees runs;
//! `follower eval` on a small labelled set; a base model (Gemma 3 270M, no chat template) in
//! completion mode; the learner scoring a regenerated judgement step on its own examples
//! with the devices' model before it accepts it.

#![allow(clippy::unwrap_used)] // tests state expectations by unwrapping

use tracefleet_e2e::{FakeMessagesApi, Workspace, bin, model, repo_root};

/// A services-entry trace whose one judgement step carries `examples` (YAML list items at
/// four spaces).
pub(crate) fn trace(ws: &Workspace, name: &str, examples: &str) -> String {
    let src = format!(
        r#"---
trace_id: {name}
version: "1.0.0"
goal_signature: "name the hidden protocol of a services entry"
inputs:
  entry:
    default: "xtel 1313/___ # french minitel"
---

### Step 1: Name the hidden protocol

**Tool Call**:
```yaml
tool: LLM
parameters:
  prompt: |
    An entry of /etc/services with its protocol hidden as ___:

    {{entry}}

    Does this service use tcp or udp? Answer with one word: tcp or udp.
    Answer:
  max_tokens: 4
  grammar: 'root ::= "tcp" | "udp"'
  examples:
{examples}output_variable: protocol
```

**Dependencies**: None
"#
    );
    let rel = format!("{name}.trace.md");
    std::fs::write(ws.path(&rel), src).unwrap();
    rel
}

/// Items of traces/eval/services-protocol.jsonl (the first lines; the test model answers
/// `tcp` to each of them).
const TCP: [&str; 3] = [
    "epmd 4369/___ # Erlang Port Mapper Daemon",
    "xtel 1313/___ # french minitel",
    "nsca 5667/___ # Nagios Agent - NSCA",
];
pub(crate) const UDP: [&str; 3] = [
    "sgi-gcd 17003/___ # SGI Group membership daemon",
    "l2f 1701/___ l2tp",
    "moira-ureg 779/___ moira_ureg # Moira user registration",
];

pub(crate) fn examples(items: &[&str], expect: &str) -> String {
    items
        .iter()
        .map(|e| format!("    - vars: {{entry: \"{e}\"}}\n      expect: {expect}\n"))
        .collect()
}

fn run_json(ws: &Workspace, src: &str) -> (Option<i32>, serde_json::Value) {
    let m = model();
    let r = ws.follower(&[
        "run",
        src,
        "--allow-unsigned",
        "--model",
        m.to_str().unwrap(),
        "--threads",
        "2",
        "--json",
    ]);
    let report = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    (r.code, report)
}

#[test]
fn a_judgement_step_whose_model_disagrees_escalates_and_one_whose_model_agrees_runs() {
    let ws = Workspace::new();
    // The model answers tcp to these udp services: 0 of 3.
    let src = trace(&ws, "disagrees", &examples(&UDP, "udp"));
    let (code, r) = run_json(&ws, &src);
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(r["status"], "failed", "{r}");
    let why = "agrees with 0 of 3 reference answers of step 1 (0.00 < 0.80)";
    assert!(
        r["escalations"][0]["error"].as_str().unwrap().contains(why),
        "{r}"
    );
    assert_eq!(r["fidelity"][0]["agreements"], 0);
    assert_eq!(r["fidelity"][0]["total"], 3);
    assert_eq!(r["fidelity"][0]["model"], "SmolLM2-135M-Instruct.Q4_1");
    assert_ne!(r["step_results"][0]["status"], "success");
    assert_eq!(r["step_results"][0]["llm"], serde_json::Value::Null, "{r}");
    // The measurement's tokens count as the run's.
    assert!(r["prompt_tokens"].as_u64().unwrap() > 3 * 20, "{r}");

    // Stored: the next run refuses again from the record, without asking the model.
    let (code, again) = run_json(&ws, &src);
    assert_eq!(code, Some(1));
    assert!(
        again["escalations"][0]["error"]
            .as_str()
            .unwrap()
            .contains(why)
    );
    assert_eq!(again["prompt_tokens"], 0, "no generation: {again}");

    // The same step with reference answers the model repeats runs.
    let src = trace(&ws, "agrees", &examples(&TCP, "tcp"));
    let (code, r) = run_json(&ws, &src);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["status"], "success");
    assert_eq!(r["fidelity"][0]["agreements"], 3);
    assert_eq!(r["step_results"][0]["output"], "tcp");
    let confidence = r["step_results"][0]["llm"]["answer_confidence"]
        .as_f64()
        .unwrap();
    assert!(
        confidence > 0.0 && confidence <= 1.0,
        "a probability: {confidence}"
    );
}

/// Six items, four tcp and two udp, as a JSON Lines file.
fn dataset(ws: &Workspace) -> String {
    let mut lines = String::new();
    for (e, label) in TCP
        .iter()
        .map(|e| (e, "tcp"))
        .chain([("ftp-data 20/___", "tcp")].iter().map(|(e, l)| (e, *l)))
        .chain(UDP[..2].iter().map(|e| (e, "udp")))
    {
        lines.push_str(&format!(
            "{{\"vars\": {{\"entry\": \"{e}\"}}, \"expect\": \"{label}\"}}\n"
        ));
    }
    std::fs::write(ws.path("six.jsonl"), lines).unwrap();
    "six.jsonl".into()
}

fn eval(ws: &Workspace, model: &str, extra: &[&str]) -> serde_json::Value {
    let src = repo_root().join("traces/eval/services-protocol.trace.md");
    let data = dataset(ws);
    let mut args = vec![
        "eval",
        src.to_str().unwrap(),
        "--step",
        "1",
        "--dataset",
        &data,
        "--model",
        model,
        "--threads",
        "2",
        "--json",
    ];
    args.extend_from_slice(extra);
    let r = ws.follower(&args);
    assert_eq!(r.code, Some(0), "{r:?}");
    serde_json::from_str(&r.stdout).unwrap()
}

#[test]
fn follower_eval_scores_a_labelled_set_and_refuses_bad_input() {
    let ws = Workspace::new();
    let m = model();
    let e = eval(&ws, m.to_str().unwrap(), &[]);
    let f = |k: &str| e[k].as_f64().unwrap();
    assert_eq!(e["items"], 6);
    // Four of six items are tcp.
    assert!((f("majority_baseline") - 4.0 / 6.0).abs() < 1e-9, "{e}");
    // No threshold: every item answered.
    assert_eq!(e["answered"], 6);
    assert_eq!(f("coverage"), 1.0);
    // Accuracy is the confusion matrix's diagonal over the items.
    let confusion = e["confusion"].as_object().unwrap();
    let total: u64 = confusion
        .values()
        .flat_map(|row| row.as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(total, 6);
    let diagonal: u64 = confusion
        .iter()
        .map(|(label, row)| row.get(label).and_then(|n| n.as_u64()).unwrap_or(0))
        .sum();
    assert!((f("accuracy") - diagonal as f64 / 6.0).abs() < 1e-9, "{e}");
    // The items off the diagonal, each with the model's answer (what the learner's dry run
    // sends back to the model that wrote the examples).
    assert_eq!(e["wrong"].as_u64(), Some(6 - diagonal), "{e}");
    let wrong = e["disagreements"].as_array().unwrap();
    assert_eq!(wrong.len() as u64, 6 - diagonal, "{e}");
    assert!(
        wrong.iter().all(|d| d["item"].as_u64().unwrap() < 6
            && ["tcp", "udp"].contains(&d["answer"].as_str().unwrap())),
        "{e}"
    );
    assert_eq!(f("selective_accuracy"), f("accuracy"));
    assert!((0.0..=1.0).contains(&f("ece")));
    assert!(e["prompt_tokens"].as_u64().unwrap() > 6 * 20);
    assert!(e["generated_tokens"].as_u64().unwrap() >= 6);
    assert!(f("items_per_sec") > 0.0);

    // A threshold above every confidence answers nothing.
    let e = eval(&ws, m.to_str().unwrap(), &["--threshold", "1"]);
    assert!(e["answered"].as_u64().unwrap() <= 6);
    assert!(e["accuracy"].as_f64().unwrap() <= e["coverage"].as_f64().unwrap() + 1e-9);

    // Bad input: exit 2, saying where and what was expected.
    std::fs::write(ws.path("bad.jsonl"), "{\"vars\": {\"entry\": \"x\"}, \"expect\": \"tcp\"}\n{\"vars\": {}, \"expect\": \"tcp\"}\n").unwrap();
    let src = repo_root().join("traces/eval/services-protocol.trace.md");
    let r = ws.follower(&[
        "eval",
        src.to_str().unwrap(),
        "--step",
        "1",
        "--dataset",
        "bad.jsonl",
        "--model",
        m.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(
        r.stderr
            .contains("bad.jsonl:2: the item does not bind `{entry}`"),
        "{}",
        r.stderr
    );
    let r = ws.follower(&[
        "eval",
        src.to_str().unwrap(),
        "--step",
        "2",
        "--dataset",
        "bad.jsonl",
    ]);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("has no step 2"), "{}", r.stderr);
}

#[test]
fn a_base_model_without_a_chat_template_answers_in_completion_mode() {
    let gemma = repo_root().join("models/gemma-3-270m-Q4_K_M.gguf");
    assert!(
        gemma.is_file(),
        "{} missing: run models/fetch.sh gemma3-270m",
        gemma.display()
    );
    let ws = Workspace::new();
    let e = eval(&ws, gemma.to_str().unwrap(), &["--few-shot", "0"]);
    assert_eq!(e["model"], "gemma-3-270m-Q4_K_M");
    assert_eq!(e["items"], 6);
    assert_eq!(e["errors"], 0, "{e}");
    assert!(e["generated_tokens"].as_u64().unwrap() >= 6, "{e}");
    // Every answer is one of the grammar's labels.
    for row in e["confusion"].as_object().unwrap().values() {
        for answer in row.as_object().unwrap().keys() {
            assert!(answer == "tcp" || answer == "udp", "{e}");
        }
    }
}

#[test]
fn the_learner_scores_a_regenerated_judgement_on_its_examples_and_sends_the_disagreements_back() {
    let ws = Workspace::new();
    let r = ws.learner(&[
        "keys",
        "generate",
        "--role",
        "traces",
        "--out",
        "traces.key",
    ]);
    assert_eq!(r.code, Some(0), "{r:?}");
    // First reply: the same entry expected once as tcp and once as udp — a greedy model
    // repeats at most one of the two (1 of 2 < 0.8). Second: answers any model repeats.
    let entry = "    - vars: {entry: \"xtel 1313/___ # french minitel\"}\n";
    let contradictory = std::fs::read_to_string(ws.path(&trace(
        &ws,
        "svc",
        &format!("{entry}      expect: tcp\n{entry}      expect: udp\n"),
    )))
    .unwrap();
    let agreeable = contradictory
        .replace("expect: tcp", "expect_regex: \"^(tcp|udp)$\"")
        .replace("expect: udp", "expect_regex: \"^(tcp|udp)$\"");
    let api = FakeMessagesApi::start(vec![
        FakeMessagesApi::reply(&contradictory, 1000, 200),
        FakeMessagesApi::reply(&agreeable, 1200, 200),
    ]);
    std::fs::write(
        ws.path("learner.toml"),
        format!(
            "db = \"learner.db\"\n[backend]\nkind = \"anthropic\"\nbase_url = \"{}\"\nmodel = \"claude-test\"\napi_key_env = \"TEST_ANTHROPIC_KEY\"\nbackoff_ms = 10\n\n[dry_run]\nfollower = \"{}\"\nmodel = \"{}\"\nthreads = 2\ntimeout = \"120s\"\n",
            api.base_url,
            bin("follower").display(),
            model().display()
        ),
    )
    .unwrap();
    let r = ws.learner_env(
        &[
            "regenerate",
            "svc",
            "--goal",
            "name the hidden protocol of a services entry",
            "--key",
            "traces.key",
            "--config",
            "learner.toml",
        ],
        &[("TEST_ANTHROPIC_KEY", "sk-test")],
    );
    // Signed, but with no device known there is nothing to roll out to (exit 2, saying so).
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("rollout was not recorded"), "{r:?}");
    // The accepted candidate's fidelity, measured with the model, is shown and recorded.
    assert!(
        r.stdout.contains("svc: fidelity step 1 with ") && r.stdout.contains(": 2/2 (1.00)"),
        "{r:?}"
    );
    assert!(r.stdout.contains("version 1.0.0 in 2 round(s)"), "{r:?}");
    let requests = api.requests.lock().unwrap();
    assert_eq!(requests.len(), 2);
    let first = requests[0].1["messages"][0]["content"].as_str().unwrap();
    let system = requests[0].1["system"].to_string();
    assert!(
        system.contains("must carry reference examples")
            && first.contains("write the first version"),
        "{system}"
    );
    let repair = requests[1].1["messages"][2]["content"].as_str().unwrap();
    assert!(
        repair.contains("agrees with 1 of 2 reference answers (0.50 < 0.80)")
            && repair.contains("vars {entry: \"xtel 1313/___ # french minitel\"}; expected")
            && repair.contains("the model answered \""),
        "{repair}"
    );
    let runs = ws.learner(&["runs", "list", "--config", "learner.toml", "--json"]);
    let runs: serde_json::Value = serde_json::from_str(&runs.stdout).unwrap();
    let detail = runs["regenerations"][0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("fidelity step 1 with ") && detail.contains("2/2 (1.00)"),
        "{detail}"
    );
}

#[test]
fn traces_fidelity_measures_an_installed_trace_once_and_its_run_uses_the_figure() {
    let ws = Workspace::new();
    let key = ws.key("t");
    ws.trust(&key);
    let src = trace(&ws, "agrees", &examples(&TCP, "tcp"));
    let signed = ws.sign(ws.path(&src).to_str().unwrap(), &key);
    let r = ws.follower(&["install", &signed]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let m = model();
    let m = m.to_str().unwrap();
    let fidelity = |json: bool| {
        let mut args = vec![
            "traces",
            "fidelity",
            "agrees",
            "--model",
            m,
            "--threads",
            "2",
        ];
        if json {
            args.push("--json");
        }
        ws.follower(&args)
    };
    let r = fidelity(false);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(
        r.stdout.trim(),
        "step 1: SmolLM2-135M-Instruct.Q4_1 agrees with 3 of 3 reference answers (1.00, minimum 0.80)",
        "{r:?}"
    );
    // Stored: shown as known, not measured again; the device lists it before any run.
    let r = fidelity(true);
    let again: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(again[0]["measured"], false, "{again}");
    assert_eq!(again[0]["agreements"], 3, "{again}");
    let r = ws.follower(&["traces", "list"]);
    assert!(r.stdout.contains("step 1 fidelity 3/3 (1.00)"), "{r:?}");
    // The run takes the stored figure: only the step's own answer is generated.
    let r = ws.follower(&["run", "agrees", "--model", m, "--threads", "2", "--json"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["fidelity"][0]["agreements"], 3, "{report}");
    let step_tokens = report["step_results"][0]["llm"]["prompt_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(
        report["prompt_tokens"].as_u64(),
        Some(step_tokens),
        "{report}"
    );
    // A trace without judgement steps has nothing to measure.
    let plain = ws.sign("fixtures/failing-validation.trace.md", &key);
    let r = ws.follower(&["traces", "fidelity", &plain]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("nothing to measure"), "{r:?}");
}
