//! `image` blocks and their provisioners.

use std::ops::Range;

use hcl::Value;
use hcl_edit::structure::Block;

use super::body::Schema;
use super::eval::At;
use super::{Loader, Ref, header, span, suggest};
use crate::diag::Severity;
use crate::model::{Base, FileStep, Image, Owner, Provisioner, RunConfig, Script, ShellStep, Step};

const IMAGE: Schema = Schema {
    what: "image block",
    attrs: &[
        "target",
        "base",
        "entrypoint",
        "cmd",
        "env",
        "workdir",
        "user",
        "ports",
        "labels",
    ],
    blocks: &["provisioner"],
};

const FILE: Schema = Schema {
    what: "file provisioner",
    attrs: &["source", "destination", "mode", "owner"],
    blocks: &[],
};

const SHELL: Schema = Schema {
    what: "shell provisioner",
    attrs: &["inline", "script", "environment", "network"],
    blocks: &[],
};

const BASE_FORMS: &str = "a base such as \"scratch\", image.NAME, \"tar:PATH\", \"dir:PATH\" or \
                          \"oci:PATH[:TAG]\"";

/// Reads a base written as text; `image.NAME` references arrive here as the same text.
pub(super) fn parse_base(text: &str) -> Option<Base> {
    let non_empty = |p: &str| (!p.is_empty()).then(|| p.to_owned());
    if text == "scratch" {
        return Some(Base::Scratch);
    }
    if let Some(name) = text.strip_prefix("image.") {
        return non_empty(name).map(|name| Base::Image { name });
    }
    if let Some(path) = text.strip_prefix("tar:") {
        return non_empty(path).map(|path| Base::Tar { path });
    }
    if let Some(path) = text.strip_prefix("dir:") {
        return non_empty(path).map(|path| Base::Dir { path });
    }
    let rest = text.strip_prefix("oci:")?;
    // A colon followed by a slash belongs to the path (`oci:C:/layouts/x`), not to a tag.
    match rest.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') => Some(Base::Oci {
            path: non_empty(path)?,
            tag: Some(non_empty(tag)?),
        }),
        _ => Some(Base::Oci {
            path: non_empty(rest)?,
            tag: None,
        }),
    }
}

