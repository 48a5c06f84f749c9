//! The shell policy of a Bash step: which commands its command line may run, and whether it
//! may use command substitution.
//!
//! A Bash step's command is fixed when the trace is signed: values reach it only through
//! environment variables (see [`crate::trace::Template::render_shell`]), so the set of commands
//! it can run is a static property of its text. [`check`] establishes it with a real POSIX shell
//! parser ([brush-parser](https://docs.rs/brush-parser), in `sh` mode): every simple command
//! anywhere in the program — pipelines, lists, `if`/`while`/`for`/`case` bodies, brace groups,
//! subshells and, where allowed, command substitutions — must be named literally and appear in
//! the step's `allowed_commands` (or be one of [`ALWAYS_ALLOWED`]).
//!
//! Command substitution (`$(…)`, backticks, process substitution `<(…)`) is refused unless
//! the step sets `allow_command_substitution: true`. That check is lexical and conservative:
//! a `$(` or backtick outside single quotes counts wherever it is (a heredoc with a quoted
//! delimiter or a comment included), so it can refuse a command the shell would accept, never
//! the other way round.
//!
//! Both the compiler (at authoring time, with the source line) and the follower (before
//! anything runs) call [`check`].

use brush_parser::ast::{
    Command, CommandPrefixOrSuffixItem, CompoundCommand, CompoundList, IoFileRedirectTarget,
    IoRedirect, Pipeline, Program, SimpleCommand, Word,
};
use brush_parser::word::{WordPiece, WordPieceWithSource};
use brush_parser::{ParserOptions, SourceInfo};

/// Shell builtins a step may always use: they cannot run another program or evaluate text as
/// code. (`eval`, `exec`, `.`, `source`, `command`, `builtin` and `trap` can, so they must be
/// listed in `allowed_commands` like any program.)
pub const ALWAYS_ALLOWED: &[&str] = &[
    ":", "true", "false", "test", "[", "echo", "printf", "cd", "pwd", "exit", "return", "break",
    "continue", "shift", "read", "set", "unset", "export", "local", "wait",
];

/// Deepest nesting of command substitutions [`check`] follows.
const MAX_DEPTH: usize = 16;

/// Longest word [`check`] hands to brush-parser's word parser (bytes): that parser backtracks
/// and can take most of a second on a few hundred hostile bytes (found by fuzzing); a longer
/// word that needs it (it holds a substitution, or it names the command) is refused.
const MAX_PARSED_WORD: usize = 256;

/// Most `(` or `{` in a word handed to the word parser: its time doubles with each nested
/// parenthesis (19 took 26 s; found by fuzzing).
const MAX_WORD_GROUPS: usize = 8;

/// Why brush-parser's word parser must not see `word`, if it must not.
fn too_complex(word: &str) -> Option<String> {
    let groups = word.matches(['(', '{']).count();
    if word.len() > MAX_PARSED_WORD {
        Some(format!(
            "a word of {} bytes with a substitution (at most {MAX_PARSED_WORD})",
            word.len()
        ))
    } else if groups > MAX_WORD_GROUPS {
        Some(format!(
            "a word with {groups} `(` or `{{` and a substitution (at most {MAX_WORD_GROUPS})"
        ))
    } else {
        None
    }
}

/// Why a command line breaks its step's shell policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShellError {
    /// `$(…)`, a backtick or `<(…)` without `allow_command_substitution`.
    #[error(
        "command substitution '{found}' at line {line}, column {column} of the command: expected none (set `allow_command_substitution: true` on the tool call to allow it)"
    )]
    Substitution {
        /// What was found (`$(`, `` ` ``, `<(`, `>(`).
        found: String,
        /// 1-based line in the command text.
        line: usize,
        /// 1-based column in the command text.
        column: usize,
    },
    /// A command not in `allowed_commands`.
    #[error("command `{name}` is not in allowed_commands [{allowed}]")]
    NotAllowed {
        /// The command's name as written.
        name: String,
        /// The step's list, comma-separated.
        allowed: String,
    },
    /// A command name that is computed when the shell runs (`$X`, `"${TF_VAR_x}"`, …).
    #[error(
        "command name `{word}` is computed when the shell runs: expected a literal name from allowed_commands"
    )]
    ComputedName {
        /// The word as written.
        word: String,
    },
    /// A construct whose commands cannot be checked statically.
    #[error("{what}: its commands cannot be checked against allowed_commands")]
    Unchecked {
        /// The construct.
        what: String,
    },
    /// A variable that changes what a command loads or runs (`LD_PRELOAD`, `PATH`, …) set,
    /// exported or read under an allow-list: `LD_PRELOAD=./x.so ls` would run `x.so`'s code
    /// inside an allowed command.
    #[error(
        "`{name}` changes what a command loads or runs: setting, exporting or reading it is refused under allowed_commands (found `{word}`)"
    )]
    LoaderVariable {
        /// The variable.
        name: String,
        /// The word that sets it, as written.
        word: String,
    },
    /// The text is not a shell program.
    #[error("cannot parse the command as POSIX shell: {0}")]
    Syntax(String),
}

