//! Drift: what runs is not what the state says.
//!
//! A [`Finding`] names one difference with its [`Category`], where it is (service, release,
//! instance) and what was expected and found. A [`Report`] is every finding of one check;
//! drift is answered only by replacement ([`crate::plan::drift_plan`]), never by patching.
//!
//! A check that could not establish its baseline (no image manifest, a runtime that cannot
//! be observed) reports [`Category::Unknown`]: a report is clean only when every check ran
//! and found nothing.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The kinds of drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// The state says an instance runs; nothing runs.
    Missing,
    /// Something runs that the state does not know: a process kiln started, or a proxy
    /// backend.
    Unmanaged,
    /// An instance's root is not its release's image.
    ImageMismatch,
    /// A file in an instance's root was added, removed, or changed in content, mode or owner
    /// compared with the image.
    FileTamper,
    /// An instance's environment or command differs from its release.
    Config,
    /// The proxy's routes or weights differ from the state.
    Routing,
    /// The state was changed outside kiln (serial, lineage or hash).
    State,
    /// A check could not run, so nothing is known: never counted as clean.
    Unknown,
}

impl Category {
    /// The name used in reports and JSON (`file_tamper`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Unmanaged => "unmanaged",
            Self::ImageMismatch => "image_mismatch",
            Self::FileTamper => "file_tamper",
            Self::Config => "config",
            Self::Routing => "routing",
            Self::State => "state",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One difference between the state and what runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Finding {
    /// What kind.
    pub category: Category,
    /// The service, if the finding belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The release, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u32>,
    /// The instance (or proxy backend), if the finding is about one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The file or setting concerned (`/var/www/index.html`, `env.GREETING`, `weight of v2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// What the state (or image) says. Secret values are never here: environment values
    /// are shown as a digest prefix.
    pub expected: String,
    /// What was found.
    pub found: String,
}

impl Finding {
    /// A finding of `category` with no location yet.
    pub fn new(category: Category, expected: impl Into<String>, found: impl Into<String>) -> Self {
        Self {
            category,
            service: None,
            release: None,
            instance: None,
            subject: None,
            expected: expected.into(),
            found: found.into(),
        }
    }

    /// In `service`.
    #[must_use]
    pub fn service(mut self, service: &str) -> Self {
        self.service = Some(service.to_owned());
        self
    }

    /// Of release `release`.
    #[must_use]
    pub fn release(mut self, release: u32) -> Self {
        self.release = Some(release);
        self
    }

    /// About instance `id`.
    #[must_use]
    pub fn instance(mut self, id: &str) -> Self {
        self.instance = Some(id.to_owned());
        self
    }

    /// About `subject` (a path, a setting).
    #[must_use]
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Whether replacing the instance it names answers it.
    pub fn replaceable(&self) -> bool {
        self.instance.is_some()
            && matches!(
                self.category,
                Category::ImageMismatch | Category::FileTamper | Category::Config
            )
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<14}", self.category.as_str())?;
        let mut place = Vec::new();
        if let Some(s) = &self.service {
            place.push(s.clone());
        }
        if let Some(r) = self.release {
            place.push(format!("v{r}"));
        }
        if let Some(i) = &self.instance {
            place.push(i.clone());
        }
        if !place.is_empty() {
            write!(f, " {}", place.join(" "))?;
        }
        if let Some(s) = &self.subject {
            write!(f, " {s}")?;
        }
        write!(f, ": expected {}, found {}", self.expected, self.found)
    }
}

/// Every finding of one drift check.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// When the check ran (RFC 3339).
    pub checked_at: String,
    /// Findings, sorted by category, service, instance and subject.
    pub findings: Vec<Finding>,
    /// Instances compared with the state.
    pub instances_checked: u64,
    /// Image roots verified file by file.
    pub roots_verified: u64,
    /// Files whose content was hashed (the rest were unchanged since their last hash).
    pub files_hashed: u64,
}

impl Report {
    /// Whether every check ran and found nothing.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// Sorts the findings and drops exact repeats.
    pub fn normalize(&mut self) {
        self.findings.sort();
        self.findings.dedup();
    }

    /// Keeps only the findings of `service` (and those of no service, such as the state's).
    pub fn only_service(&mut self, service: &str) {
        self.findings
            .retain(|f| f.service.as_deref().is_none_or(|s| s == service));
    }

    /// The findings, one per line, then a summary line.
    pub fn render(&self) -> String {
        if self.is_clean() {
            return format!(
                "No drift: {} instances and {} image roots match the state.\n",
                self.instances_checked, self.roots_verified
            );
        }
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(&f.to_string());
            out.push('\n');
        }
        let mut counts: std::collections::BTreeMap<Category, usize> = Default::default();
        for f in &self.findings {
            *counts.entry(f.category).or_default() += 1;
        }
        let summary: Vec<String> = counts.iter().map(|(c, n)| format!("{n} {c}")).collect();
        out.push_str(&format!(
            "\nDrift: {} ({} findings).\n",
            summary.join(", "),
            self.findings.len()
        ));
        out
    }
}

/// A value shown in a finding without revealing it: `sha256:1a2b3c4d…` of the value, or
/// `unset`.
pub fn masked(value: Option<&str>) -> String {
    match value {
        None => "unset".to_owned(),
        Some(v) => {
            let d = crate::Digest::of(v.as_bytes()).to_string();
            format!("{}…", &d[..15])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_render_with_their_place_and_sort_by_category() {
        let mut report = Report {
            findings: vec![
                Finding::new(Category::Routing, "v2 100%", "v2 50%, v3 50%").service("web"),
                Finding::new(Category::FileTamper, "sha256:ab…", "sha256:cd…")
                    .service("web")
                    .release(2)
                    .instance("web-v2-1a2b3c")
                    .subject("/var/www/index.html"),
            ],
            instances_checked: 2,
            roots_verified: 1,
            ..Report::default()
        };
        report.normalize();
        expect_test::expect![[r#"
            file_tamper    web v2 web-v2-1a2b3c /var/www/index.html: expected sha256:ab…, found sha256:cd…
            routing        web: expected v2 100%, found v2 50%, v3 50%

            Drift: 1 file_tamper, 1 routing (2 findings).
        "#]]
        .assert_eq(&report.render());
        assert!(!report.is_clean());
    }

    #[test]
    fn a_clean_report_says_what_it_checked() {
        let report = Report {
            instances_checked: 3,
            roots_verified: 1,
            ..Report::default()
        };
        assert!(report.is_clean());
        assert_eq!(
            report.render(),
            "No drift: 3 instances and 1 image roots match the state.\n"
        );
    }

    #[test]
    fn secrets_are_masked() {
        let shown = masked(Some("hunter2"));
        assert!(!shown.contains("hunter2"));
        assert!(shown.starts_with("sha256:"));
        assert_eq!(masked(None), "unset");
    }

    #[test]
    fn only_instance_findings_of_what_runs_are_replaceable() {
        let tamper = Finding::new(Category::FileTamper, "a", "b").instance("i");
        assert!(tamper.replaceable());
        assert!(!Finding::new(Category::State, "a", "b").replaceable());
        assert!(
            !Finding::new(Category::Missing, "a", "b")
                .instance("i")
                .replaceable()
        );
    }
}
