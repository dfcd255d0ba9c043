//! Diagnostics: every problem found in a config, with where it is and what was expected.
//!
//! Analyses never stop at the first problem; they return what they could build together with
//! every diagnostic, so `kiln validate` can show all mistakes at once.

use std::fmt;
use std::ops::Range;

use serde::Serialize;

/// How bad a diagnostic is. Any `Error` makes a config unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The config cannot be used.
    Error,
    /// The config works but probably does not do what its author meant.
    Warning,
}

/// A position in a source file, 1-based, with columns counted in characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Default)]
pub struct Loc {
    /// The file as the user named it.
    pub file: String,
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1, in characters.
    pub col: u32,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// One problem in a source file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// Where the offending text starts.
    pub loc: Loc,
    /// What is wrong, lowercase, saying what was expected and what was found.
    pub message: String,
    /// The whole source line holding the offending text (empty when there is none).
    pub line_text: String,
    /// How many characters of `line_text`, from `loc.col`, are at fault (at least 1).
    pub width: u32,
    /// A suggestion, such as "did you mean `interval`?".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl Diagnostic {
    /// True for errors.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// `file:line:col: error: message`, the source line, a caret under the offending text, and
    /// the help line if any.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {sev}: {}", self.loc, self.message)?;
        if !self.line_text.is_empty() {
            let gutter = self.loc.line.to_string().len();
            let pad: String = self
                .line_text
                .chars()
                .take(self.loc.col.saturating_sub(1) as usize)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            write!(
                f,
                "\n{:gutter$} |\n{} | {}\n{:gutter$} | {}{}",
                "",
                self.loc.line,
                self.line_text,
                "",
                pad,
                "^".repeat(self.width.max(1) as usize)
            )?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

/// Maps byte offsets of one source text to lines and columns.
#[derive(Debug, Clone)]
pub struct SourceMap<'a> {
    file: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    /// Indexes `text`, known to the user as `file`.
    pub fn new(file: &'a str, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            file,
            text,
            line_starts,
        }
    }

    /// The file name.
    pub fn file(&self) -> &str {
        self.file
    }

    /// The location of byte `offset`.
    pub fn loc(&self, offset: usize) -> Loc {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self.text[start..floor_char_boundary(self.text, offset)]
            .chars()
            .count();
        Loc {
            file: self.file.to_owned(),
            line: line as u32 + 1,
            col: col as u32 + 1,
        }
    }

    /// The text of the (0-based) line holding `offset`, without its line ending.
    fn line_text(&self, offset: usize) -> &'a str {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let end = self
            .line_starts
            .get(line + 1)
            .map_or(self.text.len(), |&e| e - 1);
        self.text[start..end].trim_end_matches('\r')
    }

    /// An error diagnostic covering `span` (clipped to its first line).
    pub fn error(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        self.diagnostic(Severity::Error, span, message)
    }

    /// A diagnostic of any severity covering `span` (clipped to its first line).
    pub fn diagnostic(
        &self,
        severity: Severity,
        span: Range<usize>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let loc = self.loc(span.start);
        let line_text = self.line_text(span.start).to_owned();
        let on_line = line_text
            .chars()
            .count()
            .saturating_sub(loc.col as usize - 1);
        let end = floor_char_boundary(self.text, span.end.min(self.text.len()));
        let start = floor_char_boundary(self.text, span.start.min(end));
        let width = self.text[start..end].chars().count().min(on_line).max(1);
        Diagnostic {
            severity,
            loc,
            message: message.into(),
            line_text,
            width: width as u32,
            help: None,
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub fn did_you_mean<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn locations_are_one_based_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        let map = SourceMap::new("k.hcl", text);
        assert_eq!(map.loc(0).to_string(), "k.hcl:1:1");
        let x = text.find("\"x").unwrap();
        assert_eq!(map.loc(x).to_string(), "k.hcl:2:6");
    }

    #[test]
    fn renders_line_and_caret() {
        let text = "image \"web\" {\n  bsae = \"scratch\"\n}\n";
        let map = SourceMap::new("kiln.hcl", text);
        let at = text.find("bsae").unwrap();
        let mut d = map.error(at..at + 4, "unknown attribute `bsae` in image block");
        d.help = Some("did you mean `base`?".into());
        expect_test::expect![[r#"
            kiln.hcl:2:3: error: unknown attribute `bsae` in image block
              |
            2 |   bsae = "scratch"
              |   ^^^^
              = help: did you mean `base`?"#]]
        .assert_eq(&d.to_string());
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("intervl", ["interval", "timeout"]),
            Some("interval")
        );
        assert_eq!(did_you_mean("zzz", ["interval", "timeout"]), None);
    }
}