/// Variables that change what a program loads or runs, or what the shell runs on its own
/// (the dynamic loader's `LD_*`, `PATH`, the shells' start-up files and hooks, interpreters'
/// module paths and option variables, programs that run a pager, editor or SSH command).
/// Under an allow-list none of them may be set, exported or read into.
pub const LOADER_VARIABLES: &[&str] = &[
    "PATH",
    "ENV",
    "BASH_ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "CDPATH",
    "GCONV_PATH",
    "LOCPATH",
    "NLSPATH",
    "HOSTALIASES",
    "RESOLV_HOST_CONF",
    "MALLOC_CONF",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PERL5LIB",
    "PERLLIB",
    "PERL5OPT",
    "RUBYLIB",
    "RUBYOPT",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "GIT_EXEC_PATH",
    "GIT_SSH",
    "GIT_SSH_COMMAND",
    "GIT_CONFIG_GLOBAL",
    "GIT_PAGER",
    "PAGER",
    "MANPAGER",
    "EDITOR",
    "VISUAL",
    "BROWSER",
    "SYSTEMD_PAGER",
    "LESSOPEN",
    "LESSCLOSE",
];

/// Whether setting `name` can change what a command loads or runs ([`LOADER_VARIABLES`], and
/// every `LD_*` and `DYLD_*` variable).
pub fn is_loader_variable(name: &str) -> bool {
    name.starts_with("LD_") || name.starts_with("DYLD_") || LOADER_VARIABLES.contains(&name)
}

/// Builtins whose arguments name variables they set or export.
const SETS_VARIABLES: &[&str] = &["export", "local", "readonly", "declare", "typeset", "read"];

/// Checks `command` (a Bash step's command line with its placeholders rendered as environment
/// references) against the step's policy: `allowed` (`None` = any command) and whether
/// command substitution is allowed.
///
/// # Errors
/// The first violation found, as a [`ShellError`].
pub fn check(
    command: &str,
    allowed: Option<&[String]>,
    allow_substitution: bool,
) -> Result<(), ShellError> {
    if !allow_substitution && let Some((found, offset)) = find_substitution(command) {
        let before = &command[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        return Err(ShellError::Substitution {
            found: found.to_owned(),
            line,
            column,
        });
    }
    let Some(allowed) = allowed else {
        return Ok(());
    };
    Checker {
        allowed,
        options: ParserOptions {
            sh_mode: true,
            posix_mode: true,
            ..ParserOptions::default()
        },
    }
    .program(command, 0)
}

/// The first command substitution in `text` outside single quotes: what it starts with and its
/// byte offset. Backslash escapes are honoured outside single quotes; `$((` (arithmetic) is not
/// a substitution itself, but what it contains is scanned.
fn find_substitution(text: &str) -> Option<(&'static str, usize)> {
    #[derive(PartialEq)]
    enum Q {
        None,
        Single,
        Double,
    }
    let bytes = text.as_bytes();
    let mut q = Q::None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match q {
            Q::Single => {
                if b == b'\'' {
                    q = Q::None;
                }
            }
            Q::None | Q::Double => match b {
                b'\\' => i += 1,
                b'\'' if q == Q::None => q = Q::Single,
                b'"' => q = if q == Q::Double { Q::None } else { Q::Double },
                b'`' => return Some(("`", i)),
                b'$' if bytes.get(i + 1) == Some(&b'(') => {
                    if bytes.get(i + 2) == Some(&b'(') {
                        i += 2;
                    } else {
                        return Some(("$(", i));
                    }
                }
                b'<' | b'>' if q == Q::None && bytes.get(i + 1) == Some(&b'(') => {
                    return Some((if b == b'<' { "<(" } else { ">(" }, i));
                }
                _ => {}
            },
        }
        i += 1;
    }
    None
}

