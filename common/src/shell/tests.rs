//! Tests of the shell policy: allowed commands, substitution, syntax the policy refuses.

#[test]
fn direct_argv_takes_simple_commands_only() {
    let env = vec![("TF_VAR_log".to_owned(), "/var/log/a b.log".to_owned())];
    let argv = |c: &str| direct_argv(c, &env);
    assert_eq!(
        argv("grep -c ' install ' \"${TF_VAR_log}\""),
        Some(vec![
            "grep".into(),
            "-c".into(),
            " install ".into(),
            "/var/log/a b.log".into()
        ])
    );
    assert_eq!(
        argv("  sort\t-k4,4 --key=x ''  \"a\"'b'c "),
        Some(vec![
            "sort".into(),
            "-k4,4".into(),
            "--key=x".into(),
            String::new(),
            "abc".into()
        ])
    );
    for shell_only in [
        "",
        "   ",
        "wc -l < f",
        "a | b",
        "a && b",
        "a; b",
        "ls *.log",
        "ls ~/x",
        "echo hi",
        "printf x",
        "cd /tmp",
        "if",
        "A=1 env",
        "'A=1' env",
        "ls \"$HOME\"",
        "ls \"${TF_VAR_missing}\"",
        "ls \"${TF_VAR_log:-x}\"",
        "ls $TF_VAR_log",
        "ls \\x",
        "ls 'unterminated",
        "ls \"unterminated",
        "ls \"a\\b\"",
        "ls a\nls b",
        "ls #comment",
        "ls a{b,c}",
        "ls (x)",
        "ls x &",
        "ls \"`id`\"",
    ] {
        assert_eq!(argv(shell_only), None, "{shell_only:?} needs the shell");
    }
}

use super::*;

