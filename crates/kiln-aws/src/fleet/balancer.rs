//! Load balancers, their routes (see [`Fleet::set_routes`]), and target registration.

use std::collections::BTreeMap;

use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, FixedResponseActionConfig, ForwardActionConfig,
    HttpHeaderConditionConfig, LoadBalancer, LoadBalancerSchemeEnum, LoadBalancerTypeEnum,
    PathPatternConditionConfig, ProtocolEnum, Rule, RuleCondition, TargetDescription,
    TargetGroupTuple, TargetHealthStateEnum,
};

use super::release::elb_tags;
use super::{
    Balancer, Fleet, PREVIEW_HEADER, RouteSpec, TAG_BALANCER, TargetHealth, has_code, missing,
};
use crate::error::aws;
use crate::{Error, Result};

/// The body of the fixed response of a route no release serves.
const NO_RELEASE_BODY: &str = "no release is serving";
/// The status of that response.
const NO_RELEASE_STATUS: &str = "503";
/// The priority of the preview rule of the route `/`: the last one AWS allows.
const ROOT_PREVIEW_PRIORITY: u32 = 50_000;
/// The priority step between two routes.
const PRIORITY_STEP: u32 = 10;
/// How far before its route a preview rule comes.
const PREVIEW_OFFSET: u32 = 5;
/// The largest weight AWS accepts.
const MAX_WEIGHT: u32 = 999;
/// The most target groups one forward action takes.
const MAX_TARGET_GROUPS: usize = 5;
/// The longest path pattern AWS accepts.
const MAX_PATTERN: usize = 128;

impl Fleet {
    /// Makes sure balancer `balancer` exists and returns it: an internet-facing application
    /// load balancer in the target's subnets with its security groups, with one HTTP listener
    /// on `port` whose default action, until routes are set, is a fixed 503 "no release is
    /// serving". An existing load balancer and listener are reused as they are (routes
    /// included).
    pub async fn ensure_balancer(&self, balancer: &str, port: u16) -> Result<Balancer> {
        let name = self.load_balancer_name(balancer);
        let what = format!("load balancer {name}");
        let mut tags = self.base_tags();
        tags.insert(TAG_BALANCER.into(), balancer.into());

        let lb = match self.describe_load_balancer(&name).await? {
            Some(lb) => lb,
            None => {
                self.first_subnet()?;
                let created = self
                    .elb
                    .create_load_balancer()
                    .name(&name)
                    .r#type(LoadBalancerTypeEnum::Application)
                    .scheme(LoadBalancerSchemeEnum::InternetFacing)
                    .set_subnets(Some(self.target.subnets.clone()))
                    .set_security_groups(
                        (!self.target.security_groups.is_empty())
                            .then(|| self.target.security_groups.clone()),
                    )
                    .set_tags(Some(elb_tags(&tags)))
                    .send()
                    .await;
                match created {
                    Ok(out) => {
                        let lb = out.load_balancers().first().cloned().ok_or_else(|| {
                            missing("ELBv2", "CreateLoadBalancer", "load balancer")
                        })?;
                        tracing::info!(project = self.project, name, "load balancer created");
                        lb
                    }
                    Err(err) if has_code(&err, &["DuplicateLoadBalancerName"]) => self
                        .describe_load_balancer(&name)
                        .await?
                        .ok_or_else(|| aws("ELBv2", "CreateLoadBalancer", &what, &err))?,
                    Err(err) => return Err(aws("ELBv2", "CreateLoadBalancer", &what, &err)),
                }
            }
        };
        let arn = lb
            .load_balancer_arn()
            .ok_or_else(|| missing("ELBv2", "DescribeLoadBalancers", "ARN"))?
            .to_owned();
        let dns_name = lb.dns_name().unwrap_or_default().to_owned();

        let listener_arn = match self.listener_on(&arn, port, &what).await? {
            Some(listener) => listener,
            None => {
                let created = self
                    .elb
                    .create_listener()
                    .load_balancer_arn(&arn)
                    .protocol(ProtocolEnum::Http)
                    .port(i32::from(port))
                    .default_actions(no_release_action())
                    .set_tags(Some(elb_tags(&tags)))
                    .send()
                    .await;
                match created {
                    Ok(out) => out
                        .listeners()
                        .first()
                        .and_then(|l| l.listener_arn())
                        .ok_or_else(|| missing("ELBv2", "CreateListener", "listener ARN"))?
                        .to_owned(),
                    Err(err) if has_code(&err, &["DuplicateListener"]) => self
                        .listener_on(&arn, port, &what)
                        .await?
                        .ok_or_else(|| aws("ELBv2", "CreateListener", &what, &err))?,
                    Err(err) => return Err(aws("ELBv2", "CreateListener", &what, &err)),
                }
            }
        };
        Ok(Balancer {
            arn,
            dns_name,
            listener_arn,
        })
    }

