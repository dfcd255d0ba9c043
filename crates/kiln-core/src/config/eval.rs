//! Evaluating attribute expressions and converting their values to model types.
//!
//! Every converter reports its own diagnostic and returns `None` on failure; callers then fall
//! back to a default, since any error already makes the whole config unusable.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use hcl::Value;
use hcl::eval::Evaluate;
use hcl_edit::expr::{Expression, ObjectKey, TraversalOperator};
use hcl_edit::structure::Attribute;
use hcl_edit::visit::{Visit, visit_expr};
use hcl_edit::{Decorated, Ident};

use super::{Loader, Names, span, suggest};

/// Where a value came from: the span to blame and, when the value was written literally, its
/// expression, so that errors inside lists and objects can point at the element at fault.
#[derive(Debug, Clone)]
pub(super) struct At<'e> {
    pub span: Range<usize>,
    expr: Option<&'e Expression>,
}

impl<'e> At<'e> {
    pub fn expr(expr: &'e Expression) -> Self {
        Self {
            span: span(expr),
            expr: Some(expr),
        }
    }

    /// Element `i` of a list.
    pub fn elem(&self, i: usize) -> At<'e> {
        match self.expr {
            Some(Expression::Array(array)) => array.get(i).map_or(self.vague(), At::expr),
            _ => self.vague(),
        }
    }

    /// The value of `key` in an object.
    pub fn field(&self, key: &str) -> At<'e> {
        self.entry(key).map_or(self.vague(), |(_, v)| At::expr(v))
    }

    /// The key `key` of an object, for errors about the key itself.
    pub fn key(&self, key: &str) -> Range<usize> {
        self.entry(key).map_or(self.span.clone(), |(k, _)| span(k))
    }

    fn entry(&self, key: &str) -> Option<(&'e ObjectKey, &'e Expression)> {
        let Some(Expression::Object(object)) = self.expr else {
            return None;
        };
        object
            .iter()
            .find(|(k, _)| match k {
                ObjectKey::Ident(ident) => ident.as_str() == key,
                ObjectKey::Expression(Expression::String(s)) => s.as_str() == key,
                ObjectKey::Expression(_) => false,
            })
            .map(|(k, v)| (k, v.expr()))
    }

    fn vague(&self) -> At<'e> {
        At {
            span: self.span.clone(),
            expr: None,
        }
    }
}

/// How a value reads in "found …": `number 30`, `string "abc"`, `a list`.
pub(super) fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("bool {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "an object".into(),
    }
}

