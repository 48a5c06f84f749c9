//! Property tests: the compiled form round-trips any IR value, and no input makes the decoders
//! or the compiler panic.

#![allow(clippy::unwrap_used)] // tests state expectations by unwrapping

use proptest::prelude::*;
use tracefleet::ids::{TraceId, VarName, Version};
use tracefleet::trace::{
    Check, CheckKind, Dependency, Foreach, ForeachSource, GrepOutput, Input, LlmCall, Metadata,
    OnError, OutputDecl, ReportOutputs, Step, Template, Tool, Trace,
};
use tracefleet::{compile_source, decode_compiled, encode_compiled};

fn text() -> impl Strategy<Value = String> {
    "[ -~\\n\\u{e9}\\u{4e2d}]{0,40}"
}

fn var() -> impl Strategy<Value = VarName> {
    "[a-z_][a-z0-9_]{0,10}".prop_map(|s| s.parse().unwrap())
}

fn template() -> impl Strategy<Value = Template> {
    text().prop_map(Template)
}

fn tool() -> impl Strategy<Value = Tool> {
    prop_oneof![
        (
            template(),
            proptest::option::of(1u64..100),
            proptest::option::of(1u64..100)
        )
            .prop_map(|(file_path, offset, limit)| Tool::Read {
                file_path,
                offset,
                limit
            }),
        (template(), template())
            .prop_map(|(file_path, content)| Tool::Write { file_path, content }),
        template().prop_map(|command| Tool::Bash { command }),
        (text(), proptest::option::of(template()), any::<bool>()).prop_map(|(pattern, path, i)| {
            Tool::Grep {
                pattern,
                path,
                glob: None,
                case_insensitive: i,
                output_mode: GrepOutput::Count,
            }
        }),
        (text(), proptest::option::of(template()))
            .prop_map(|(pattern, path)| Tool::Glob { pattern, path }),
        (
            template(),
            proptest::option::of(text()),
            proptest::option::of(text()),
            1u32..4096,
            0.0f32..2.0,
            any::<u32>()
        )
            .prop_map(
                |(prompt, grammar, json_schema, max_tokens, temperature, seed)| Tool::Llm(
                    LlmCall {
                        prompt,
                        system: None,
                        model: None,
                        max_tokens,
                        temperature,
                        top_p: 1.0,
                        seed,
                        grammar,
                        json_schema,
                        stop: vec!["\n\n".into()],
                        judgement: Default::default(),
                    }
                )
            ),
    ]
}

fn check() -> impl Strategy<Value = Check> {
    (
        text(),
        prop_oneof![
            template().prop_map(|path| CheckKind::FileExists { path }),
            (proptest::option::of(template()), template())
                .prop_map(|(path, text)| CheckKind::ContentContains { path, text }),
            any::<i32>().prop_map(|expected| CheckKind::CommandExitCode { expected }),
            (proptest::option::of(template()), any::<u64>())
                .prop_map(|(path, bytes)| CheckKind::FileSizeMinimum { path, bytes }),
            proptest::collection::vec(text(), 0..3).prop_map(|required_sections| {
                CheckKind::ContentStructureCheck {
                    path: None,
                    required_sections,
                }
            }),
        ],
    )
        .prop_map(|(description, kind)| Check { description, kind })
}