impl Loader<'_> {
    /// The image, and the span of its `base` value for errors found later (cycles).
    pub(super) fn image(&mut self, name: &str, block: &Block) -> (Image, Range<usize>) {
        let fields = self.fields(&block.body, header(block), &IMAGE);
        let loc = self.loc(span(&block.ident).start);
        let base_attr = fields.attr("base");
        let base_span = base_attr.map_or(header(block), |a| span(&a.value));
        let base = self.get(base_attr, Self::base).unwrap_or(Base::Scratch);
        let run = RunConfig {
            entrypoint: self.get(fields.attr("entrypoint"), Self::string_list),
            cmd: self.get(fields.attr("cmd"), Self::string_list),
            env: self
                .get(fields.attr("env"), Self::string_map)
                .unwrap_or_default(),
            workdir: self.get(fields.attr("workdir"), Self::string),
            user: self.get(fields.attr("user"), Self::string),
            ports: self
                .get(fields.attr("ports"), Self::ports)
                .unwrap_or_default(),
            labels: self
                .get(fields.attr("labels"), Self::string_map)
                .unwrap_or_default(),
        };
        let provisioners = fields
            .blocks("provisioner")
            .filter_map(|b| self.provisioner(b))
            .collect();
        let target = self.target_ref(&fields);
        let image = Image {
            name: name.to_owned(),
            base,
            base_loc: self.loc(base_span.start),
            provisioners,
            run,
            target,
            loc,
        };
        (image, base_span)
    }

    fn base(&mut self, value: &Value, at: &At<'_>) -> Option<Base> {
        let base = match value {
            Value::String(text) => parse_base(text),
            _ => None,
        };
        match &base {
            Some(Base::Image { name }) => {
                if !self.check_known(Ref::Image, name, at.span.clone()) {
                    return None;
                }
            }
            Some(_) => {}
            None => self.mismatch(at, BASE_FORMS, value),
        }
        base
    }

    fn ports(&mut self, value: &Value, at: &At<'_>) -> Option<Vec<u16>> {
        let Value::Array(items) = value else {
            self.mismatch(at, "a list of ports", value);
            return None;
        };
        let ports: Vec<Option<u16>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.int(item, &at.elem(i), 1, Some(65535)))
            .collect();
        ports.into_iter().collect()
    }

    fn provisioner(&mut self, block: &Block) -> Option<Provisioner> {
        let loc = self.loc(span(&block.ident).start);
        let Some(label) = block.labels.first() else {
            let msg = "provisioner needs a type, as in provisioner \"file\" { … }";
            self.error(span(&block.ident), msg);
            return None;
        };
        for extra in &block.labels[1..] {
            self.error(span(extra), "provisioner takes one label, its type");
        }
        let step = match label.as_str() {
            "file" => Step::File(self.file_step(block)?),
            "shell" => Step::Shell(self.shell_step(block)?),
            other => {
                let msg = format!("unknown provisioner type `{other}`");
                let help = suggest(other, ["file", "shell"])
                    .or_else(|| Some("expected `file` or `shell`".into()));
                self.report(Severity::Error, span(label), msg, help);
                return None;
            }
        };
        Some(Provisioner { step, loc })
    }

    fn file_step(&mut self, block: &Block) -> Option<FileStep> {
        let fields = self.fields(&block.body, header(block), &FILE);
        let source_attr = self.required(&fields, "source");
        let source = self.get(source_attr, Self::string);
        let destination_attr = self.required(&fields, "destination");
        let destination = self.get(destination_attr, |cx, v, at| {
            let path = cx.string(v, at)?;
            if !path.starts_with('/') {
                cx.mismatch(at, "an absolute path in the image", v);
                return None;
            }
            Some(path)
        });
        let mode = self.get(fields.attr("mode"), Self::mode);
        let owner = self.get(fields.attr("owner"), Self::owner);
        Some(FileStep {
            source_loc: self.loc(span(&source_attr?.value).start),
            source: source?,
            destination: destination?,
            mode,
            owner,
        })
    }

    /// HCL has no octal literals, so `mode = 0755` arrives as the number 755: its digits are
    /// read as octal, which is what the author meant.
    fn mode(&mut self, value: &Value, at: &At<'_>) -> Option<u32> {
        let digits = match value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) if n.is_u64() => Some(n.to_string()),
            _ => None,
        };
        let mode = digits
            .and_then(|d| u32::from_str_radix(&d, 8).ok())
            .filter(|m| *m <= 0o7777);
        if mode.is_none() {
            self.mismatch(
                at,
                "an octal mode from \"0000\" to \"7777\", such as \"0755\"",
                value,
            );
        }
        mode
    }

    fn owner(&mut self, value: &Value, at: &At<'_>) -> Option<Owner> {
        let owner = match value {
            Value::Number(n) => n
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(|uid| Owner { uid, gid: uid }),
            Value::String(s) => match s.split_once(':') {
                Some((uid, gid)) => uid
                    .parse()
                    .ok()
                    .zip(gid.parse().ok())
                    .map(|(uid, gid)| Owner { uid, gid }),
                None => s.parse().ok().map(|uid| Owner { uid, gid: uid }),
            },
            _ => None,
        };
        if owner.is_none() {
            self.mismatch(at, "a numeric owner such as \"1000:1000\" or 1000", value);
        }
        owner
    }

    fn shell_step(&mut self, block: &Block) -> Option<ShellStep> {
        let fields = self.fields(&block.body, header(block), &SHELL);
        let inline = fields.attr("inline");
        let script = fields.attr("script");
        let script = match (inline, script) {
            (Some(inline), None) => Script::Inline(self.get(Some(inline), Self::string_list)?),
            (None, Some(script)) => Script::File {
                path: self.get(Some(script), Self::string)?,
                loc: self.loc(span(&script.value).start),
            },
            (Some(a), Some(b)) => {
                let second = if span(a).start > span(b).start { a } else { b };
                self.error(
                    span(&second.key),
                    "set either `inline` or `script`, not both",
                );
                return None;
            }
            (None, None) => {
                let msg = "shell provisioner needs `inline` or `script`";
                self.error(fields.header.clone(), msg);
                return None;
            }
        };
        let environment = self.get(fields.attr("environment"), Self::string_map);
        let network = self.get(fields.attr("network"), Self::boolean);
        Some(ShellStep {
            script,
            environment: environment.unwrap_or_default(),
            network: network.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_forms() {
        let oci = |path: &str, tag: Option<&str>| Base::Oci {
            path: path.into(),
            tag: tag.map(Into::into),
        };
        assert_eq!(parse_base("scratch"), Some(Base::Scratch));
        assert_eq!(
            parse_base("image.web"),
            Some(Base::Image { name: "web".into() })
        );
        assert_eq!(
            parse_base("tar:./rootfs.tar"),
            Some(Base::Tar {
                path: "./rootfs.tar".into()
            })
        );
        assert_eq!(
            parse_base("dir:rootfs"),
            Some(Base::Dir {
                path: "rootfs".into()
            })
        );
        assert_eq!(parse_base("oci:./layout"), Some(oci("./layout", None)));
        assert_eq!(
            parse_base("oci:./layout:v1"),
            Some(oci("./layout", Some("v1")))
        );
        assert_eq!(
            parse_base("oci:C:/layouts/x"),
            Some(oci("C:/layouts/x", None))
        );
        for bad in ["", "ubuntu", "image.", "tar:", "oci:", "oci:x:", "Scratch"] {
            assert_eq!(parse_base(bad), None, "{bad:?}");
        }
    }
}