impl Loader<'_> {
    /// Evaluates `attr` if present and converts its value with `convert`.
    pub(super) fn get<T>(
        &mut self,
        attr: Option<&Attribute>,
        convert: impl FnOnce(&mut Self, &Value, &At<'_>) -> Option<T>,
    ) -> Option<T> {
        let attr = attr?;
        let value = self.eval(&attr.value)?;
        convert(self, &value, &At::expr(&attr.value))
    }

    /// Checks the references in `expr`, then evaluates it.
    pub(super) fn eval(&mut self, expr: &Expression) -> Option<Value> {
        let mut check = RefCheck {
            names: &self.names,
            bound: Vec::new(),
            problems: Vec::new(),
            uses_unset: false,
        };
        check.visit_expr(expr);
        let RefCheck {
            problems,
            uses_unset,
            ..
        } = check;
        let clean = problems.is_empty();
        for (at, msg, help) in problems {
            self.report(crate::diag::Severity::Error, at, msg, help);
        }
        if !clean || uses_unset {
            return None;
        }
        let result = hcl::Expression::from(expr.clone()).evaluate(&self.ctx);
        self.evaluated(expr, result)
    }

    /// The value of an evaluation, or `None` with the error reported at the whole expression
    /// (hcl-rs errors carry no position).
    fn evaluated(
        &mut self,
        expr: &Expression,
        result: Result<Value, hcl::eval::Error>,
    ) -> Option<Value> {
        match result {
            Ok(value) => Some(value),
            Err(err) => {
                self.error(
                    span(expr),
                    format!("cannot evaluate this expression: {}", err.kind()),
                );
                None
            }
        }
    }

    /// Evaluates an expression that may not refer to anything, such as a variable default.
    pub(super) fn eval_literal(&mut self, expr: &Expression, what: &str) -> Option<Value> {
        let mut check = LiteralCheck(Vec::new());
        check.visit_expr(expr);
        let clean = check.0.is_empty();
        for at in check.0 {
            self.error(
                at,
                format!("{what} must be a literal value, not a reference"),
            );
        }
        if !clean {
            return None;
        }
        let result = hcl::Expression::from(expr.clone()).evaluate(&hcl::eval::Context::new());
        self.evaluated(expr, result)
    }

    pub(super) fn mismatch(&mut self, at: &At<'_>, expected: &str, found: &Value) {
        self.error(
            at.span.clone(),
            format!("expected {expected}, found {}", describe(found)),
        );
    }

    pub(super) fn string(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        match value {
            Value::String(s) => Some(s.clone()),
            other => {
                self.mismatch(at, "a string", other);
                None
            }
        }
    }

    pub(super) fn boolean(&mut self, value: &Value, at: &At<'_>) -> Option<bool> {
        match value {
            Value::Bool(b) => Some(*b),
            other => {
                self.mismatch(at, "true or false", other);
                None
            }
        }
    }

    /// An integer from `min` to `max` (or to the largest `T` when `max` is `None`).
    pub(super) fn int<T: TryFrom<i64>>(
        &mut self,
        value: &Value,
        at: &At<'_>,
        min: i64,
        max: Option<i64>,
    ) -> Option<T> {
        let expected = match max {
            Some(max) => format!("an integer from {min} to {max}"),
            None => format!("an integer of at least {min}"),
        };
        let n = match value {
            Value::Number(n) => n.as_i64(),
            _ => None,
        };
        let in_range = n.filter(|n| *n >= min && max.is_none_or(|max| *n <= max));
        match in_range.and_then(|n| T::try_from(n).ok()) {
            Some(n) => Some(n),
            None => {
                self.mismatch(at, &expected, value);
                None
            }
        }
    }

    /// A number from `min` to `max`, fractions allowed.
    pub(super) fn fraction(
        &mut self,
        value: &Value,
        at: &At<'_>,
        min: f64,
        max: f64,
    ) -> Option<f64> {
        let n = match value {
            Value::Number(n) => n.as_f64().filter(|n| (min..=max).contains(n)),
            _ => None,
        };
        if n.is_none() {
            self.mismatch(at, &format!("a number from {min} to {max}"), value);
        }
        n
    }

    pub(super) fn duration(&mut self, value: &Value, at: &At<'_>) -> Option<Duration> {
        let Value::String(text) = value else {
            self.mismatch(at, "a duration such as \"30s\"", value);
            return None;
        };
        match humantime::parse_duration(text) {
            Ok(d) => Some(d),
            Err(err) => {
                let msg = format!("expected a duration such as \"30s\", found string {text:?}");
                let help = Some(lowercase_first(&err.to_string()));
                self.report(crate::diag::Severity::Error, at.span.clone(), msg, help);
                None
            }
        }
    }

    pub(super) fn string_list(&mut self, value: &Value, at: &At<'_>) -> Option<Vec<String>> {
        let Value::Array(items) = value else {
            self.mismatch(at, "a list of strings", value);
            return None;
        };
        let strings: Vec<Option<String>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.string(item, &at.elem(i)))
            .collect();
        strings.into_iter().collect()
    }

    /// A map of strings; numbers and bools are accepted and written as text, as the environment
    /// and labels they end up in only hold text.
    pub(super) fn string_map(
        &mut self,
        value: &Value,
        at: &At<'_>,
    ) -> Option<BTreeMap<String, String>> {
        let Value::Object(entries) = value else {
            self.mismatch(at, "a map of strings", value);
            return None;
        };
        let mut map = BTreeMap::new();
        let mut ok = true;
        for (key, item) in entries {
            let text = match item {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    self.mismatch(&at.field(key), "a string, number or bool", other);
                    ok = false;
                    continue;
                }
            };
            map.insert(key.clone(), text);
        }
        ok.then_some(map)
    }
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_lowercase().chain(chars).collect())
        .unwrap_or_default()
}

