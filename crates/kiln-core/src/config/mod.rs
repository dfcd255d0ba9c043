//! Config loading: `kiln.hcl` text → [`Config`] plus every diagnostic.
//!
//! The text is parsed with `hcl-edit`, which keeps byte spans, and the body is walked by hand
//! against kiln's schema so that each problem points at the exact text at fault. Expressions are
//! evaluated with `hcl-rs` after their references (`var.x`, `image.web`, `service.api`) have been
//! checked here, because evaluation errors carry no position.
//!
//! Loading runs in passes: declarations (to know every name), variables (to build the evaluation
//! context), images, services and balancers, then whole-config checks such as base cycles.

mod balancer;
mod body;
mod eval;
mod graph;
mod image;
mod notify;
mod service;
mod target;
#[cfg(test)]
mod tests;
mod vars;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use hcl_edit::Span;
use hcl_edit::structure::{Block, Body};

use crate::diag::{Diagnostic, Loc, Severity, SourceMap, did_you_mean};
use crate::model::{Config, VarOverride};

use self::body::Schema;
pub use self::graph::bake_order;

/// One config source file.
#[derive(Debug, Clone)]
pub struct Source {
    /// The name shown in diagnostics (the path as the user gave it).
    pub name: String,
    /// The file's text.
    pub text: String,
}

/// Evaluates a config. Returns the model when there is no error, and every diagnostic found,
/// ordered by position (problems with the `-var` flags, which have no position, come first).
pub fn load(source: &Source, overrides: &[VarOverride]) -> (Option<Config>, Vec<Diagnostic>) {
    let mut cx = Loader::new(source);
    let config = match hcl_edit::parser::parse_body(&source.text) {
        Ok(body) => Some(cx.config(&body, overrides)),
        Err(err) => {
            cx.syntax_error(&err);
            None
        }
    };
    let mut diags = cx.diags;
    diags.sort_by_key(|d| (d.loc.line, d.loc.col));
    let config = config.filter(|_| !diags.iter().any(Diagnostic::is_error));
    (config, diags)
}

const TOP: Schema = Schema {
    what: "the top level",
    attrs: &["project"],
    blocks: &[
        "variable",
        "image",
        "service",
        "balancer",
        "notify",
        "drift",
        "environment",
        "policy",
        "target",
        "backend",
    ],
};

const ENVIRONMENT: Schema = Schema {
    what: "environment block",
    attrs: &["name", "protected"],
    blocks: &[],
};

const POLICY: Schema = Schema {
    what: "policy block",
    attrs: &["dir", "enforcement"],
    blocks: &[],
};

const BUILTIN_POLICY: Schema = Schema {
    what: "policy \"builtin\" block",
    attrs: &["enforcement", "disable", "max_image_age"],
    blocks: &[],
};

const DRIFT: Schema = Schema {
    what: "drift block",
    attrs: &["interval", "auto_remediate", "watch", "full_every"],
    blocks: &[],
};

/// The names a config declares, known before any expression is evaluated so that references can
/// be checked in any order.
#[derive(Debug, Default)]
struct Names {
    vars: BTreeSet<String>,
    /// Declared variables that ended up without a value (already reported); expressions using
    /// them are skipped rather than reported again.
    unset_vars: BTreeSet<String>,
    images: BTreeSet<String>,
    services: BTreeSet<String>,
    /// `local` and the declared `target` blocks.
    targets: BTreeSet<String>,
}

/// What a reference written as text (`"image.web"`) names.
#[derive(Debug, Clone, Copy)]
enum Ref {
    Image,
    Service,
    Target,
}

/// The state of one `load`: the source, the diagnostics so far and the evaluation context.
struct Loader<'a> {
    map: SourceMap<'a>,
    text: &'a str,
    diags: Vec<Diagnostic>,
    names: Names,
    ctx: hcl::eval::Context<'static>,
}