fn allowed(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn pipelines_lists_and_compound_commands_are_walked() {
    let ok = allowed(&["grep", "tail", "sort", "uniq", "awk"]);
    for cmd in [
        "awk '{print $3}' \"${TF_VAR_log}\" | sort | uniq -c | sort -rn",
        "{ grep -E ' (install|remove) ' \"${TF_VAR_log}\" || true; } | tail -n 5 > out.txt",
        "if grep -q x f; then echo yes; else sort f; fi",
        "for f in a b; do grep x \"$f\"; done",
        "case $1 in a) sort f ;; *) tail f ;; esac",
        "while false; do :; done; (cd sub && sort f)",
        "X=1 grep x f 2>/dev/null",
    ] {
        assert_eq!(check(cmd, Some(&ok), false), Ok(()), "{cmd}");
    }
    for (cmd, bad) in [
        ("grep x f | rm -rf /", "rm"),
        ("grep x f && curl http://x", "curl"),
        ("if true; then wget x; fi", "wget"),
        ("for f in *; do shred \"$f\"; done", "shred"),
        ("(sort f; nc -l 9)", "nc"),
        ("grep x f; eval \"$CMD\"", "eval"),
        ("'r''m' -rf x", "rm"),
        ("/bin/rm x", "/bin/rm"),
    ] {
        match check(cmd, Some(&ok), false) {
            Err(ShellError::NotAllowed { name, .. }) => assert_eq!(name, bad, "{cmd}"),
            other => panic!("{cmd}: {other:?}"),
        }
    }
}

#[test]
fn variables_that_change_what_a_command_loads_are_refused_under_an_allow_list() {
    let ok = allowed(&["ls", "grep"]);
    // The hostile probe's bypass: a shared object written with printf, then preloaded.
    for (cmd, var) in [
        (
            "printf 'x' > evil.so; LD_PRELOAD=./evil.so ls",
            "LD_PRELOAD",
        ),
        ("LD_LIBRARY_PATH=. ls", "LD_LIBRARY_PATH"),
        ("PATH=.:$PATH ls", "PATH"),
        ("export LD_PRELOAD=./evil.so; ls", "LD_PRELOAD"),
        ("export PATH; ls", "PATH"),
        ("read -r LD_AUDIT < f; export LD_AUDIT; ls", "LD_AUDIT"),
        ("BASH_ENV=./x grep y f", "BASH_ENV"),
        ("if true; then GCONV_PATH=. ls; fi", "GCONV_PATH"),
        ("declare -x PYTHONPATH=. ; ls", "PYTHONPATH"),
        ("local ENV=./rc", "ENV"),
    ] {
        match check(cmd, Some(&ok), false) {
            Err(ShellError::LoaderVariable { name, .. }) => assert_eq!(name, var, "{cmd}"),
            other => panic!("{cmd}: expected {var} refused, found {other:?}"),
        }
    }
    // Ordinary variables stay allowed, and without an allow-list nothing is restricted.
    for cmd in [
        "LC_ALL=C grep -c x f",
        "export TF_OUT=1; ls",
        "read -r line < f; ls",
    ] {
        assert_eq!(check(cmd, Some(&ok), false), Ok(()), "{cmd}");
    }
    assert_eq!(check("LD_PRELOAD=./x.so ls", None, false), Ok(()));
}

#[test]
fn computed_command_names_are_refused() {
    let ok = allowed(&["grep"]);
    for cmd in ["\"${TF_VAR_tool}\" x", "$CMD", "g${X}rep x"] {
        assert!(
            matches!(
                check(cmd, Some(&ok), false),
                Err(ShellError::ComputedName { .. })
            ),
            "{cmd}"
        );
    }
}

#[test]
fn substitution_is_refused_unless_allowed_and_then_checked_inside() {
    for (cmd, found) in [
        ("echo $(id)", "$("),
        ("echo \"$(id)\"", "$("),
        ("echo `id`", "`"),
        ("sort <(ls)", "<("),
        ("echo ok\necho \"${X:-$(id)}\"", "$("),
    ] {
        match check(cmd, None, false) {
            Err(ShellError::Substitution { found: f, .. }) => assert_eq!(f, found, "{cmd}"),
            other => panic!("{cmd}: {other:?}"),
        }
    }
    let e = check("echo ok\n  x=$(id)", None, false).unwrap_err();
    assert!(
        matches!(
            e,
            ShellError::Substitution {
                line: 2,
                column: 5,
                ..
            }
        ),
        "{e:?}"
    );
    // Quoted text is data, not a substitution.
    for cmd in [
        "echo '$(id)' '`id`'",
        "echo \\$(id)",
        "echo $((1 + 2))",
        "echo \"it's\"",
    ] {
        assert_eq!(check(cmd, None, false), Ok(()), "{cmd}");
    }
    let ok = allowed(&["date", "wc"]);
    assert_eq!(check("echo \"$(date) `wc -l f`\"", Some(&ok), true), Ok(()));
    assert!(matches!(
        check("echo \"$(date; rm x)\"", Some(&ok), true),
        Err(ShellError::NotAllowed { name, .. }) if name == "rm"
    ));
    assert!(matches!(
        check("echo `rm x`", Some(&ok), true),
        Err(ShellError::NotAllowed { name, .. }) if name == "rm"
    ));
    assert!(matches!(
        check("echo \"${X:-$(rm x)}\"", Some(&ok), true),
        Err(ShellError::Unchecked { .. })
    ));
    // Words the word parser would take exponential time on are refused at once.
    let nested = format!("echo \"$(date){}x{}\"", "(".repeat(30), ")".repeat(30));
    assert!(matches!(
        check(&nested, Some(&ok), true),
        Err(ShellError::Unchecked { .. })
    ));
    // Without allowed_commands an allowed substitution runs anything.
    assert_eq!(check("echo $(id)", None, true), Ok(()));
}

#[test]
fn well_formed_here_documents_are_parsed_and_checked() {
    let ok = allowed(&["grep", "cat"]);
    for cmd in [
        "grep x <<EOF\na\nEOF",
        "cat <<-'END' > out.txt\n\tbody $X\n\tEND\ngrep y out.txt",
    ] {
        assert_eq!(check(cmd, Some(&ok), false), Ok(()), "{cmd}");
    }
    assert!(matches!(
        check("grep x <<EOF\na\nEOF\nrm -rf /", Some(&ok), false),
        Err(ShellError::NotAllowed { name, .. }) if name == "rm"
    ));
}

#[test]
fn functions_and_syntax_errors_are_refused() {
    let ok = allowed(&["grep"]);
    assert!(matches!(
        check("f() { rm x; }; f", Some(&ok), false),
        Err(ShellError::Unchecked { .. })
    ));
    for bad in [
        "grep x f |",
        "00222222222222<,",
        "grep x 99999999999>f",
        // Malformed here-documents (the first made brush-parser 0.3 allocate without bound).
        "\x12\x02\ng<<\r\\\n(*<<$(",
        "grep x <<EOF\nno end",
        "grep x <<\nEOF",
        "grep x <<'EOF\nEOF",
        "grep x <<E$X\nE$X",
        // `<<<` then a here-document brush-parser 0.3 panicked on.
        "<<<<<${*}${\n*",
    ] {
        assert!(
            matches!(check(bad, Some(&ok), true), Err(ShellError::Syntax(_))),
            "{bad}"
        );
    }
}
