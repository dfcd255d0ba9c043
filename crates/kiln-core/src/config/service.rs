//! `service` blocks: instances, health checks and rollout settings.
//!
//! Defaults follow Nomad's `update` block (`max_parallel` 1, `min_healthy_time` 10s,
//! `healthy_deadline` 5m, `progress_deadline` 10m) and Argo Rollouts' analysis limits.

use std::time::Duration;

use hcl::Value;
use hcl_edit::structure::{Attribute, Block};

use super::body::Schema;
use super::eval::At;
use super::{Loader, Ref, header, span, suggest};
use crate::diag::Severity;
use crate::model::{Analysis, CanaryStep, Health, Rollout, Service, Strategy};

const SERVICE: Schema = Schema {
    what: "service block",
    attrs: &["image", "instances", "port", "env", "target"],
    blocks: &["health", "rollout", "notify"],
};

const HEALTH: Schema = Schema {
    what: "health block",
    attrs: &[
        "path",
        "interval",
        "timeout",
        "healthy_threshold",
        "unhealthy_threshold",
    ],
    blocks: &[],
};

const ROLLOUT: Schema = Schema {
    what: "rollout block",
    attrs: &[
        "strategy",
        "steps",
        "auto_rollback",
        "auto_revert",
        "auto_promote",
        "scale_down_delay",
        "progress_deadline",
        "max_parallel",
        "max_surge",
        "min_healthy_time",
        "healthy_deadline",
        "canary_instances",
        "preview_listen",
    ],
    blocks: &["analysis"],
};

const ANALYSIS: Schema = Schema {
    what: "analysis block",
    attrs: &[
        "interval",
        "max_error_rate",
        "max_p50_latency",
        "max_p99_latency",
        "max_error_rate_increase",
        "max_p99_increase",
        "min_requests",
        "failure_limit",
        "inconclusive_limit",
    ],
    blocks: &[],
};

const STEP_KEYS: [&str; 2] = ["weight", "pause"];
const STRATEGIES: [&str; 3] = ["rolling", "blue_green", "canary"];

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