    /// Makes `balancer`'s listener do exactly `routes`:
    ///
    /// - the route `/` is the listener's default action;
    /// - every other route, in the order given, is a rule at priority 10, 20, 30…, matching the
    ///   path patterns `{prefix}` and `{prefix}*`;
    /// - a route's preview is a rule 5 before its route's (the preview of `/` at 50000, after
    ///   every other rule) matching the same paths and the header `X-Kiln-Preview: 1`, and
    ///   forwarding to the preview target group;
    /// - a route whose weights are all 0 (or empty) answers a fixed 503 "no release is
    ///   serving", as does the listener when there is no route `/`.
    ///
    /// Rules are keyed by priority: a rule in place whose route changed is modified (so a
    /// weight change is one ModifyRule, or one ModifyListener for `/`), a missing one created,
    /// and rules no route needs are deleted once the others are in place.
    ///
    /// Fails with [`Error::Fleet`], changing nothing, when the routes cannot be expressed: a
    /// prefix not starting with `/`, a prefix given twice, a weight above 999, more than 5
    /// target groups or the same target group twice in one route.
    pub async fn set_routes(&self, balancer: &Balancer, routes: &[RouteSpec]) -> Result<()> {
        let plan = plan(routes).map_err(|detail| Error::Fleet {
            what: format!("routes of load balancer {}", balancer.arn),
            detail,
        })?;
        let what = format!("listener {}", balancer.listener_arn);
        let current = self.listener_rules(balancer).await?;

        for (priority, shape) in &plan.rules {
            match current.rules.get(priority) {
                Some((_, Some(existing))) if existing.same(shape) => {}
                Some((arn, _)) => {
                    self.elb
                        .modify_rule()
                        .rule_arn(arn)
                        .set_conditions(Some(shape.conditions()))
                        .actions(shape.act.action())
                        .send()
                        .await
                        .map_err(|err| aws("ELBv2", "ModifyRule", format!("rule {arn}"), &err))?;
                }
                None => {
                    self.elb
                        .create_rule()
                        .listener_arn(&balancer.listener_arn)
                        .priority(i32::try_from(*priority).unwrap_or(i32::MAX))
                        .set_conditions(Some(shape.conditions()))
                        .actions(shape.act.action())
                        .send()
                        .await
                        .map_err(|err| aws("ELBv2", "CreateRule", &what, &err))?;
                }
            }
        }
        if !current.default.same(&plan.default) {
            self.elb
                .modify_listener()
                .listener_arn(&balancer.listener_arn)
                .default_actions(plan.default.action())
                .send()
                .await
                .map_err(|err| aws("ELBv2", "ModifyListener", &what, &err))?;
        }
        for (priority, (arn, _)) in &current.rules {
            if plan.rules.contains_key(priority) {
                continue;
            }
            match self.elb.delete_rule().rule_arn(arn).send().await {
                Ok(_) => {}
                Err(err) if has_code(&err, &["RuleNotFound"]) => {}
                Err(err) => return Err(aws("ELBv2", "DeleteRule", format!("rule {arn}"), &err)),
            }
        }
        tracing::info!(
            project = self.project,
            listener = balancer.listener_arn,
            ?routes,
            "routes set"
        );
        Ok(())
    }

    /// What `balancer`'s listener does, in the shape [`Fleet::set_routes`] takes: the route
    /// `/` first (left out when it answers the fixed 503 and has no preview), then the other
    /// routes in priority order. A route that answers the fixed 503 reads back with no weights;
    /// weights come in the order AWS reports them. Rules kiln does not write (other conditions)
    /// are left out.
    pub async fn routes(&self, balancer: &Balancer) -> Result<Vec<RouteSpec>> {
        let current = self.listener_rules(balancer).await?;
        let shapes: BTreeMap<u32, RuleShape> = current
            .rules
            .into_iter()
            .filter_map(|(priority, (_, shape))| Some((priority, shape?)))
            .collect();
        Ok(read_routes(&current.default, &shapes))
    }

