//! The crate's error type.

use std::path::PathBuf;
use std::time::Duration;

/// Why policies could not be loaded or evaluated. A policy that cannot be evaluated never
/// passes: callers treat every error as a failed check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A policy does not parse.
    #[error("{file}:{line}:{col}: {message}\n{snippet}")]
    Parse {
        /// The file, as loaded (the path on disk for [`crate::load_dir`], the module's path
        /// otherwise).
        file: String,
        /// 1-based line of the error.
        line: u32,
        /// 1-based column of the error.
        col: u32,
        /// What is wrong.
        message: String,
        /// The offending line with a caret under the column, as regorus prints it.
        snippet: String,
    },
    /// A policy set failed to evaluate: a rule raised an error (a builtin's, a conflict, a
    /// compile error). The message names the file, line and column where regorus knows them.
    #[error("policy set {set}: package {package}: {message}")]
    Eval {
        /// The set.
        set: String,
        /// The package being evaluated (dotted, without `data.`), or `*` while loading.
        package: String,
        /// regorus's message, with its `--> file:line:col` pointer.
        message: String,
    },
    /// Evaluation ran past [`crate::Limits::timeout`] and was stopped.
    #[error("policy set {set}: package {package}: evaluation stopped after {}ms (limit {}ms)", elapsed.as_millis(), limit.as_millis())]
    Timeout {
        /// The set.
        set: String,
        /// The package being evaluated when the limit struck.
        package: String,
        /// How long the whole evaluation had run.
        elapsed: Duration,
        /// The limit.
        limit: Duration,
    },
    /// A `deny`/`violation`/`warn` or `exception` rule produced something other than the
    /// conventions allow (a boolean, a number, an object without a string `msg`). Such a rule
    /// is an error rather than ignored, so that a typo cannot silently pass a plan.
    #[error("policy set {set}: {package}.{rule}: {message}")]
    Shape {
        /// The set.
        set: String,
        /// The package.
        package: String,
        /// The rule.
        rule: String,
        /// What is wrong.
        message: String,
    },
    /// The input or data document could not be handed to the engine.
    #[error("policy set {set}: {message}")]
    Document {
        /// The set.
        set: String,
        /// What is wrong.
        message: String,
    },
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The `Parse` error for regorus's report of `source` at `file`: regorus prints
///
/// ```text
/// --> policy.rego:4:5
///   |
/// 4 |   x :=
///   |     ^
/// error: expecting `}` while parsing set
/// ```
///
/// from which the position and message are taken; the whole text is kept as the snippet.
pub(crate) fn parse_error(file: &str, err: &anyhow::Error) -> Error {
    let text = err.to_string();
    let mut line = 0;
    let mut col = 0;
    let mut message = String::new();
    for l in text.lines() {
        let t = l.trim();
        if let Some(pos) = t.strip_prefix("--> ") {
            // `path:line:col`; the path itself may hold colons.
            let mut parts = pos.rsplitn(3, ':');
            col = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            line = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        } else if let Some(m) = t.strip_prefix("error: ") {
            m.clone_into(&mut message);
        }
    }
    if message.is_empty() {
        message = text.trim().to_owned();
    }
    let snippet = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("error: "))
        .collect::<Vec<_>>()
        .join("\n");
    Error::Parse {
        file: file.to_owned(),
        line,
        col,
        message,
        snippet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regorus_positions_are_surfaced() {
        let mut engine = regorus::Engine::new();
        let err = engine
            .add_policy(
                "C:/odd:path/p.rego".into(),
                "package p\n\ndeny contains x if {\n  x := \n}\n".into(),
            )
            .unwrap_err();
        let Error::Parse {
            file,
            line,
            col,
            message,
            snippet,
        } = parse_error("/policies/p.rego", &err)
        else {
            panic!("not a parse error");
        };
        assert_eq!(file, "/policies/p.rego");
        assert_eq!((line, col), (4, 5));
        assert_eq!(message, "expecting `}` while parsing set");
        assert!(
            snippet.starts_with("--> C:/odd:path/p.rego:4:5"),
            "{snippet}"
        );
        assert!(snippet.contains('^'), "{snippet}");
    }
}
