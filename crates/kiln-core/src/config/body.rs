//! Checking a block body against a schema: unknown, misplaced, missing and repeated items.

use std::ops::Range;

use hcl_edit::structure::{Attribute, Block, Body};

use super::{Loader, span, suggest};
use crate::diag::Severity;

/// What a block body may contain.
#[derive(Debug)]
pub(super) struct Schema {
    /// How messages name the block: "image block", "the top level".
    pub what: &'static str,
    pub attrs: &'static [&'static str],
    pub blocks: &'static [&'static str],
}

/// The known attributes and blocks of one body, after checking.
#[derive(Debug)]
pub(super) struct Fields<'b> {
    what: &'static str,
    /// Where errors about the whole block point.
    pub header: Range<usize>,
    attrs: Vec<&'b Attribute>,
    blocks: Vec<&'b Block>,
}

impl<'b> Fields<'b> {
    pub fn attr(&self, key: &str) -> Option<&'b Attribute> {
        self.attrs.iter().copied().find(|a| a.key.as_str() == key)
    }

    pub fn blocks<'s>(&'s self, ident: &'s str) -> impl Iterator<Item = &'b Block> + 's {
        self.blocks
            .iter()
            .copied()
            .filter(move |b| b.ident.as_str() == ident)
    }
}

impl Loader<'_> {
    /// Sorts `body` into known attributes and blocks, reporting everything else.
    pub(super) fn fields<'b>(
        &mut self,
        body: &'b Body,
        header: Range<usize>,
        schema: &Schema,
    ) -> Fields<'b> {
        let mut fields = Fields {
            what: schema.what,
            header,
            attrs: Vec::new(),
            blocks: Vec::new(),
        };
        let in_what = in_block(schema.what);
        for attr in body.attributes() {
            let key = attr.key.as_str();
            if schema.attrs.contains(&key) {
                fields.attrs.push(attr);
            } else if schema.blocks.contains(&key) {
                let msg = format!("`{key}` is a block, not an attribute");
                let help = Some(format!("write it as `{key} {{ … }}`"));
                self.report(Severity::Error, span(&attr.key), msg, help);
            } else {
                let msg = format!("unknown attribute `{key}`{in_what}");
                let help = suggest(key, schema.attrs.iter().copied())
                    .or_else(|| expected_one_of("attributes", schema.attrs));
                self.report(Severity::Error, span(&attr.key), msg, help);
            }
        }
        for block in body.blocks() {
            let ident = block.ident.as_str();
            if schema.blocks.contains(&ident) {
                fields.blocks.push(block);
            } else if schema.attrs.contains(&ident) {
                let msg = format!("`{ident}` is an attribute, not a block");
                let help = Some(format!("write it as `{ident} = …`"));
                self.report(Severity::Error, span(&block.ident), msg, help);
            } else {
                let msg = format!("unknown block type `{ident}`{in_what}");
                let help = suggest(ident, schema.blocks.iter().copied())
                    .or_else(|| expected_one_of("blocks", schema.blocks));
                self.report(Severity::Error, span(&block.ident), msg, help);
            }
        }
        fields
    }

    /// The attribute `key`, reporting at the block header when it is missing.
    pub(super) fn required<'b>(&mut self, fields: &Fields<'b>, key: &str) -> Option<&'b Attribute> {
        let attr = fields.attr(key);
        if attr.is_none() {
            let msg = format!(
                "missing required attribute `{key}`{}",
                in_block(fields.what)
            );
            self.error(fields.header.clone(), msg);
        }
        attr
    }

    /// The one unlabelled block `ident` in `fields`, if present; repeats and labels are errors.
    pub(super) fn single_block<'b>(
        &mut self,
        fields: &Fields<'b>,
        ident: &str,
    ) -> Option<&'b Block> {
        let mut blocks = fields.blocks(ident);
        let first = blocks.next()?;
        for again in blocks {
            let msg = format!(
                "`{ident}` block appears more than once{}",
                in_block(fields.what)
            );
            self.error(span(&again.ident), msg);
        }
        for label in &first.labels {
            self.error(span(label), format!("`{ident}` block takes no labels"));
        }
        Some(first)
    }
}

fn in_block(what: &str) -> String {
    if what == "the top level" {
        String::new()
    } else {
        format!(" in {what}")
    }
}

fn expected_one_of(kind: &str, names: &[&str]) -> Option<String> {
    match names {
        [] => Some(format!("this block takes no {kind}")),
        _ => Some(format!("expected one of {}", backticked(names))),
    }
}

/// "`a`, `b` or `c`".
pub(super) fn backticked(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}