    /// Registers instance `ec2_instance_id` in target group `tg_arn` on `port`. Registering a
    /// registered target again is fine.
    pub async fn register(&self, tg_arn: &str, ec2_instance_id: &str, port: u16) -> Result<()> {
        self.register_target(tg_arn, ec2_instance_id, Some(port))
            .await
    }

    /// Registers instance `id` in target group `tg_arn`, on `port` or the target group's.
    pub(super) async fn register_target(
        &self,
        tg_arn: &str,
        id: &str,
        port: Option<u16>,
    ) -> Result<()> {
        self.elb
            .register_targets()
            .target_group_arn(tg_arn)
            .targets(
                TargetDescription::builder()
                    .id(id)
                    .set_port(port.map(i32::from))
                    .build(),
            )
            .send()
            .await
            .map_err(|err| {
                aws(
                    "ELBv2",
                    "RegisterTargets",
                    format!("instance {id} in target group {tg_arn}"),
                    &err,
                )
            })?;
        Ok(())
    }

    /// Deregisters instance `ec2_instance_id` from target group `tg_arn` (it drains for the
    /// target group's deregistration delay). A target not registered, an instance gone or a
    /// target group gone is fine.
    pub async fn deregister(&self, tg_arn: &str, ec2_instance_id: &str) -> Result<()> {
        match self
            .elb
            .deregister_targets()
            .target_group_arn(tg_arn)
            .targets(TargetDescription::builder().id(ec2_instance_id).build())
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if has_code(&err, &["TargetGroupNotFound", "InvalidTarget"]) => Ok(()),
            Err(err) => Err(aws(
                "ELBv2",
                "DeregisterTargets",
                format!("instance {ec2_instance_id} in target group {tg_arn}"),
                &err,
            )),
        }
    }

    /// The health of every target registered in target group `tg_arn`, by EC2 instance id.
    pub async fn target_health(&self, tg_arn: &str) -> Result<BTreeMap<String, TargetHealth>> {
        let out = self
            .elb
            .describe_target_health()
            .target_group_arn(tg_arn)
            .send()
            .await
            .map_err(|err| {
                aws(
                    "ELBv2",
                    "DescribeTargetHealth",
                    format!("target group {tg_arn}"),
                    &err,
                )
            })?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let id = d.target()?.id()?.to_owned();
                let health = d.target_health();
                let health = match health.and_then(|h| h.state()) {
                    Some(TargetHealthStateEnum::Initial) => TargetHealth::Initial,
                    Some(TargetHealthStateEnum::Healthy) => TargetHealth::Healthy,
                    Some(TargetHealthStateEnum::Unhealthy) => TargetHealth::Unhealthy(
                        health
                            .and_then(|h| {
                                h.description()
                                    .map(str::to_owned)
                                    .or_else(|| h.reason().map(|r| r.as_str().to_owned()))
                            })
                            .unwrap_or_default(),
                    ),
                    Some(TargetHealthStateEnum::Draining) => TargetHealth::Draining,
                    Some(TargetHealthStateEnum::Unused) => TargetHealth::Unused,
                    Some(other) => TargetHealth::Other(other.as_str().to_owned()),
                    None => TargetHealth::Other(String::new()),
                };
                Some((id, health))
            })
            .collect())
    }

    /// The load balancer `name`, if it exists.
    async fn describe_load_balancer(&self, name: &str) -> Result<Option<LoadBalancer>> {
        match self.elb.describe_load_balancers().names(name).send().await {
            Ok(out) => Ok(out
                .load_balancers()
                .iter()
                .find(|lb| lb.load_balancer_name() == Some(name))
                .cloned()),
            Err(err) if has_code(&err, &["LoadBalancerNotFound"]) => Ok(None),
            Err(err) => Err(aws(
                "ELBv2",
                "DescribeLoadBalancers",
                format!("load balancer {name}"),
                &err,
            )),
        }
    }

    /// The ARN of load balancer `lb_arn`'s listener on `port`, if any.
    async fn listener_on(&self, lb_arn: &str, port: u16, what: &str) -> Result<Option<String>> {
        let mut pages = self
            .elb
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .into_paginator()
            .send();
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(|err| aws("ELBv2", "DescribeListeners", what, &err))?
        {
            if let Some(arn) = page
                .listeners()
                .iter()
                .find(|l| l.port() == Some(i32::from(port)))
                .and_then(|l| l.listener_arn())
            {
                return Ok(Some(arn.to_owned()));
            }
        }
        Ok(None)
    }

    /// The listener's default action and its other rules by priority.
    async fn listener_rules(&self, balancer: &Balancer) -> Result<Listener> {
        let what = format!("listener {}", balancer.listener_arn);
        let mut pages = self
            .elb
            .describe_rules()
            .listener_arn(&balancer.listener_arn)
            .into_paginator()
            .send();
        let mut listener = Listener {
            default: Act::Other,
            rules: BTreeMap::new(),
        };
        while let Some(page) = pages
            .try_next()
            .await
            .map_err(|err| aws("ELBv2", "DescribeRules", &what, &err))?
        {
            for rule in page.rules() {
                if rule.is_default() == Some(true) {
                    listener.default = Act::parse(rule.actions());
                    continue;
                }
                let (Some(arn), Some(priority)) = (
                    rule.rule_arn(),
                    rule.priority().and_then(|p| p.parse::<u32>().ok()),
                ) else {
                    continue;
                };
                listener
                    .rules
                    .insert(priority, (arn.to_owned(), RuleShape::parse(rule)));
            }
        }
        Ok(listener)
    }
}