/// Every `<<` (other than a `<<<` here-string), quoted or not, must open a well-formed
/// here-document: `<<` or `<<-`, optional blanks, a delimiter of ASCII letters, digits, `_`, `.`
/// or `-` (optionally in `'…'` or `"…"`) ending the word, and that delimiter alone on a later
/// line (after leading tabs with `<<-`). Conservative: `<<` inside quotes counts too.
fn check_heredocs(text: &str) -> Result<(), ShellError> {
    let bytes = text.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
    let mut i = 0;
    while let Some(at) = text[i..].find("<<").map(|k| k + i) {
        let line = text[..at].matches('\n').count() + 1;
        let run = bytes[at..].iter().take_while(|b| **b == b'<').count();
        if run > 3 {
            // The shell reads `<<<<<` as `<<<` and `<<`: a here-document whose delimiter
            // brush-parser 0.3 can panic on (found by fuzzing). No command needs one.
            return Err(ShellError::Syntax(format!(
                "{run} `<` in a row at line {line}: expected at most 3 (`<<<`, a here-string)"
            )));
        }
        if run == 3 {
            i = at + 3;
            continue;
        }
        let bad = || {
            ShellError::Syntax(format!(
                "here-document at line {line}: expected `<<WORD` (WORD: letters, digits, `_`, `.`, `-`, optionally quoted) with WORD alone on a later line"
            ))
        };
        let mut j = at + 2;
        let dash = bytes.get(j) == Some(&b'-');
        if dash {
            j += 1;
        }
        while matches!(bytes.get(j), Some(b' ' | b'\t')) {
            j += 1;
        }
        let quote = match bytes.get(j) {
            Some(q @ (b'\'' | b'"')) => {
                j += 1;
                Some(*q)
            }
            _ => None,
        };
        let start = j;
        while bytes.get(j).copied().is_some_and(is_word) {
            j += 1;
        }
        let word = &text[start..j];
        if word.is_empty() {
            return Err(bad());
        }
        if let Some(q) = quote {
            if bytes.get(j) != Some(&q) {
                return Err(bad());
            }
            j += 1;
        }
        if bytes.get(j).is_some_and(|b| {
            !matches!(
                b,
                b' ' | b'\t' | b'\n' | b';' | b'|' | b'&' | b'<' | b'>' | b')'
            )
        }) {
            return Err(bad());
        }
        let rest = text[j..].split_once('\n').map_or("", |(_, r)| r);
        let closed = rest.split('\n').any(|l| {
            let l = if dash { l.trim_start_matches('\t') } else { l };
            l == word
        });
        if !closed {
            return Err(bad());
        }
        i = j;
    }
    Ok(())
}

/// A run of 10 or more digits right before `<` or `>` (a redirection's file descriptor).
fn oversized_io_number(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let mut start = None;
    for (i, b) in bytes.iter().enumerate() {
        match (b.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (true, Some(_)) => {}
            (false, Some(s)) => {
                if i - s >= 10 && matches!(b, b'<' | b'>') {
                    return Some(&text[s..i]);
                }
                start = None;
            }
            (false, None) => {}
        }
    }
    None
}

struct Checker<'a> {
    allowed: &'a [String],
    options: ParserOptions,
}

