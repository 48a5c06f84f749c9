//! The example command lines of the binaries' `--help` and of the README's "By hand" section,
//! extracted so that tests can parse (unit tests of each `main.rs`, through `#[path]`) and run
//! them (`tests/newcomer.rs`): an example that no longer parses or runs fails a test.

/// The command lines in `text` that start with one of `bins`, in order: `\` continuations joined, trailing
/// `# comments` and leading `VAR=… ` assignments dropped, `a && b` chains split, each split
/// into arguments as a POSIX shell would (quotes honoured).
///
/// # Panics
/// On a line whose quotes do not close.
pub fn commands(text: &str, bins: &[&str]) -> Vec<Vec<String>> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = strip_comment(line);
        if let Some(head) = line.trim_end().strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        joined.push(std::mem::take(&mut current));
    }
    let mut out = Vec::new();
    for line in joined {
        for part in line.split("&&") {
            let Some(words) = shlex::split(part.trim()) else {
                panic!("unbalanced quotes in example: {part}");
            };
            let words: Vec<String> = words
                .into_iter()
                .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                .collect();
            if words.first().is_some_and(|w| bins.contains(&w.as_str())) {
                out.push(words);
            }
        }
    }
    out
}

/// `cmd  # comment` → `cmd` (a `#` that starts a word outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

/// The fenced `sh` blocks of the README's "## By hand" section (up to the next `## `).
///
/// # Panics
/// When the README or the section is missing.
pub fn readme_by_hand() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme.find("\n## By hand").expect("a '## By hand' section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    let mut out = String::new();
    let mut inside = false;
    for line in section[..end].lines() {
        if line.starts_with("```") {
            inside = !inside && line.trim() == "```sh";
            continue;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Asserts that `text` holds at least `at_least` examples of `bin` and that `parse` (the
/// binary's clap parser) accepts every one.
///
/// # Panics
/// On the first example that does not parse, with clap's message.
pub fn assert_all_parse<E: std::fmt::Display>(
    text: &str,
    bin: &str,
    at_least: usize,
    parse: impl Fn(&[String]) -> Result<(), E>,
) {
    let commands = commands(text, &[bin]);
    assert!(commands.len() >= at_least, "{commands:?}");
    for args in commands {
        if let Err(e) = parse(&args) {
            panic!("example `{}` does not parse:\n{e}", args.join(" "));
        }
    }
}