/// A listener as read: its default action, and its rules (ARN and, when kiln can read it,
/// shape) by priority.
#[derive(Debug)]
struct Listener {
    default: Act,
    rules: BTreeMap<u32, (String, Option<RuleShape>)>,
}

/// What a rule or a listener's default does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Act {
    /// Forward to target groups, weighted.
    Forward(Vec<(String, u32)>),
    /// The fixed 503 of a route no release serves.
    NoRelease,
    /// Something kiln does not write.
    Other,
}

impl Act {
    /// The action of a route with `weights`.
    fn of(weights: &[(String, u32)]) -> Self {
        if weights.iter().any(|(_, w)| *w > 0) {
            Self::Forward(weights.to_vec())
        } else {
            Self::NoRelease
        }
    }

    /// What `actions` do.
    fn parse(actions: &[Action]) -> Self {
        let [action] = actions else {
            return Self::Other;
        };
        match action.r#type() {
            Some(ActionTypeEnum::Forward) => {
                let tuples = action
                    .forward_config()
                    .map(ForwardActionConfig::target_groups)
                    .unwrap_or_default();
                let weights: Vec<(String, u32)> = if tuples.is_empty() {
                    action
                        .target_group_arn()
                        .map(|arn| vec![(arn.to_owned(), 1)])
                        .unwrap_or_default()
                } else {
                    tuples
                        .iter()
                        .filter_map(|t| {
                            let weight = u32::try_from(t.weight().unwrap_or(1)).unwrap_or(0);
                            Some((t.target_group_arn()?.to_owned(), weight))
                        })
                        .collect()
                };
                if weights.is_empty() {
                    Self::Other
                } else {
                    Self::Forward(weights)
                }
            }
            Some(ActionTypeEnum::FixedResponse) => match action.fixed_response_config() {
                Some(config)
                    if config.status_code() == Some(NO_RELEASE_STATUS)
                        && config.message_body() == Some(NO_RELEASE_BODY) =>
                {
                    Self::NoRelease
                }
                _ => Self::Other,
            },
            _ => Self::Other,
        }
    }

    /// Whether both do the same: weights are compared regardless of order.
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Forward(a), Self::Forward(b)) => {
                let (mut a, mut b) = (a.clone(), b.clone());
                a.sort();
                b.sort();
                a == b
            }
            (Self::NoRelease, Self::NoRelease) => true,
            _ => false,
        }
    }

    /// As an ELBv2 action.
    fn action(&self) -> Action {
        match self {
            Self::Forward(weights) => Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .forward_config(
                    ForwardActionConfig::builder()
                        .set_target_groups(Some(
                            weights
                                .iter()
                                .map(|(arn, weight)| {
                                    TargetGroupTuple::builder()
                                        .target_group_arn(arn)
                                        .weight(i32::try_from(*weight).unwrap_or(0))
                                        .build()
                                })
                                .collect(),
                        ))
                        .build(),
                )
                .build(),
            Self::NoRelease | Self::Other => no_release_action(),
        }
    }

    /// The weights it forwards with (none for anything else).
    fn weights(&self) -> Vec<(String, u32)> {
        match self {
            Self::Forward(weights) => weights.clone(),
            Self::NoRelease | Self::Other => Vec::new(),
        }
    }
}