/// Top-level blocks of one kind, by label, in source order.
type Decls<'b> = Vec<(String, &'b Block)>;

impl<'a> Loader<'a> {
    fn new(source: &'a Source) -> Self {
        Self {
            map: SourceMap::new(&source.name, &source.text),
            text: &source.text,
            diags: Vec::new(),
            names: Names::default(),
            ctx: hcl::eval::Context::new(),
        }
    }

    fn config(&mut self, body: &Body, overrides: &[VarOverride]) -> Config {
        let top = self.fields(body, 0..0, &TOP);
        let project = self.required(&top, "project");
        let variables = self.declarations(top.blocks("variable"));
        let images = self.declarations(top.blocks("image"));
        let services = self.declarations(top.blocks("service"));
        let balancers = self.declarations(top.blocks("balancer"));
        let targets = self.declarations(top.blocks("target"));
        let backends = self.declarations(top.blocks("backend"));

        self.names.images = images.iter().map(|(n, _)| n.clone()).collect();
        self.names.services = services.iter().map(|(n, _)| n.clone()).collect();
        self.names.targets = std::iter::once("local".to_owned())
            .chain(
                targets
                    .iter()
                    .map(|(n, _)| n.clone())
                    .filter(|n| target::TARGET_KINDS.contains(&n.as_str())),
            )
            .collect();
        let variables = self.variables(&variables, overrides);
        let project = self.get(project, Self::string).unwrap_or_default();

        let mut base_spans = BTreeMap::new();
        let images = images
            .iter()
            .map(|(name, block)| {
                let (image, base_span) = self.image(name, block);
                base_spans.insert(name.clone(), base_span);
                (name.clone(), image)
            })
            .collect();
        self.base_cycles(&images, &base_spans);
        let service_blocks = services;
        let services = service_blocks
            .iter()
            .map(|(name, block)| (name.clone(), self.service(name, block)))
            .collect();
        let balancers = self.balancers(&balancers);
        let notify = self.notify_blocks(&top);
        let drift = self
            .single_block(&top, "drift")
            .map(|b| self.drift(b))
            .unwrap_or_default();
        let environment = self
            .single_block(&top, "environment")
            .map(|b| self.environment(b))
            .unwrap_or_default();
        let policy_blocks = self.declarations(top.blocks("policy"));
        let mut policies = Vec::new();
        let mut builtin_policy = crate::model::BuiltinPolicyConfig::default();
        for (name, block) in &policy_blocks {
            if name == "builtin" {
                builtin_policy = self.builtin_policy(block);
            } else {
                policies.push(self.policy_set(name, block));
            }
        }
        let aws = self.targets(&targets);
        let backend = self.backend(&backends);
        let config = Config {
            project,
            variables,
            images,
            services,
            balancers,
            notify,
            drift,
            environment,
            policies,
            builtin_policy,
            aws,
            backend,
        };
        let aws_block = targets.iter().find(|(n, _)| n == "aws").map(|(_, b)| *b);
        self.check_targets(&config, &service_blocks, aws_block);
        config
    }

    /// The `environment` block.
    fn environment(&mut self, block: &Block) -> crate::model::Environment {
        for label in &block.labels {
            self.error(span(label), "`environment` block takes no labels");
        }
        let f = self.fields(&block.body, header(block), &ENVIRONMENT);
        let mut env = crate::model::Environment::default();
        if let Some(n) = self.get(f.attr("name"), Self::string) {
            env.name = n;
        }
        if let Some(p) = self.get(f.attr("protected"), Self::boolean) {
            env.protected = p;
        }
        env
    }

    /// A `policy "NAME"` block.
    fn policy_set(&mut self, name: &str, block: &Block) -> crate::model::PolicySetConfig {
        let f = self.fields(&block.body, header(block), &POLICY);
        crate::model::PolicySetConfig {
            name: name.to_owned(),
            dir: self
                .get(f.attr("dir"), Self::string)
                .unwrap_or_else(|| "policies".to_owned()),
            enforcement: self
                .get(f.attr("enforcement"), Self::enforcement)
                .unwrap_or(crate::model::Enforcement::HardMandatory),
        }
    }

