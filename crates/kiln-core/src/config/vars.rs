//! `variable` blocks, `-var` / `KILN_VAR_*` overrides, and the evaluation context they feed.

use std::collections::BTreeMap;

use hcl::Value;
use hcl_edit::expr::Expression;
use hcl_edit::structure::Block;

use super::body::{Schema, backticked};
use super::eval::At;
use super::{Decls, Loader, header, span, suggest};
use crate::diag::{Loc, Severity};
use crate::model::{VarOverride, VarSource, Variable};

const VARIABLE: Schema = Schema {
    what: "variable block",
    attrs: &["default", "type", "description", "sensitive"],
    blocks: &[],
};

/// The types a variable may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarType {
    String,
    Number,
    Bool,
    List,
    Map,
}

impl VarType {
    const NAMES: [&'static str; 5] = ["string", "number", "bool", "list", "map"];

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "string" => Self::String,
            "number" => Self::Number,
            "bool" => Self::Bool,
            "list" => Self::List,
            "map" => Self::Map,
            _ => return None,
        })
    }

    fn of(value: &Value) -> Option<Self> {
        Some(match value {
            Value::String(_) => Self::String,
            Value::Number(_) => Self::Number,
            Value::Bool(_) => Self::Bool,
            Value::Array(_) => Self::List,
            Value::Object(_) => Self::Map,
            Value::Null => return None,
        })
    }

    fn expected(self) -> &'static str {
        match self {
            Self::String => "a string",
            Self::Number => "a number",
            Self::Bool => "true or false",
            Self::List => "a list",
            Self::Map => "a map",
        }
    }
}

