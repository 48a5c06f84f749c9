//! Compiler diagnostics: what was expected, what was found, and where (`file:line:column`).

use std::fmt;

/// Maps byte offsets to 1-based (line, column).
pub(crate) struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    pub(crate) fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self { starts }
    }

    /// Byte offset of 1-based (line, column); the end of the text past the last line.
    pub(crate) fn offset(&self, line: usize, column: usize) -> usize {
        self.starts
            .get(line.saturating_sub(1))
            .map_or(usize::MAX, |s| s + column.saturating_sub(1))
    }

    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset);
        let col = offset - self.starts[line - 1] + 1;
        (line, col)
    }
}

/// How serious a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Information about how the source was read (e.g. a value inferred from another field).
    Note,
    /// Suspicious but accepted (LLMunix tolerated it).
    Warning,
    /// The trace does not compile.
    Error,
}

/// One problem found in a trace source, with its position (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file name as given to the compiler.
    pub file: String,
    /// 1-based line in the source file.
    pub line: usize,
    /// 1-based column in the source file.
    pub column: usize,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Note => "note",
            Severity::Warning => "warning",
            Severity::Error => "error",
        };
        write!(
            f,
            "{}:{}:{}: {sev}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every diagnostic a compilation produced, in source order. Returned as the error of a failed
/// compilation; it holds at least one [`Severity::Error`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Whether any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|d| d.severity == Severity::Error)
    }

    /// The number of errors.
    pub fn error_count(&self) -> usize {
        self.0
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }

    /// Sorts by position so that output reads top to bottom.
    pub fn sort(&mut self) {
        self.0.sort_by_key(|d| (d.line, d.column));
    }
}

impl Diagnostics {
    /// Renders every diagnostic like a compiler, with the offending source line and a caret
    /// under the reported column (codespan-reporting), followed by the error count. `source`
    /// is the text the diagnostics were produced from.
    pub fn render(&self, source: &str) -> String {
        use codespan_reporting::diagnostic::{Diagnostic as Cs, Label};
        use codespan_reporting::files::SimpleFile;
        use codespan_reporting::term::{Config, emit_into_string};
        let index = LineIndex::new(source);
        let mut out = String::new();
        // One SimpleFile per file name: building it indexes every line of the source, so
        // building it per diagnostic made rendering quadratic (a 1 MiB source of repeated
        // step headings took minutes).
        let mut files: std::collections::HashMap<&str, SimpleFile<&str, &str>> =
            std::collections::HashMap::new();
        for d in &self.0 {
            let file = files
                .entry(d.file.as_str())
                .or_insert_with(|| SimpleFile::new(d.file.as_str(), source));
            let mut start = index.offset(d.line, d.column).min(source.len());
            while !source.is_char_boundary(start) {
                start -= 1;
            }
            let end = source[start..]
                .find('\n')
                .map_or(source.len(), |n| start + n);
            let cs = match d.severity {
                Severity::Error => Cs::error(),
                Severity::Warning => Cs::warning(),
                Severity::Note => Cs::note(),
            }
            .with_message(&d.message)
            .with_labels(vec![Label::primary((), start..end.max(start))]);
            match emit_into_string(&Config::default(), &*file, &cs) {
                Ok(text) => out.push_str(&text),
                Err(_) => out.push_str(&format!("{d}\n")),
            }
        }
        let errors = self.error_count();
        if errors > 0 {
            out.push_str(&format!(
                "{errors} error{} found\n",
                if errors == 1 { "" } else { "s" }
            ));
        }
        out
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.0 {
            writeln!(f, "{d}")?;
        }
        let errors = self.error_count();
        if errors > 0 {
            write!(
                f,
                "{errors} error{} found",
                if errors == 1 { "" } else { "s" }
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_the_line_and_a_caret() {
        let src = "line one\ntool: Teleport\n";
        let d = Diagnostics(vec![Diagnostic {
            severity: Severity::Error,
            file: "x.trace.md".into(),
            line: 2,
            column: 7,
            message: "unknown tool `Teleport`".into(),
        }]);
        let r = d.render(src);
        assert!(r.contains("error: unknown tool `Teleport`"), "{r}");
        assert!(r.contains("x.trace.md:2:7"), "{r}");
        assert!(r.contains("tool: Teleport"), "{r}");
        assert!(r.contains("^^^^^^^^"), "{r}");
        assert!(r.ends_with("1 error found\n"), "{r}");
        // Positions past the text or inside a character do not panic.
        let odd = Diagnostics(vec![Diagnostic {
            line: 99,
            column: 3,
            ..d.0[0].clone()
        }]);
        assert!(odd.render("é").contains("unknown tool"));
    }
}