/// The fixed 503 "no release is serving".
fn no_release_action() -> Action {
    Action::builder()
        .r#type(ActionTypeEnum::FixedResponse)
        .fixed_response_config(
            FixedResponseActionConfig::builder()
                .status_code(NO_RELEASE_STATUS)
                .content_type("text/plain")
                .message_body(NO_RELEASE_BODY)
                .build(),
        )
        .build()
}

/// A listener rule as kiln writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuleShape {
    /// Its path patterns, sorted.
    paths: Vec<String>,
    /// Whether it also needs `X-Kiln-Preview: 1`.
    preview: bool,
    /// What it does.
    act: Act,
}

impl RuleShape {
    /// The rule of route `prefix` (or of its preview) doing `act`.
    fn new(prefix: &str, preview: bool, act: Act) -> Self {
        let mut paths = vec![prefix.to_owned(), format!("{prefix}*")];
        paths.sort();
        paths.dedup();
        Self {
            paths,
            preview,
            act,
        }
    }

    /// `rule`'s shape, or `None` when it has conditions kiln does not write.
    fn parse(rule: &Rule) -> Option<Self> {
        let mut paths = Vec::new();
        let mut preview = false;
        for condition in rule.conditions() {
            match condition.field() {
                Some("path-pattern") => {
                    let values = condition
                        .path_pattern_config()
                        .map(PathPatternConditionConfig::values)
                        .filter(|v| !v.is_empty())
                        .unwrap_or(condition.values());
                    paths.extend(values.iter().cloned());
                }
                Some("http-header") => {
                    let config = condition.http_header_config()?;
                    let name = config.http_header_name()?;
                    if !name.eq_ignore_ascii_case(PREVIEW_HEADER) || config.values() != ["1"] {
                        return None;
                    }
                    preview = true;
                }
                _ => return None,
            }
        }
        if paths.is_empty() {
            return None;
        }
        paths.sort();
        paths.dedup();
        Some(Self {
            paths,
            preview,
            act: Act::parse(rule.actions()),
        })
    }

    /// Whether both do the same.
    fn same(&self, other: &Self) -> bool {
        self.paths == other.paths && self.preview == other.preview && self.act.same(&other.act)
    }

    /// The route prefix its patterns stand for: the longest pattern ending in `*`, without it.
    fn prefix(&self) -> String {
        self.paths
            .iter()
            .filter_map(|p| p.strip_suffix('*'))
            .max_by_key(|p| p.len())
            .or_else(|| self.paths.first().map(String::as_str))
            .unwrap_or("/")
            .to_owned()
    }

    /// Its conditions.
    fn conditions(&self) -> Vec<RuleCondition> {
        let mut conditions = vec![
            RuleCondition::builder()
                .field("path-pattern")
                .path_pattern_config(
                    PathPatternConditionConfig::builder()
                        .set_values(Some(self.paths.clone()))
                        .build(),
                )
                .build(),
        ];
        if self.preview {
            conditions.push(
                RuleCondition::builder()
                    .field("http-header")
                    .http_header_config(
                        HttpHeaderConditionConfig::builder()
                            .http_header_name(PREVIEW_HEADER)
                            .values("1")
                            .build(),
                    )
                    .build(),
            );
        }
        conditions
    }
}

/// What a listener must do for some routes.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// Its default action.
    default: Act,
    /// Its other rules by priority.
    rules: BTreeMap<u32, RuleShape>,
}