impl Loader<'_> {
    pub(super) fn service(&mut self, name: &str, block: &Block) -> Service {
        let fields = self.fields(&block.body, header(block), &SERVICE);
        let image = self.required(&fields, "image");
        let image = self.get(image, |cx, v, at| cx.reference(Ref::Image, v, at));
        let instances = self.get(fields.attr("instances"), |cx, v, at| cx.int(v, at, 1, None));
        let port = self.required(&fields, "port");
        let port = self.get(port, |cx, v, at| cx.int(v, at, 1, Some(65535)));
        let env = self.get(fields.attr("env"), Self::string_map);
        let health = self.single_block(&fields, "health").map(|b| self.health(b));
        let rollout = self.single_block(&fields, "rollout");
        let rollout = self.rollout(rollout);
        let notify = self.notify_blocks(&fields);
        let target = self.target_ref(&fields);
        Service {
            name: name.to_owned(),
            image: image.unwrap_or_default(),
            instances: instances.unwrap_or(1),
            port: port.unwrap_or_default(),
            env: env.unwrap_or_default(),
            health,
            rollout,
            notify,
            target,
            loc: self.loc(span(&block.ident).start),
        }
    }

    fn health(&mut self, block: &Block) -> Health {
        let f = self.fields(&block.body, header(block), &HEALTH);
        let path = self.get(f.attr("path"), |cx, v, at| cx.url_path(v, at));
        let interval = self.get(f.attr("interval"), Self::duration);
        let timeout = self.get(f.attr("timeout"), Self::duration);
        let threshold = |cx: &mut Self, attr: Option<&Attribute>, default| {
            cx.get(attr, |cx, v, at| cx.int(v, at, 1, None))
                .unwrap_or(default)
        };
        Health {
            path: path.unwrap_or_else(|| "/".into()),
            interval: interval.unwrap_or(secs(2)),
            timeout: timeout.unwrap_or(secs(1)),
            healthy_threshold: threshold(self, f.attr("healthy_threshold"), 2),
            unhealthy_threshold: threshold(self, f.attr("unhealthy_threshold"), 3),
        }
    }

    /// A path that must start with `/`.
    pub(super) fn url_path(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let path = self.string(value, at)?;
        if !path.starts_with('/') {
            self.mismatch(at, "a path starting with `/`", value);
            return None;
        }
        Some(path)
    }

    fn rollout(&mut self, block: Option<&Block>) -> Rollout {
        let mut rollout = Rollout {
            strategy: Strategy::Rolling,
            steps: Vec::new(),
            analysis: None,
            auto_rollback: true,
            auto_promote: false,
            scale_down_delay: secs(5 * 60),
            progress_deadline: secs(10 * 60),
            max_parallel: 1,
            min_healthy_time: secs(10),
            healthy_deadline: secs(5 * 60),
            canary_instances: None,
            preview_listen: None,
        };
        let Some(block) = block else {
            return rollout;
        };
        let f = self.fields(&block.body, header(block), &ROLLOUT);
        let strategy_attr = f.attr("strategy");
        let steps_attr = f.attr("steps");
        let strategy = self.get(strategy_attr, Self::strategy);
        let strategy_failed = strategy_attr.is_some() && strategy.is_none();
        // Settings of another strategy are a likely mistake when the strategy is written out,
        // but intended when it is chosen by an expression (`strategy = var.strategy`): one
        // config then carries the settings of each strategy it may pick.
        let strategy_literal =
            strategy_attr.is_none_or(|a| matches!(a.value, hcl_edit::expr::Expression::String(_)));
        rollout.strategy = strategy.unwrap_or(Strategy::Rolling);
        let steps = self.get(steps_attr, Self::steps);
        let steps_ok = steps.is_some();
        rollout.steps = steps.unwrap_or_default();
        rollout.analysis = self.single_block(&f, "analysis").map(|b| self.analysis(b));
        let flag = |cx: &mut Self, key: &str, slot: &mut bool| {
            if let Some(b) = cx.get(f.attr(key), Self::boolean) {
                *slot = b;
            }
        };
        flag(self, "auto_rollback", &mut rollout.auto_rollback);
        // Nomad's name for the same switch.
        flag(self, "auto_revert", &mut rollout.auto_rollback);
        flag(self, "auto_promote", &mut rollout.auto_promote);
        let duration = |cx: &mut Self, key: &str, slot: &mut Duration| {
            if let Some(d) = cx.get(f.attr(key), Self::duration) {
                *slot = d;
            }
        };
        duration(self, "scale_down_delay", &mut rollout.scale_down_delay);
        duration(self, "progress_deadline", &mut rollout.progress_deadline);
        duration(self, "min_healthy_time", &mut rollout.min_healthy_time);
        duration(self, "healthy_deadline", &mut rollout.healthy_deadline);
        let count =
            |cx: &mut Self, key: &str| cx.get(f.attr(key), |cx, v, at| cx.int(v, at, 1, None));
        // Every update is create-before-destroy, so the instances replaced at once are also
        // the surge above `instances`: `max_surge` (the ASG/Kubernetes name) is the same knob.
        for key in ["max_parallel", "max_surge"] {
            if let Some(n) = count(self, key) {
                rollout.max_parallel = n;
            }
        }
        rollout.canary_instances = count(self, "canary_instances");
        rollout.preview_listen = self
            .get(f.attr("preview_listen"), Self::listen_addr)
            .map(|a| a.to_string());

        let is_canary = rollout.strategy == Strategy::Canary;
        let steps_failed = steps_attr.is_some() && !steps_ok;
        if is_canary && rollout.steps.is_empty() && !steps_failed {
            let at = steps_attr
                .or(strategy_attr)
                .map_or(f.header.clone(), |a| span(&a.value));
            let msg = "a canary rollout needs at least one step";
            let help = Some("add steps = [{ weight = 10, pause = \"30s\" }, …]".into());
            self.report(Severity::Error, at, msg, help);
        } else if !is_canary
            && !strategy_failed
            && strategy_literal
            && let Some(steps) = steps_attr
        {
            let msg = "`steps` only apply to the canary strategy and are ignored here";
            self.report(Severity::Warning, span(&steps.key), msg, None);
        }
        if rollout.strategy == Strategy::Rolling
            && !strategy_failed
            && strategy_literal
            && let Some(attr) = f.attr("preview_listen")
        {
            let msg = "`preview_listen` only applies to the blue_green and canary strategies \
                       and is ignored here";
            self.report(Severity::Warning, span(&attr.key), msg, None);
        }
        rollout
    }

    /// An `IP:port` address, as a balancer's `listen`.
    fn listen_addr(&mut self, value: &Value, at: &At<'_>) -> Option<std::net::SocketAddr> {
        let addr = match value {
            Value::String(s) => s.parse().ok(),
            _ => None,
        };
        if addr.is_none() {
            self.mismatch(at, "an address such as \"127.0.0.1:8081\"", value);
        }
        addr
    }

    fn strategy(&mut self, value: &Value, at: &At<'_>) -> Option<Strategy> {
        let strategy = match value {
            Value::String(s) if s == "rolling" => Some(Strategy::Rolling),
            Value::String(s) if s == "blue_green" => Some(Strategy::BlueGreen),
            Value::String(s) if s == "canary" => Some(Strategy::Canary),
            _ => None,
        };
        if strategy.is_none() {
            let msg = format!(
                "expected \"rolling\", \"blue_green\" or \"canary\", found {}",
                super::eval::describe(value)
            );
            let help = match value {
                Value::String(s) => suggest(s, STRATEGIES),
                _ => None,
            };
            self.report(Severity::Error, at.span.clone(), msg, help);
        }
        strategy
    }

    fn steps(&mut self, value: &Value, at: &At<'_>) -> Option<Vec<CanaryStep>> {
        let Value::Array(items) = value else {
            self.mismatch(
                at,
                "a list of steps such as { weight = 10, pause = \"30s\" }",
                value,
            );
            return None;
        };
        let mut steps: Vec<CanaryStep> = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let at = at.elem(i);
            let Some(step) = self.step(item, &at) else {
                ok = false;
                continue;
            };
            if let Some(prev) = steps.last().map(|s| s.weight).filter(|p| step.weight < *p) {
                let msg = format!(
                    "canary weight {} is lower than the previous step's {prev}; \
                     weights must not decrease",
                    step.weight
                );
                self.error(at.field("weight").span, msg);
            }
            steps.push(step);
        }
        ok.then_some(steps)
    }

    fn step(&mut self, value: &Value, at: &At<'_>) -> Option<CanaryStep> {
        let Value::Object(fields) = value else {
            self.mismatch(at, "a step such as { weight = 10, pause = \"30s\" }", value);
            return None;
        };
        for key in fields.keys().filter(|k| !STEP_KEYS.contains(&k.as_str())) {
            let help =
                suggest(key, STEP_KEYS).or_else(|| Some("a step has `weight` and `pause`".into()));
            let msg = format!("unknown key `{key}` in canary step");
            self.report(Severity::Error, at.key(key), msg, help);
        }
        let weight = match fields.get("weight") {
            Some(w) => self.int(w, &at.field("weight"), 0, Some(100)),
            None => {
                self.error(at.span.clone(), "canary step is missing `weight`");
                None
            }
        };
        let pause = match fields.get("pause") {
            Some(p) => Some(self.duration(p, &at.field("pause"))?),
            None => None,
        };
        Some(CanaryStep {
            weight: weight?,
            pause,
        })
    }

    fn analysis(&mut self, block: &Block) -> Analysis {
        let f = self.fields(&block.body, header(block), &ANALYSIS);
        let interval = self.get(f.attr("interval"), Self::duration);
        let max_error_rate = self.get(f.attr("max_error_rate"), |cx, v, at| {
            cx.fraction(v, at, 0.0, 1.0)
        });
        let max_p50_latency = self.get(f.attr("max_p50_latency"), Self::duration);
        let max_p99_latency = self.get(f.attr("max_p99_latency"), Self::duration);
        // Relative to the stable release in the same window: a difference of error rates
        // (0–1), and a fraction of stable's p99 (1.0 is twice as slow; 100 is a generous cap
        // that still catches a typo such as a latency in milliseconds).
        let max_error_rate_increase = self.get(f.attr("max_error_rate_increase"), |cx, v, at| {
            cx.fraction(v, at, 0.0, 1.0)
        });
        let max_p99_increase = self.get(f.attr("max_p99_increase"), |cx, v, at| {
            cx.fraction(v, at, 0.0, 100.0)
        });
        let min_requests = self.get(f.attr("min_requests"), |cx, v, at| cx.int(v, at, 0, None));
        let limit = |cx: &mut Self, key: &str| {
            cx.get(f.attr(key), |cx, v, at| cx.int(v, at, 0, None))
                .unwrap_or(0)
        };
        Analysis {
            interval: interval.unwrap_or(secs(10)),
            max_error_rate,
            max_p50_latency,
            max_p99_latency,
            max_error_rate_increase,
            max_p99_increase,
            min_requests: min_requests.unwrap_or(50),
            failure_limit: limit(self, "failure_limit"),
            inconclusive_limit: limit(self, "inconclusive_limit"),
        }
    }
}