/// Finds references to undeclared names before evaluation, with their exact spans.
struct RefCheck<'n> {
    names: &'n Names,
    /// Names bound by enclosing `for` expressions.
    bound: Vec<String>,
    problems: Vec<(Range<usize>, String, Option<String>)>,
    uses_unset: bool,
}

impl RefCheck<'_> {
    fn root(&mut self, root: &Decorated<Ident>, first: Option<&Decorated<TraversalOperator>>) {
        let name = root.as_str();
        let (kind, known) = match name {
            "var" => ("variable", &self.names.vars),
            "image" => ("image", &self.names.images),
            "service" => ("service", &self.names.services),
            "target" => ("target", &self.names.targets),
            _ if self.bound.iter().any(|b| b == name) => return,
            _ => {
                let help = suggest(name, ["var", "image", "service", "target"]).or_else(|| {
                    Some("references start with `var.`, `image.`, `service.` or `target.`".into())
                });
                self.problems
                    .push((span(root), format!("unknown name `{name}`"), help));
                return;
            }
        };
        let Some(TraversalOperator::GetAttr(attr)) = first.map(|op| &**op) else {
            return;
        };
        let member = attr.as_str();
        if !known.contains(member) {
            let help = suggest(member, known.iter().map(String::as_str));
            let at = span(root).start..span(attr).end;
            self.problems
                .push((at, format!("unknown {kind} `{member}`"), help));
        } else if kind == "variable" && self.names.unset_vars.contains(member) {
            self.uses_unset = true;
        }
    }
}

impl Visit for RefCheck<'_> {
    fn visit_expr(&mut self, expr: &Expression) {
        match expr {
            Expression::Variable(root) => self.root(root, None),
            Expression::Traversal(traversal) => {
                if let Expression::Variable(root) = &traversal.expr {
                    self.root(root, traversal.operators.first());
                } else {
                    self.visit_expr(&traversal.expr);
                }
                for op in &traversal.operators {
                    if let TraversalOperator::Index(index) = &**op {
                        self.visit_expr(index);
                    }
                }
            }
            Expression::ForExpr(for_expr) => {
                let intro = &for_expr.intro;
                // The collection is evaluated outside the loop's own names.
                self.visit_expr(&intro.collection_expr);
                let depth = self.bound.len();
                self.bound
                    .extend(intro.key_var.iter().map(|k| k.as_str().to_owned()));
                self.bound.push(intro.value_var.as_str().to_owned());
                if let Some(key) = &for_expr.key_expr {
                    self.visit_expr(key);
                }
                self.visit_expr(&for_expr.value_expr);
                if let Some(cond) = &for_expr.cond {
                    self.visit_expr(&cond.expr);
                }
                self.bound.truncate(depth);
            }
            _ => visit_expr(self, expr),
        }
    }
}

/// Collects the spans of anything that is not a literal value.
struct LiteralCheck(Vec<Range<usize>>);

impl Visit for LiteralCheck {
    fn visit_expr(&mut self, expr: &Expression) {
        match expr {
            Expression::Variable(_)
            | Expression::Traversal(_)
            | Expression::FuncCall(_)
            | Expression::ForExpr(_) => self.0.push(span(expr)),
            _ => visit_expr(self, expr),
        }
    }
}
