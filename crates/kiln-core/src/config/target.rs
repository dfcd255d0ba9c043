//! The `target "aws"` block (where instances and AMIs are made on AWS), the `target`
//! attribute of services and images, and the `backend "s3"` block (where the state is kept).

use std::collections::BTreeMap;

use hcl::Value;
use hcl_edit::structure::Block;

use super::body::{Fields, Schema};
use super::eval::At;
use super::{Decls, Loader, Ref, header, span};
use crate::diag::Severity;
use crate::model::{AwsTarget, Backend, S3Backend, SourceAmi, TargetKind};

/// The target kinds a `target` block may declare.
pub(super) const TARGET_KINDS: &[&str] = &["aws"];

const AWS: Schema = Schema {
    what: "target \"aws\" block",
    attrs: &[
        "region",
        "endpoint_url",
        "vpc_id",
        "subnets",
        "security_groups",
        "instance_type",
        "key_name",
        "iam_instance_profile",
        "artifact_bucket",
        "source_ami",
        "builder_instance_type",
        "tags",
    ],
    blocks: &["source_ami_filter"],
};

const SOURCE_AMI_FILTER: Schema = Schema {
    what: "source_ami_filter block",
    attrs: &["filters", "owners", "most_recent"],
    blocks: &[],
};

const S3: Schema = Schema {
    what: "backend \"s3\" block",
    attrs: &["bucket", "key", "region", "dynamodb_table", "endpoint_url"],
    blocks: &[],
};