fn on_error() -> impl Strategy<Value = OnError> {
    prop_oneof![
        Just(OnError::Fail),
        Just(OnError::Skip),
        (0u32..10, 0.0f64..60.0, proptest::option::of(1u32..9)).prop_map(
            |(retry_count, delay_secs, fallback_step)| OnError::Retry {
                retry_count,
                delay_secs,
                fallback_step
            }
        ),
        (1u32..9).prop_map(|step| OnError::Fallback { step }),
        text().prop_map(|message| OnError::Escalate { message }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        (
            1u32..1000,
            text(),
            tool(),
            proptest::collection::vec(check(), 0..3),
            on_error(),
        ),
        (
            proptest::collection::vec((1u32..1000, proptest::option::of(var())), 0..3),
            any::<bool>(),
            1u32..3600,
            any::<bool>(),
        ),
        (
            proptest::option::of(var()),
            proptest::option::of(var()),
            proptest::option::of(proptest::collection::vec("[a-z]{1,8}", 0..3)),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (number, title, tool, validations, on_error),
                (deps, explicit, timeout_secs, sensitive),
                (output_variable, each, allowed_commands, command_substitution),
            )| Step {
                number,
                title,
                line: number,
                tool,
                validations,
                on_error,
                dependencies: deps
                    .into_iter()
                    .map(|(step, output_variable)| Dependency {
                        step,
                        output_variable,
                    })
                    .collect(),
                explicit_dependencies: explicit,
                timeout_secs,
                output_variable,
                foreach: each.map(|v| Foreach {
                    over: ForeachSource::Lines(v.clone()),
                    var: v,
                }),
                allowed_commands,
                command_substitution,
                sensitive,
            },
        )
}

fn trace() -> impl Strategy<Value = Trace> {
    (
        (
            "[a-z0-9][a-z0-9._-]{0,30}",
            any::<(u16, u16, u16)>(),
            text(),
            0.0f64..=1.0,
        ),
        (
            proptest::collection::vec((var(), proptest::option::of(text()), text()), 0..3),
            proptest::collection::vec(check(), 0..2),
        ),
        (
            proptest::collection::vec(step(), 1..5),
            1u32..8,
            proptest::collection::vec("/[a-z]{1,8}", 0..2),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (id, (ma, mi, pa), goal, confidence),
                (inputs, conditions),
                (steps, max_parallel, read_paths, hashed),
            )| Trace {
                id: id.parse::<TraceId>().unwrap(),
                version: Version {
                    major: ma.into(),
                    minor: mi.into(),
                    patch: pa.into(),
                },
                goal_signature: goal,
                confidence,
                success_rate: confidence,
                usage_count: 3,
                estimated_cost: 0.5,
                estimated_time_secs: 2.0,
                created_at: String::new(),
                experience_id: String::new(),
                metadata: Metadata::default(),
                inputs: inputs
                    .into_iter()
                    .map(|(name, default, description)| Input {
                        name,
                        default,
                        description,
                    })
                    .collect(),
                preconditions: conditions.clone(),
                postconditions: conditions,
                outputs: vec![OutputDecl {
                    name: "o".into(),
                    kind: "file".into(),
                    location: "x".into(),
                    description: String::new(),
                }],
                max_parallel,
                read_paths,
                report_outputs: if hashed {
                    ReportOutputs::Hashed
                } else {
                    ReportOutputs::Full
                },
                steps,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn compiled_form_round_trips(t in trace()) {
        let bytes = encode_compiled(&t);
        // The encoding round-trips any IR value…
        prop_assert_eq!(&postcard::from_bytes::<Trace>(&bytes[4..]).unwrap(), &t);
        // …and the decoder accepts exactly the values that keep the compiler's rules.
        match tracefleet::invariants::check(&t) {
            Ok(()) => prop_assert_eq!(decode_compiled(&bytes).unwrap(), t),
            Err(e) => prop_assert!(
                matches!(decode_compiled(&bytes), Err(tracefleet::compile::DecodeError::Invariant(m)) if m == e)
            ),
        }
    }

    #[test]
    fn truncated_compiled_bytes_are_refused_not_misread(t in trace(), cut in 0.0f64..1.0) {
        let bytes = encode_compiled(&t);
        let n = ((bytes.len() as f64) * cut) as usize;
        prop_assert!(decode_compiled(&bytes[..n.min(bytes.len() - 1)]).is_err());
    }

    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut with_header = vec![b'T', b'F', b'C', tracefleet::compile::COMPILED_FORMAT_VERSION];
        with_header.extend(&bytes);
        let _ = decode_compiled(&with_header);
        let _ = decode_compiled(&bytes);
    }

    #[test]
    fn compiler_never_panics(src in "(---\\n|### Step [0-9]: x\\n|\\*\\*Tool Call\\*\\*:\\n|```yaml\\n|```\\n|tool: Bash\\n|[ -~\\n]{0,20}){0,12}") {
        let _ = compile_source("p.trace.md", &src);
    }
}