impl Checker<'_> {
    fn program(&self, text: &str, depth: usize) -> Result<(), ShellError> {
        if depth > MAX_DEPTH {
            return Err(ShellError::Unchecked {
                what: format!("command substitutions nested deeper than {MAX_DEPTH}"),
            });
        }
        if let Some(fd) = oversized_io_number(text) {
            // brush-parser 0.3 panics on these (it unwraps the number's parse).
            return Err(ShellError::Syntax(format!(
                "file descriptor number {fd}: expected at most 9 digits"
            )));
        }
        // brush-parser 0.3's tokenizer can loop, allocating without bound, on malformed
        // here-documents (found by fuzzing): only well-formed ones reach it.
        check_heredocs(text)?;
        let tokens =
            brush_parser::tokenize_str(text).map_err(|e| ShellError::Syntax(e.to_string()))?;
        let program: Program = brush_parser::parse_tokens(
            &tokens,
            &self.options,
            &SourceInfo {
                source: "command".into(),
            },
        )
        .map_err(|e| ShellError::Syntax(e.to_string()))?;
        for c in &program.complete_commands {
            self.list(c, depth)?;
        }
        Ok(())
    }

    fn list(&self, list: &CompoundList, depth: usize) -> Result<(), ShellError> {
        for item in &list.0 {
            let and_or = &item.0;
            self.pipeline(&and_or.first, depth)?;
            for next in &and_or.additional {
                let (brush_parser::ast::AndOr::And(p) | brush_parser::ast::AndOr::Or(p)) = next;
                self.pipeline(p, depth)?;
            }
        }
        Ok(())
    }

    fn pipeline(&self, p: &Pipeline, depth: usize) -> Result<(), ShellError> {
        p.seq.iter().try_for_each(|c| self.command(c, depth))
    }

    fn command(&self, c: &Command, depth: usize) -> Result<(), ShellError> {
        match c {
            Command::Simple(s) => self.simple(s, depth),
            Command::Compound(cc, redirects) => {
                self.compound(cc, depth)?;
                if let Some(r) = redirects {
                    r.0.iter().try_for_each(|r| self.redirect(r, depth))?;
                }
                Ok(())
            }
            Command::Function(f) => Err(ShellError::Unchecked {
                what: format!("function definition `{}`", f.fname.value),
            }),
            Command::ExtendedTest(_) => Err(ShellError::Unchecked {
                what: "`[[ … ]]` (not POSIX sh)".into(),
            }),
        }
    }

    fn compound(&self, cc: &CompoundCommand, depth: usize) -> Result<(), ShellError> {
        match cc {
            CompoundCommand::Arithmetic(a) => self.raw(&a.expr.value, "arithmetic command"),
            CompoundCommand::ArithmeticForClause(f) => {
                for e in [&f.initializer, &f.condition, &f.updater]
                    .into_iter()
                    .flatten()
                {
                    self.raw(&e.value, "arithmetic `for`")?;
                }
                self.list(&f.body.list, depth)
            }
            CompoundCommand::BraceGroup(b) => self.list(&b.list, depth),
            CompoundCommand::Subshell(s) => self.list(&s.list, depth),
            CompoundCommand::ForClause(f) => {
                for w in f.values.iter().flatten() {
                    self.word(w, depth)?;
                }
                self.list(&f.body.list, depth)
            }
            CompoundCommand::CaseClause(c) => {
                self.word(&c.value, depth)?;
                for item in &c.cases {
                    for p in &item.patterns {
                        self.word(p, depth)?;
                    }
                    if let Some(body) = &item.cmd {
                        self.list(body, depth)?;
                    }
                }
                Ok(())
            }
            CompoundCommand::IfClause(i) => {
                self.list(&i.condition, depth)?;
                self.list(&i.then, depth)?;
                for e in i.elses.iter().flatten() {
                    if let Some(c) = &e.condition {
                        self.list(c, depth)?;
                    }
                    self.list(&e.body, depth)?;
                }
                Ok(())
            }
            CompoundCommand::WhileClause(w) | CompoundCommand::UntilClause(w) => {
                self.list(&w.0, depth)?;
                self.list(&w.1.list, depth)
            }
        }
    }

    fn simple(&self, s: &SimpleCommand, depth: usize) -> Result<(), ShellError> {
        let items = s
            .prefix
            .iter()
            .flat_map(|p| p.0.iter())
            .chain(s.suffix.iter().flat_map(|p| p.0.iter()));
        for item in items {
            match item {
                CommandPrefixOrSuffixItem::IoRedirect(r) => self.redirect(r, depth)?,
                CommandPrefixOrSuffixItem::Word(w) => self.word(w, depth)?,
                CommandPrefixOrSuffixItem::AssignmentWord(a, w) => {
                    let (brush_parser::ast::AssignmentName::VariableName(name)
                    | brush_parser::ast::AssignmentName::ArrayElementName(name, _)) = &a.name;
                    if is_loader_variable(name) {
                        return Err(ShellError::LoaderVariable {
                            name: name.clone(),
                            word: w.value.clone(),
                        });
                    }
                    self.word(w, depth)?;
                }
                CommandPrefixOrSuffixItem::ProcessSubstitution(_, sub) => {
                    self.list(&sub.list, depth)?;
                }
            }
        }
        let Some(name) = &s.word_or_name else {
            return Ok(()); // Only assignments or redirections.
        };
        self.word(name, depth)?;
        let literal = self.literal(name).ok_or_else(|| ShellError::ComputedName {
            word: name.value.clone(),
        })?;
        if SETS_VARIABLES.contains(&literal.as_str()) {
            // `export LD_PRELOAD=./x.so`, `read PATH`: the names among the arguments.
            for w in s
                .suffix
                .iter()
                .flat_map(|p| p.0.iter())
                .filter_map(|i| match i {
                    CommandPrefixOrSuffixItem::Word(w)
                    | CommandPrefixOrSuffixItem::AssignmentWord(_, w) => Some(w),
                    _ => None,
                })
            {
                let text = self.literal(w).unwrap_or_else(|| w.value.clone());
                let name = text
                    .split(['=', '['])
                    .next()
                    .unwrap_or("")
                    .trim_start_matches('+');
                if is_loader_variable(name) {
                    return Err(ShellError::LoaderVariable {
                        name: name.to_owned(),
                        word: w.value.clone(),
                    });
                }
            }
        }
        if ALWAYS_ALLOWED.contains(&literal.as_str()) || self.allowed.contains(&literal) {
            Ok(())
        } else {
            Err(ShellError::NotAllowed {
                name: literal,
                allowed: self.allowed.join(", "),
            })
        }
    }

    fn redirect(&self, r: &IoRedirect, depth: usize) -> Result<(), ShellError> {
        match r {
            IoRedirect::File(_, _, target) => match target {
                IoFileRedirectTarget::Filename(w) | IoFileRedirectTarget::Duplicate(w) => {
                    self.word(w, depth)
                }
                IoFileRedirectTarget::Fd(_) => Ok(()),
                IoFileRedirectTarget::ProcessSubstitution(_, sub) => self.list(&sub.list, depth),
            },
            IoRedirect::HereDocument(_, doc) => {
                if doc.requires_expansion {
                    self.word(&doc.doc, depth)
                } else {
                    Ok(())
                }
            }
            IoRedirect::HereString(_, w) | IoRedirect::OutputAndError(w, _) => self.word(w, depth),
        }
    }

    /// Checks the commands inside a word's substitutions.
    fn word(&self, w: &Word, depth: usize) -> Result<(), ShellError> {
        if find_substitution(&w.value).is_none() {
            return Ok(());
        }
        if let Some(what) = too_complex(&w.value) {
            return Err(ShellError::Unchecked { what });
        }
        let pieces = brush_parser::word::parse(&w.value, &self.options)
            .map_err(|e| ShellError::Syntax(e.to_string()))?;
        self.pieces(&pieces, &w.value, depth)
    }

    fn pieces(
        &self,
        pieces: &[WordPieceWithSource],
        whole: &str,
        depth: usize,
    ) -> Result<(), ShellError> {
        for WordPieceWithSource { piece, .. } in pieces {
            match piece {
                WordPiece::CommandSubstitution(inner) => self.program(inner, depth + 1)?,
                WordPiece::BackquotedCommandSubstitution(inner) => {
                    self.program(&unescape_backquoted(inner), depth + 1)?;
                }
                WordPiece::DoubleQuotedSequence(seq)
                | WordPiece::GettextDoubleQuotedSequence(seq) => {
                    self.pieces(seq, whole, depth)?;
                }
                WordPiece::ParameterExpansion(_) | WordPiece::ArithmeticExpression(_) => {
                    // Their operands may hold substitutions the walk above does not reach.
                    let text = piece_text(piece);
                    if text
                        .as_deref()
                        .is_none_or(|t| find_substitution(t).is_some())
                    {
                        return Err(ShellError::Unchecked {
                            what: format!("a substitution inside an expansion in `{whole}`"),
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn raw(&self, text: &str, what: &str) -> Result<(), ShellError> {
        match find_substitution(text) {
            None => Ok(()),
            Some(_) => Err(ShellError::Unchecked {
                what: format!("a substitution inside an {what}"),
            }),
        }
    }

    /// The word's value when it has no expansion at all (quotes removed).
    fn literal(&self, w: &Word) -> Option<String> {
        if too_complex(&w.value).is_some() {
            return None;
        }
        let pieces = brush_parser::word::parse(&w.value, &self.options).ok()?;
        let mut out = String::new();
        for p in &pieces {
            literal_piece(&p.piece, &mut out)?;
        }
        Some(out)
    }
}

fn literal_piece(piece: &WordPiece, out: &mut String) -> Option<()> {
    match piece {
        WordPiece::Text(t) | WordPiece::SingleQuotedText(t) => out.push_str(t),
        WordPiece::EscapeSequence(e) => out.push_str(e.strip_prefix('\\').unwrap_or(e)),
        WordPiece::DoubleQuotedSequence(seq) => {
            for p in seq {
                literal_piece(&p.piece, out)?;
            }
        }
        _ => return None,
    }
    Some(())
}

/// The source text of an expansion piece, when the parser kept it.
fn piece_text(piece: &WordPiece) -> Option<String> {
    match piece {
        WordPiece::ArithmeticExpression(e) => Some(e.value.clone()),
        WordPiece::ParameterExpansion(p) => Some(format!("{p:?}")),
        _ => None,
    }
}

/// Inside backquotes `\\`, `` \` `` and `\$` stand for the character itself (POSIX 2.6.3).
fn unescape_backquoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some('\\' | '`' | '$')) {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// Names the shell treats specially as a command's first word — reserved words, and the
/// builtins of dash and bash (several also exist as programs, like `echo`, `printf`, `test`,
/// `kill`, `time`, but the shell runs its own) — so [`direct_argv`] leaves them to the shell.
const SHELL_NAMES: &[&str] = &[
    "!",
    "{",
    "}",
    "[[",
    "]]",
    "case",
    "coproc",
    "do",
    "done",
    "elif",
    "else",
    "esac",
    "fi",
    "for",
    "function",
    "if",
    "in",
    "select",
    "then",
    "time",
    "until",
    "while",
    ".",
    ":",
    "[",
    "alias",
    "bg",
    "bind",
    "break",
    "builtin",
    "caller",
    "cd",
    "chdir",
    "command",
    "compgen",
    "complete",
    "compopt",
    "continue",
    "declare",
    "dirs",
    "disown",
    "echo",
    "enable",
    "eval",
    "exec",
    "exit",
    "export",
    "false",
    "fc",
    "fg",
    "getopts",
    "hash",
    "help",
    "history",
    "jobs",
    "kill",
    "let",
    "local",
    "logout",
    "mapfile",
    "popd",
    "printf",
    "pushd",
    "pwd",
    "read",
    "readarray",
    "readonly",
    "return",
    "set",
    "shift",
    "shopt",
    "source",
    "suspend",
    "test",
    "times",
    "trap",
    "true",
    "type",
    "typeset",
    "ulimit",
    "umask",
    "unalias",
    "unset",
    "wait",
];

/// Characters that stand for themselves outside quotes in every POSIX shell (no globbing,
/// expansion, quoting, operators or reserved words can start with them).
fn plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | ',' | '+' | '%' | '@')
}

/// The argument vector of `command` when it is one simple command that needs no shell to run —
/// GNU make's "fast path" (`job.c`, `construct_command_argv_internal`), for the same reason:
/// starting `/bin/sh` costs as much as the command it runs.
///
/// Accepted: words of plain characters (ASCII letters, digits, `-_./:,+%@`) (`=` too, after the first word), `'single quoted'`
/// text, and `"double quoted"` text without `\` or backticks whose only expansion is
/// `${NAME}` for a `NAME` in `env` (how [`crate::trace::Template::render_shell`] passes
/// values), which is replaced by its value without field splitting, as the shell would.
/// Everything else — operators, redirections, globs, other expansions, newlines, a first word
/// that is a reserved word or a builtin of dash or bash, or holds `=` (an assignment) — gives
/// `None`: the command is for the shell.
#[must_use]
pub fn direct_argv(command: &str, env: &[(String, String)]) -> Option<Vec<String>> {
    let mut words: Vec<String> = Vec::new();
    let mut chars = command.chars().peekable();
    loop {
        while chars.next_if(|c| matches!(c, ' ' | '\t')).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut word = String::new();
        while let Some(c) = chars.next_if(|c| !matches!(c, ' ' | '\t')) {
            match c {
                '\'' => loop {
                    match chars.next()? {
                        '\'' => break,
                        ch => word.push(ch),
                    }
                },
                '"' => loop {
                    match chars.next()? {
                        '"' => break,
                        '$' => {
                            if chars.next()? != '{' {
                                return None;
                            }
                            let mut name = String::new();
                            loop {
                                match chars.next()? {
                                    '}' => break,
                                    ch if ch.is_ascii_alphanumeric() || ch == '_' => name.push(ch),
                                    _ => return None,
                                }
                            }
                            word.push_str(&env.iter().find(|(k, _)| *k == name)?.1);
                        }
                        '`' | '\\' => return None,
                        ch => word.push(ch),
                    }
                },
                '=' if !words.is_empty() => word.push(c),
                c if plain(c) => word.push(c),
                _ => return None,
            }
        }
        words.push(word);
    }
    let name = words.first()?;
    if name.is_empty() || name.contains('=') || SHELL_NAMES.contains(&name.as_str()) {
        return None;
    }
    Some(words)
}

#[cfg(test)]
mod tests;