impl Loader<'_> {
    /// Resolves every variable and declares `var`, `image` and `service` for evaluation.
    pub(super) fn variables(
        &mut self,
        decls: &Decls<'_>,
        overrides: &[VarOverride],
    ) -> BTreeMap<String, Variable> {
        self.names.vars = decls.iter().map(|(n, _)| n.clone()).collect();
        for o in overrides {
            if o.source == VarSource::Flag && !self.names.vars.contains(&o.name) {
                let help = suggest(&o.name, self.names.vars.iter().map(String::as_str));
                let msg = format!("-var {}: no variable `{}` is declared", o.name, o.name);
                self.unplaced(msg, help);
            }
        }
        let mut variables = BTreeMap::new();
        for (name, block) in decls {
            match self.variable(name, block, overrides) {
                Some(var) => {
                    variables.insert(name.clone(), var);
                }
                None => {
                    self.names.unset_vars.insert(name.clone());
                }
            }
        }

        let values = variables
            .iter()
            .filter_map(|(name, var)| Some((name.clone(), hcl::to_value(&var.value).ok()?)))
            .collect::<hcl::Map<String, Value>>();
        self.ctx.declare_var("var", Value::Object(values));
        for (root, names) in [
            ("image", &self.names.images),
            ("service", &self.names.services),
            ("target", &self.names.targets),
        ] {
            // A reference evaluates to the same text as its quoted form, so `image.web` and
            // "image.web" need only one code path afterwards.
            let refs = names
                .iter()
                .map(|n| (n.clone(), Value::String(format!("{root}.{n}"))))
                .collect::<hcl::Map<String, Value>>();
            self.ctx.declare_var(root, Value::Object(refs));
        }
        variables
    }

    fn variable(
        &mut self,
        name: &str,
        block: &Block,
        overrides: &[VarOverride],
    ) -> Option<Variable> {
        let fields = self.fields(&block.body, header(block), &VARIABLE);
        let declared = fields.attr("type").and_then(|a| self.var_type(&a.value));
        let default_attr = fields.attr("default");
        let default = default_attr.and_then(|a| {
            let value = self.eval_literal(&a.value, "a variable default")?;
            match declared {
                Some(ty) if VarType::of(&value) != Some(ty) => {
                    self.mismatch(&At::expr(&a.value), ty.expected(), &value);
                    None
                }
                _ => Some(value),
            }
        });
        self.get(fields.attr("description"), Self::string);
        let sensitive = self
            .get(fields.attr("sensitive"), Self::boolean)
            .unwrap_or(false);
        let ty = declared
            .or_else(|| default.as_ref().and_then(VarType::of))
            .unwrap_or(VarType::String);

        // Flags beat the environment; among equals the last one given wins, as with Terraform.
        let chosen =
            overrides
                .iter()
                .filter(|o| o.name == name)
                .fold(None::<&VarOverride>, |best, o| match best {
                    Some(b) if b.source == VarSource::Flag && o.source != VarSource::Flag => best,
                    _ => Some(o),
                });
        let loc = self.loc(span(&block.ident).start);
        let value = match chosen {
            Some(o) => Some((self.convert_override(o, ty, sensitive, &loc)?, o.source)),
            None => default.map(|d| (d, VarSource::Default)),
        };
        let Some((value, source)) = value else {
            if default_attr.is_none() {
                let msg = format!(
                    "variable `{name}` has no value; set it with -var {name}=… or KILN_VAR_{name}"
                );
                self.error(header(block), msg);
            }
            return None;
        };
        let Ok(value) = serde_json::to_value(&value) else {
            self.error(
                header(block),
                format!("variable `{name}` has a value kiln cannot store"),
            );
            return None;
        };
        Some(Variable {
            value,
            source,
            sensitive,
            loc,
        })
    }

    /// `type = "number"`, or the bare `type = number` Terraform users write.
    fn var_type(&mut self, expr: &Expression) -> Option<VarType> {
        let word = match expr {
            Expression::String(s) => s.as_str(),
            Expression::Variable(v) => v.as_str(),
            _ => "",
        };
        let ty = VarType::parse(word);
        if ty.is_none() {
            let msg = format!("expected a type, one of {}", backticked(&VarType::NAMES));
            let help = suggest(word, VarType::NAMES);
            self.report(Severity::Error, span(expr), msg, help);
        }
        ty
    }

    fn convert_override(
        &mut self,
        o: &VarOverride,
        ty: VarType,
        sensitive: bool,
        declared_at: &Loc,
    ) -> Option<Value> {
        let text = o.value.as_str();
        let parsed = match ty {
            VarType::String => Some(Value::String(text.to_owned())),
            VarType::Number => parse_number(text).map(Value::Number),
            VarType::Bool => match text.trim() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            VarType::List | VarType::Map => hcl_edit::parser::parse_expr(text)
                .ok()
                .and_then(|e| evaluate_literal(&e.into()))
                .filter(|v| VarType::of(v) == Some(ty)),
        };
        if parsed.is_none() {
            // Sensitive values must never be echoed, not even in an error.
            let shown = if sensitive { "(sensitive)" } else { text };
            let given = match o.source {
                VarSource::Env => format!("KILN_VAR_{}={shown}", o.name),
                VarSource::Flag | VarSource::Default => format!("-var {}={shown}", o.name),
            };
            let msg = format!("{given}: expected {}", ty.expected());
            let help = Some(format!("`{}` is declared at {declared_at}", o.name));
            self.unplaced(msg, help);
        }
        parsed
    }
}

fn parse_number(text: &str) -> Option<hcl::Number> {
    let text = text.trim();
    if let Ok(n) = text.parse::<i64>() {
        return Some(n.into());
    }
    text.parse::<f64>().ok().and_then(hcl::Number::from_f64)
}

/// Evaluates override text, which can refer to nothing.
fn evaluate_literal(expr: &hcl::Expression) -> Option<Value> {
    use hcl::eval::Evaluate;
    expr.evaluate(&hcl::eval::Context::new()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn numbers_parse_as_integers_when_they_can() {
        assert_eq!(parse_number(" 3 "), Some(3.into()));
        assert_eq!(parse_number("0.5"), hcl::Number::from_f64(0.5));
        assert_eq!(parse_number("abc"), None);
        assert_eq!(parse_number("NaN"), None);
    }
}