    /// The `policy "builtin"` block.
    fn builtin_policy(&mut self, block: &Block) -> crate::model::BuiltinPolicyConfig {
        let f = self.fields(&block.body, header(block), &BUILTIN_POLICY);
        let mut b = crate::model::BuiltinPolicyConfig {
            enforcement: self.get(f.attr("enforcement"), Self::enforcement),
            ..Default::default()
        };
        if let Some(list) = self.get(f.attr("disable"), Self::string_list) {
            b.disable = list;
        }
        if let Some(d) = self.get(f.attr("max_image_age"), Self::duration) {
            b.max_image_age = d;
        }
        b
    }

    fn enforcement(
        &mut self,
        value: &hcl::Value,
        at: &eval::At<'_>,
    ) -> Option<crate::model::Enforcement> {
        use crate::model::Enforcement;
        let e = match value {
            hcl::Value::String(s) if s == "advisory" => Some(Enforcement::Advisory),
            hcl::Value::String(s) if s == "soft_mandatory" => Some(Enforcement::SoftMandatory),
            hcl::Value::String(s) if s == "hard_mandatory" => Some(Enforcement::HardMandatory),
            _ => None,
        };
        if e.is_none() {
            self.mismatch(
                at,
                "\"advisory\", \"soft_mandatory\" or \"hard_mandatory\"",
                value,
            );
        }
        e
    }

    /// The `drift` block.
    fn drift(&mut self, block: &Block) -> crate::model::DriftSettings {
        for label in &block.labels {
            self.error(span(label), "`drift` block takes no labels");
        }
        let f = self.fields(&block.body, header(block), &DRIFT);
        let mut settings = crate::model::DriftSettings::default();
        if let Some(d) = self.get(f.attr("interval"), Self::duration) {
            settings.interval = d;
        }
        if let Some(b) = self.get(f.attr("auto_remediate"), Self::boolean) {
            settings.auto_remediate = b;
        }
        if let Some(b) = self.get(f.attr("watch"), Self::boolean) {
            settings.watch = b;
        }
        if let Some(n) = self.get(f.attr("full_every"), |cx, v, at| cx.int(v, at, 1, None)) {
            settings.full_every = n;
        }
        settings
    }