impl Loader<'_> {
    /// The `target` blocks; only `target "aws"` exists, at most once.
    pub(super) fn targets(&mut self, decls: &Decls<'_>) -> Option<AwsTarget> {
        let mut aws = None;
        for (kind, block) in decls {
            if kind == "aws" {
                aws = self.aws_target(block);
            } else {
                let label = block.labels.first().map_or(header(block), span);
                let help = super::suggest(kind, TARGET_KINDS.iter().copied())
                    .or_else(|| Some("the local runtime needs no block".to_owned()));
                let msg = format!("unknown target `{kind}`; expected `aws`");
                self.report(Severity::Error, label, msg, help);
            }
        }
        aws
    }

    fn aws_target(&mut self, block: &Block) -> Option<AwsTarget> {
        let f = self.fields(&block.body, header(block), &AWS);
        let region = self.required(&f, "region");
        let region = self.get(region, Self::region);
        let endpoint_url = self.get(f.attr("endpoint_url"), Self::endpoint_url);
        let vpc_id = self.get(f.attr("vpc_id"), |cx, v, at| cx.aws_id(v, at, "vpc-"));
        let subnets = self.required(&f, "subnets");
        let subnets = self.get(subnets, |cx, v, at| cx.aws_ids(v, at, "subnet-"));
        let security_groups = self.required(&f, "security_groups");
        let security_groups = self.get(security_groups, |cx, v, at| cx.aws_ids(v, at, "sg-"));
        let instance_type = self.required(&f, "instance_type");
        let instance_type = self.get(instance_type, Self::instance_type);
        let key_name = self.get(f.attr("key_name"), Self::non_empty_string);
        let iam_instance_profile = self.get(f.attr("iam_instance_profile"), Self::non_empty_string);
        let artifact_bucket = self.get(f.attr("artifact_bucket"), Self::bucket_name);
        let builder_instance_type = self.get(f.attr("builder_instance_type"), Self::instance_type);
        let tags = self
            .get(f.attr("tags"), Self::user_tags)
            .unwrap_or_default();
        let source_ami = self.source_ami(&f);
        Some(AwsTarget {
            region: region?,
            endpoint_url,
            vpc_id,
            subnets: subnets?,
            security_groups: security_groups?,
            instance_type: instance_type?,
            key_name,
            iam_instance_profile,
            artifact_bucket,
            source_ami,
            builder_instance_type,
            tags,
        })
    }

    /// `source_ami = "ami-…"` or one `source_ami_filter` block, not both.
    fn source_ami(&mut self, f: &Fields<'_>) -> Option<SourceAmi> {
        let id_attr = f.attr("source_ami");
        let id = self.get(id_attr, |cx, v, at| cx.aws_id(v, at, "ami-"));
        let filter = self.single_block(f, "source_ami_filter");
        if let (Some(attr), Some(_)) = (id_attr, filter) {
            let msg = "set either `source_ami` or a `source_ami_filter` block, not both";
            self.error(span(&attr.key), msg);
            return None;
        }
        if let Some(id) = id {
            return Some(SourceAmi::Id { id });
        }
        let block = filter?;
        let f = self.fields(&block.body, header(block), &SOURCE_AMI_FILTER);
        let filters = self.required(&f, "filters");
        let filters = self.get(filters, Self::ami_filters);
        let owners = self.required(&f, "owners");
        let owners = self.get(owners, Self::string_list);
        if let (Some(o), Some(attr)) = (&owners, f.attr("owners"))
            && o.is_empty()
        {
            let msg = "expected at least one owner (an account id, `amazon` or `self`)";
            self.error(span(&attr.value), msg);
            return None;
        }
        let most_recent = self
            .get(f.attr("most_recent"), Self::boolean)
            .unwrap_or(false);
        Some(SourceAmi::Filter {
            filters: filters?,
            owners: owners?,
            most_recent,
        })
    }

    /// Filter values: a string or a list of strings per filter name.
    fn ami_filters(&mut self, value: &Value, at: &At<'_>) -> Option<BTreeMap<String, Vec<String>>> {
        let Value::Object(entries) = value else {
            self.mismatch(
                at,
                "a map of filters such as { name = \"debian-12-*\" }",
                value,
            );
            return None;
        };
        if entries.is_empty() {
            self.error(
                at.span.clone(),
                "expected at least one filter, such as name = \"debian-12-amd64-*\"",
            );
            return None;
        }
        let mut filters = BTreeMap::new();
        let mut ok = true;
        for (key, item) in entries {
            let at = at.field(key);
            let values = match item {
                Value::String(s) => Some(vec![s.clone()]),
                Value::Array(_) => self.string_list(item, &at),
                other => {
                    self.mismatch(&at, "a string or a list of strings", other);
                    None
                }
            };
            match values {
                Some(v) => {
                    filters.insert(key.clone(), v);
                }
                None => ok = false,
            }
        }
        ok.then_some(filters)
    }

    /// The `backend` blocks; only `backend "s3"` exists, at most once.
    pub(super) fn backend(&mut self, decls: &Decls<'_>) -> Option<Backend> {
        let mut backend = None;
        for (i, (kind, block)) in decls.iter().enumerate() {
            if i > 0 {
                let msg = "only one `backend` block is allowed: the state lives in one place";
                self.error(header(block), msg);
                continue;
            }
            if kind != "s3" {
                let label = block.labels.first().map_or(header(block), span);
                let msg = format!("unknown backend `{kind}`; expected `s3`");
                let help = Some(
                    "without a backend block the state is kept in SQLite under .kiln/".to_owned(),
                );
                self.report(Severity::Error, label, msg, help);
                continue;
            }
            backend = self.s3_backend(block).map(Backend::S3);
        }
        backend
    }

    fn s3_backend(&mut self, block: &Block) -> Option<S3Backend> {
        let f = self.fields(&block.body, header(block), &S3);
        let bucket = self.required(&f, "bucket");
        let bucket = self.get(bucket, Self::bucket_name);
        let key = self.required(&f, "key");
        let key = self.get(key, Self::object_key);
        let region = self.required(&f, "region");
        let region = self.get(region, Self::region);
        let table = self.required(&f, "dynamodb_table");
        let table = self.get(table, Self::table_name);
        let endpoint_url = self.get(f.attr("endpoint_url"), Self::endpoint_url);
        Some(S3Backend {
            bucket: bucket?,
            key: key?,
            region: region?,
            dynamodb_table: table?,
            endpoint_url,
        })
    }

    /// The `target` attribute of a service or image: `target.aws` (or `target.local`).
    pub(super) fn target_ref(&mut self, fields: &Fields<'_>) -> TargetKind {
        let target = self.get(fields.attr("target"), |cx, v, at| {
            cx.reference(Ref::Target, v, at)
        });
        match target.as_deref() {
            Some("aws") => TargetKind::Aws,
            _ => TargetKind::Local,
        }
    }

    /// Cross-block checks: a project runs on one target, a service on AWS needs an image
    /// baked for AWS, and an image baked for AWS needs what the build uses. `services` are
    /// the service blocks, for the error positions.
    pub(super) fn check_targets(
        &mut self,
        config: &crate::model::Config,
        services: &Decls<'_>,
        aws_block: Option<&Block>,
    ) {
        let at = |name: &str| {
            services
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0..0, |(_, b)| header(b))
        };
        let first_aws = config
            .services
            .values()
            .find(|s| s.target == TargetKind::Aws);
        if let Some(first) = first_aws {
            for local in config.services.values().filter(|s| s.target.is_local()) {
                let msg = format!(
                    "service `{}` runs on the local runtime but service `{}` on target.aws; a project deploys to one target",
                    local.name, first.name
                );
                let help = Some(format!(
                    "add `target = target.aws` to service `{}`",
                    local.name
                ));
                self.report(Severity::Error, at(&local.name), msg, help);
            }
            if config.aws.is_none() {
                let msg = format!(
                    "service `{}` runs on target.aws, but there is no `target \"aws\"` block",
                    first.name
                );
                let help = Some(
                    "declare one with region, subnets, security_groups and instance_type"
                        .to_owned(),
                );
                self.report(Severity::Error, at(&first.name), msg, help);
            }
        }
        for service in config
            .services
            .values()
            .filter(|s| s.target == TargetKind::Aws)
        {
            if let Some(image) = config.images.get(&service.image)
                && image.target != TargetKind::Aws
            {
                let msg = format!(
                    "service `{}` runs on target.aws but its image `{}` is not baked for it",
                    service.name, image.name
                );
                let help = Some(format!(
                    "add `target = target.aws` to image `{}`: `kiln bake` then also makes its AMI",
                    image.name
                ));
                self.report(Severity::Error, at(&service.name), msg, help);
            }
        }
        let (Some(aws), Some(block)) = (&config.aws, aws_block) else {
            return;
        };
        let aws_images: Vec<&str> = config
            .images
            .values()
            .filter(|i| i.target == TargetKind::Aws)
            .map(|i| i.name.as_str())
            .collect();
        if let Some(image) = aws_images.first() {
            if aws.artifact_bucket.is_none() {
                let msg = format!(
                    "image `{image}` is baked on target.aws, which needs `artifact_bucket` (where image archives are uploaded for AMI builds)"
                );
                self.error(header(block), msg);
            }
            if aws.source_ami.is_none() {
                let msg = format!(
                    "image `{image}` is baked on target.aws, which needs `source_ami` or a `source_ami_filter` block (the AMI builds start from)"
                );
                self.error(header(block), msg);
            }
        }
    }

    fn region(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let text = self.string(value, at)?;
        let ok = !text.is_empty()
            && text.split('-').count() >= 3
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            self.mismatch(at, "a region such as \"eu-west-1\"", value);
            return None;
        }
        Some(text)
    }

    /// An emulator's URL; `""` means none (AWS itself), so a variable can switch it off.
    fn endpoint_url(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let text = self.string(value, at)?;
        if text.is_empty() {
            return None;
        }
        let rest = text
            .strip_prefix("http://")
            .or_else(|| text.strip_prefix("https://"));
        if rest.is_none_or(|r| r.is_empty()) {
            self.mismatch(at, "a URL such as \"http://127.0.0.1:5055\"", value);
            return None;
        }
        Some(text)
    }

    /// An AWS resource id with `prefix`, e.g. `subnet-0abc…`.
    fn aws_id(&mut self, value: &Value, at: &At<'_>, prefix: &str) -> Option<String> {
        let text = self.string(value, at)?;
        let ok = text.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric())
        });
        if !ok {
            self.mismatch(at, &format!("an id such as \"{prefix}0123abcd\""), value);
            return None;
        }
        Some(text)
    }

    /// A non-empty list of ids with `prefix`.
    fn aws_ids(&mut self, value: &Value, at: &At<'_>, prefix: &str) -> Option<Vec<String>> {
        let Value::Array(items) = value else {
            self.mismatch(
                at,
                &format!("a list of ids such as [\"{prefix}0123abcd\"]"),
                value,
            );
            return None;
        };
        if items.is_empty() {
            self.error(
                at.span.clone(),
                format!("expected at least one {prefix}… id"),
            );
            return None;
        }
        let ids: Vec<Option<String>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| self.aws_id(item, &at.elem(i), prefix))
            .collect();
        ids.into_iter().collect()
    }

    fn instance_type(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let text = self.string(value, at)?;
        let ok = text.split_once('.').is_some_and(|(family, size)| {
            !family.is_empty()
                && !size.is_empty()
                && text
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        });
        if !ok {
            self.mismatch(at, "an instance type such as \"t3.small\"", value);
            return None;
        }
        Some(text)
    }

    fn non_empty_string(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let text = self.string(value, at)?;
        if text.is_empty() {
            self.mismatch(at, "a non-empty string", value);
            return None;
        }
        Some(text)
    }

    /// An S3 bucket name: 3–63 lowercase letters, digits, `.` and `-`.
    fn bucket_name(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let text = self.string(value, at)?;
        let ok = (3..=63).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && text.as_bytes()[0].is_ascii_alphanumeric()
            && text.as_bytes()[text.len() - 1].is_ascii_alphanumeric();
        if !ok {
            self.mismatch(
                at,
                "a bucket name of 3 to 63 lowercase letters, digits, '.' and '-'",
                value,
            );
            return None;
        }
        Some(text)
    }

    fn object_key(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let text = self.string(value, at)?;
        if text.is_empty() || text.starts_with('/') || text.len() > 1024 {
            self.mismatch(
                at,
                "an object key such as \"shop/kiln.json\" (no leading '/')",
                value,
            );
            return None;
        }
        Some(text)
    }

    /// A DynamoDB table name: 3–255 letters, digits, `_`, `-` and `.`.
    fn table_name(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let text = self.string(value, at)?;
        let ok = (3..=255).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !ok {
            self.mismatch(
                at,
                "a table name of 3 to 255 letters, digits, '_', '-' and '.'",
                value,
            );
            return None;
        }
        Some(text)
    }

    /// User tags: strings, no reserved prefixes, AWS's length limits.
    fn user_tags(&mut self, value: &Value, at: &At<'_>) -> Option<BTreeMap<String, String>> {
        let tags = self.string_map(value, at)?;
        let mut ok = true;
        for (key, value) in &tags {
            let problem = if key.starts_with("kiln:") || key.starts_with("aws:") {
                Some("keys starting with `kiln:` or `aws:` are reserved".to_owned())
            } else if key.is_empty() || key.chars().count() > 128 {
                Some("expected a key of 1 to 128 characters".to_owned())
            } else if value.chars().count() > 256 {
                Some("expected a value of at most 256 characters".to_owned())
            } else {
                None
            };
            if let Some(problem) = problem {
                self.error(at.field(key).span, format!("tag `{key}`: {problem}"));
                ok = false;
            }
        }
        ok.then_some(tags)
    }
}