/// The listener doing `routes`, or why it cannot.
fn plan(routes: &[RouteSpec]) -> Result<Plan, String> {
    let mut plan = Plan {
        default: Act::NoRelease,
        rules: BTreeMap::new(),
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut slot = 0;
    for route in routes {
        let prefix = route.path_prefix.as_str();
        if !prefix.starts_with('/') {
            return Err(format!("path prefix {prefix:?} does not start with '/'"));
        }
        if prefix.len() >= MAX_PATTERN {
            return Err(format!(
                "path prefix {prefix:?} is longer than {} characters",
                MAX_PATTERN - 1
            ));
        }
        if !seen.insert(prefix) {
            return Err(format!("path prefix {prefix:?} is routed twice"));
        }
        if route.weights.len() > MAX_TARGET_GROUPS {
            return Err(format!(
                "route {prefix} weights {} target groups; a load balancer forwards to at most {MAX_TARGET_GROUPS}",
                route.weights.len()
            ));
        }
        let mut arns = std::collections::BTreeSet::new();
        for (arn, weight) in &route.weights {
            if *weight > MAX_WEIGHT {
                return Err(format!(
                    "route {prefix} weights target group {arn} {weight}; weights go from 0 to {MAX_WEIGHT}"
                ));
            }
            if !arns.insert(arn) {
                return Err(format!("route {prefix} names target group {arn} twice"));
            }
        }
        let act = Act::of(&route.weights);
        let preview = route
            .preview
            .as_ref()
            .map(|tg| RuleShape::new(prefix, true, Act::Forward(vec![(tg.clone(), 1)])));
        if prefix == "/" {
            plan.default = act;
            if let Some(preview) = preview {
                plan.rules.insert(ROOT_PREVIEW_PRIORITY, preview);
            }
            continue;
        }
        slot += 1;
        let priority = slot * PRIORITY_STEP;
        if priority >= ROOT_PREVIEW_PRIORITY {
            return Err(format!(
                "{} routes are more than a listener can hold",
                routes.len()
            ));
        }
        plan.rules
            .insert(priority, RuleShape::new(prefix, false, act));
        if let Some(preview) = preview {
            plan.rules.insert(priority - PREVIEW_OFFSET, preview);
        }
    }
    Ok(plan)
}

/// The routes a listener with `default` and `rules` does (see [`Fleet::routes`]).
fn read_routes(default: &Act, rules: &BTreeMap<u32, RuleShape>) -> Vec<RouteSpec> {
    let mut routes = Vec::new();
    if let Act::Forward(weights) = default {
        routes.push(RouteSpec {
            path_prefix: "/".into(),
            weights: weights.clone(),
            preview: None,
        });
    }
    for shape in rules.values().filter(|s| !s.preview) {
        routes.push(RouteSpec {
            path_prefix: shape.prefix(),
            weights: shape.act.weights(),
            preview: None,
        });
    }
    for shape in rules.values().filter(|s| s.preview) {
        let prefix = shape.prefix();
        let tg = shape.act.weights().into_iter().next().map(|(arn, _)| arn);
        match routes.iter_mut().find(|r| r.path_prefix == prefix) {
            Some(route) => route.preview = tg,
            None => {
                let route = RouteSpec {
                    path_prefix: prefix,
                    weights: Vec::new(),
                    preview: tg,
                };
                if route.path_prefix == "/" {
                    routes.insert(0, route);
                } else {
                    routes.push(route);
                }
            }
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, weights: &[(&str, u32)], preview: Option<&str>) -> RouteSpec {
        RouteSpec {
            path_prefix: prefix.into(),
            weights: weights.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect(),
            preview: preview.map(str::to_owned),
        }
    }

    #[test]
    fn routes_become_a_default_action_and_prioritized_rules() {
        let routes = [
            route("/", &[("tg-a", 90), ("tg-b", 10)], Some("tg-c")),
            route("/api", &[("tg-x", 100)], Some("tg-y")),
            route("/admin/", &[("tg-z", 0)], None),
        ];
        let plan = plan(&routes).unwrap();
        assert_eq!(
            plan.default,
            Act::Forward(vec![("tg-a".into(), 90), ("tg-b".into(), 10)])
        );
        assert_eq!(
            plan.rules.keys().copied().collect::<Vec<_>>(),
            [5, 10, 20, 50_000]
        );
        assert_eq!(plan.rules[&10].paths, ["/api", "/api*"]);
        assert!(!plan.rules[&10].preview);
        assert_eq!(plan.rules[&5].paths, ["/api", "/api*"]);
        assert!(plan.rules[&5].preview);
        assert_eq!(plan.rules[&5].act, Act::Forward(vec![("tg-y".into(), 1)]));
        assert_eq!(plan.rules[&20].act, Act::NoRelease);
        assert_eq!(plan.rules[&50_000].paths, ["/", "/*"]);

        // Reading the plan back gives the routes, but a route serving nothing loses its
        // weights.
        let back = read_routes(&plan.default, &plan.rules);
        assert_eq!(
            back,
            [
                routes[0].clone(),
                routes[1].clone(),
                route("/admin/", &[], None)
            ]
        );
    }

    #[test]
    fn a_root_serving_nothing_is_the_fixed_503() {
        let plan = plan(&[route("/", &[("tg-a", 0), ("tg-b", 0)], None)]).unwrap();
        assert_eq!(plan.default, Act::NoRelease);
        assert!(plan.rules.is_empty());
        assert_eq!(read_routes(&plan.default, &plan.rules), []);
        // With a preview it still reads back, without weights.
        let plan = super::plan(&[route("/", &[], Some("tg-p"))]).unwrap();
        assert_eq!(
            read_routes(&plan.default, &plan.rules),
            [route("/", &[], Some("tg-p"))]
        );
        assert_eq!(super::plan(&[]).unwrap().default, Act::NoRelease);
    }

    #[test]
    fn weights_compare_regardless_of_order() {
        let a = Act::Forward(vec![("x".into(), 1), ("y".into(), 2)]);
        let b = Act::Forward(vec![("y".into(), 2), ("x".into(), 1)]);
        assert!(a.same(&b));
        assert!(!a.same(&Act::Forward(vec![("x".into(), 2), ("y".into(), 1)])));
        assert!(!Act::Other.same(&Act::Other));
        assert!(Act::NoRelease.same(&Act::NoRelease));
    }

    #[test]
    fn actions_read_back_as_written() {
        for act in [
            Act::NoRelease,
            Act::Forward(vec![("x".into(), 0), ("y".into(), 999)]),
        ] {
            assert_eq!(Act::parse(&[act.action()]), act);
        }
        let single = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn("x")
            .build();
        assert_eq!(Act::parse(&[single]), Act::Forward(vec![("x".into(), 1)]));
        let redirect = Action::builder().r#type(ActionTypeEnum::Redirect).build();
        assert_eq!(Act::parse(&[redirect]), Act::Other);
        assert_eq!(Act::parse(&[]), Act::Other);
    }

    #[test]
    fn rules_read_back_as_written() {
        let shape = RuleShape::new("/api/", true, Act::Forward(vec![("x".into(), 1)]));
        let rule = Rule::builder()
            .priority("5")
            .set_conditions(Some(shape.conditions()))
            .actions(shape.act.action())
            .build();
        let parsed = RuleShape::parse(&rule).unwrap();
        assert!(parsed.same(&shape));
        assert_eq!(parsed.prefix(), "/api/");
        // Conditions kiln does not write make a rule unreadable.
        let foreign = Rule::builder()
            .conditions(
                RuleCondition::builder()
                    .field("host-header")
                    .values("example.com")
                    .build(),
            )
            .actions(shape.act.action())
            .build();
        assert_eq!(RuleShape::parse(&foreign), None);
        // The legacy `Values` form of a path pattern is read too.
        let legacy = Rule::builder()
            .conditions(
                RuleCondition::builder()
                    .field("path-pattern")
                    .values("/v1*")
                    .build(),
            )
            .actions(no_release_action())
            .build();
        let legacy = RuleShape::parse(&legacy).unwrap();
        assert_eq!(
            (legacy.prefix().as_str(), &legacy.act),
            ("/v1", &Act::NoRelease)
        );
    }

    #[test]
    fn impossible_routes_are_refused() {
        let cases = [
            vec![route("api", &[], None)],
            vec![route("/a", &[], None), route("/a", &[], None)],
            vec![route("/a", &[("x", 1000)], None)],
            vec![route("/a", &[("x", 1), ("x", 2)], None)],
            vec![route(
                "/a",
                &[("1", 1), ("2", 1), ("3", 1), ("4", 1), ("5", 1), ("6", 1)],
                None,
            )],
            vec![route(&format!("/{}", "a".repeat(127)), &[], None)],
        ];
        for routes in cases {
            assert!(plan(&routes).is_err(), "{routes:?}");
        }
    }
}