    /// Checks that each block has exactly one label, unique among its kind.
    fn declarations<'b>(&mut self, blocks: impl Iterator<Item = &'b Block>) -> Decls<'b> {
        let mut seen: BTreeMap<String, Loc> = BTreeMap::new();
        let mut out = Vec::new();
        for block in blocks {
            let kind = block.ident.as_str();
            let Some(label) = block.labels.first() else {
                self.error(
                    span(&block.ident),
                    format!("{kind} block needs a name, as in {kind} \"NAME\" {{ … }}"),
                );
                continue;
            };
            if let Some(extra) = block.labels.get(1) {
                self.error(
                    span(extra),
                    format!("{kind} block takes one name, found {}", block.labels.len()),
                );
            }
            let name = label.as_str().to_owned();
            if let Some(first) = seen.get(&name) {
                let msg = format!("{kind} `{name}` is already declared at {first}");
                self.error(span(label), msg);
                continue;
            }
            seen.insert(name.clone(), self.map.loc(span(&block.ident).start));
            out.push((name, block));
        }
        out
    }

    fn syntax_error(&mut self, err: &hcl_edit::parser::Error) {
        let at = err.location().offset();
        let text = self.map_text_from(at);
        // hcl-edit rejects a repeated attribute key while parsing; say so in kiln's words.
        if err.message().contains("redefined attribute") {
            let key: String = text
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            let msg = format!("attribute `{key}` is set twice in the same block");
            self.error(at..at + key.len(), msg);
        } else {
            self.error(at..at + 1, format!("syntax error: {}", err.message()));
        }
    }

    fn map_text_from(&self, at: usize) -> &'a str {
        self.text.get(at..).unwrap_or_default()
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.report(Severity::Error, span, message, None);
    }

    fn report(
        &mut self,
        severity: Severity,
        span: Range<usize>,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let mut d = self.map.diagnostic(severity, span, message);
        d.help = help;
        self.diags.push(d);
    }

    /// An error about something that has no place in the file, such as a `-var` flag.
    fn unplaced(&mut self, message: String, help: Option<String>) {
        self.diags.push(Diagnostic {
            severity: Severity::Error,
            loc: Loc {
                file: self.map.file().to_owned(),
                line: 0,
                col: 0,
            },
            message,
            line_text: String::new(),
            width: 1,
            help,
        });
    }

    /// Reports `name` unless such an image or service is declared.
    fn check_known(&mut self, kind: Ref, name: &str, at: Range<usize>) -> bool {
        let (what, known) = match kind {
            Ref::Image => ("image", &self.names.images),
            Ref::Service => ("service", &self.names.services),
            Ref::Target => ("target", &self.names.targets),
        };
        if known.contains(name) {
            return true;
        }
        let help = suggest(name, known.iter().map(String::as_str));
        self.report(
            Severity::Error,
            at,
            format!("unknown {what} `{name}`"),
            help,
        );
        false
    }

    /// A reference such as `image.web` or its quoted form `"image.web"`, to a declared name.
    fn reference(&mut self, kind: Ref, value: &hcl::Value, at: &eval::At<'_>) -> Option<String> {
        let root = match kind {
            Ref::Image => "image",
            Ref::Service => "service",
            Ref::Target => "target",
        };
        let name = match value {
            hcl::Value::String(text) => text.strip_prefix(root).and_then(|t| t.strip_prefix('.')),
            _ => None,
        };
        let Some(name) = name else {
            let msg = format!(
                "expected a reference such as {root}.NAME, found {}",
                eval::describe(value)
            );
            let help = match value {
                hcl::Value::String(text) => Some(text.as_str()),
                _ => None,
            }
            .and_then(|text| {
                let known = match kind {
                    Ref::Image => &self.names.images,
                    Ref::Service => &self.names.services,
                    Ref::Target => &self.names.targets,
                };
                known
                    .contains(text)
                    .then(|| format!("did you mean {root}.{text}?"))
            });
            self.report(Severity::Error, at.span.clone(), msg, help);
            return None;
        };
        self.check_known(kind, name, at.span.clone())
            .then(|| name.to_owned())
    }

    fn loc(&self, offset: usize) -> Loc {
        self.map.loc(offset)
    }
}

/// The byte range of parsed text; everything `parse_body` returns carries one.
fn span(node: &impl Span) -> Range<usize> {
    node.span().unwrap_or(0..0)
}

/// The span of a block's identifier and labels, where errors about the whole block point.
fn header(block: &Block) -> Range<usize> {
    let start = span(&block.ident).start;
    let end = block
        .labels
        .last()
        .map_or(span(&block.ident).end, |l| span(l).end);
    start..end
}

/// "did you mean `x`?" for the candidate closest to `word`, if any is close.
///
/// Jaro-Winkler misses swapped letters in short names (`wbe` for `web`), so one edit of
/// distance is accepted as well.
fn suggest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<String> {
    let candidates: Vec<&str> = candidates.into_iter().collect();
    did_you_mean(word, candidates.iter().copied())
        .or_else(|| {
            candidates
                .iter()
                .copied()
                .filter(|c| word.chars().count() >= 3 && strsim::osa_distance(word, c) == 1)
                .min()
        })
        .map(|c| format!("did you mean `{c}`?"))
}
