//! Policy as code for kiln plans: Rego policies, evaluated in-process with
//! [regorus](https://github.com/microsoft/regorus), the way conftest evaluates them.
//!
//! ```
//! use kiln_policy::{BuiltinSettings, Level, Limits, Module, PolicySet, builtin_pack, evaluate};
//! use serde_json::json;
//!
//! let team = PolicySet::new("team", Level::HardMandatory, vec![Module {
//!     path: "ports.rego".into(),
//!     source: r#"
//!         package team.ports
//!         deny contains msg if {
//!             some name, s in input.services
//!             s.port < 1024
//!             msg := sprintf("service.%s: port %d is privileged", [name, s.port])
//!         }
//!     "#.into(),
//! }]);
//! let input = json!({
//!     "resource_changes": [],
//!     "services": { "web": { "port": 80 } },
//!     "kiln": { "environment": { "name": "dev", "protected": false } },
//! });
//! let sets = [builtin_pack(&BuiltinSettings::default()), team];
//! let decision = evaluate(&sets, &input, &Limits::default())?;
//! assert_eq!(decision.blocking()[0].message, "service.web: port 80 is privileged");
//! assert!(!decision.overridable()); // hard-mandatory
//! # Ok::<(), kiln_policy::Error>(())
//! ```
//!
//! # Policy sets and levels
//!
//! A [`PolicySet`] is a named bundle of Rego modules ([`load_dir`] reads a directory) with a
//! [`Level`], Sentinel's enforcement levels, chosen where the set is deployed, not in the
//! policy:
//!
//! | level | a denial … |
//! |---|---|
//! | `advisory` | is reported; it never blocks |
//! | `soft_mandatory` | blocks, unless an operator overrides it (the override is logged) |
//! | `hard_mandatory` | blocks; nothing overrides it |
//!
//! [`Decision::blocking`] lists the denials that block, [`Decision::overridable`] says whether
//! only soft-mandatory ones do. Every decision records each set's
//! [`PolicySet::bundle_hash`], so an audit can name exactly which policies decided.
//!
//! # Conventions (conftest's)
//!
//! - Modules are **Rego v1** (OPA 1.x: `contains`, `if` and `in` need no import). `*_test.rego`
//!   files are tests, not policies ([`run_tests`] runs them like `opa test`).
//! - In every package of a set, the rules `deny`, `violation`, `deny_*` and `violation_*` deny,
//!   and `warn` and `warn_*` warn (names as conftest matches them:
//!   `^(deny|violation|warn)(_[a-zA-Z0-9]+)*$`). Each is a set of strings or of objects with a
//!   string `msg` (`deny contains {"msg": m, "severity": "high"} if …`); extra fields are
//!   ignored. Anything else (a boolean `deny := true`, a number) is an [`Error::Shape`], not
//!   silently ignored.
//! - A package's `exception` rule lists rule names without their prefix, as conftest's
//!   `exception contains ["foo"] if …` (a set of arrays of names; a set of names works too).
//!   An exception for `foo` suppresses `deny_foo`, `violation_foo` and `warn_foo` of that
//!   package; their results are still reported with [`Outcome::excepted`] set, and never
//!   block.
//! - Sets are evaluated separately: each has its own engine and its own data document
//!   ([`PolicySet::data`]), so packages of two sets never merge.
//!
//! # Hermetic and bounded
//!
//! regorus is built without its default features: only `std` and `arc`. So there is no
//! `http.send` at all (a policy calling it fails to compile rather than quietly getting
//! *undefined*), no `time.now_ns` (policies read `input.kiln.now`, so a decision replays), and
//! no `opa.runtime`. The regex, glob, time, semver, net, JSON-schema, base64/hex/urlquery and
//! YAML builtins are left out to keep the binary lean; calling one is a compile error naming
//! the function. Builtin errors are errors (regorus's strict default, where OPA would give
//! *undefined*), so a policy fails closed.
//!
//! Evaluation time is bounded by [`Limits::timeout`] through regorus's cooperative execution
//! timer: a policy that iterates too long is stopped with [`Error::Timeout`]. The timer is
//! checked between evaluation steps, so a single builtin call that runs long by itself (a
//! `numbers.range` of a hundred million numbers) finishes before it is noticed. Memory is not
//! bounded (regorus can only do that with its own global allocator). Policy files are bounded
//! by regorus's default length limits.
//!
//! Any error fails the whole evaluation ([`evaluate`] returns `Err`): a policy that could not
//! be evaluated never passes a plan, whatever its level.
//!
//! # How rules are found and evaluated
//!
//! regorus has no public API that lists a module's rules, so the names that start a line of a
//! module (after indentation or `default`) are taken as candidates and each is confirmed with
//! the engine (`has_declared_rule_rooted_at`): a `deny_x` in a comment or inside a body is
//! never taken for a rule. Each package's `exception` and result rules are then evaluated by
//! their full path in one query (`data["team"]["web"].deny; data["team"]["web"].warn_x; …`),
//! so that helpers they share are computed once; when one of them is undefined, which makes
//! the query undefined as a whole, they are evaluated one by one.
//!
//! *A regorus 0.14.1 issue to know when writing policies:* a package split over several files
//! and reached **as a whole**, through an import alias (`import data.team.lib` then
//! `lib.allowed`) or as `data.team.lib`, is evaluated file by file, and a rule in one file that
//! uses a rule of a *later* file of that package can come out empty (seen with a package in
//! three files). Referring to rules by their full path (`data.team.lib.allowed`) is not
//! affected, nor is anything kiln-policy queries itself. In tests and cross-package helpers,
//! write the full path, or keep a helper package in one file.
//!
//! # The input document
//!
//! `input` is kiln's plan JSON (`kiln plan --json`, [`kiln_core::plan::Plan`]) with
//! environment values masked and a `kiln` object added; [`build_input`] builds it from a
//! [`Plan`](kiln_core::plan::Plan) and a [`Context`].
//!
//! ```json
//! {
//!   "format_version": "1.0",
//!   "lineage": "…", "serial": 7, "config_hash": "sha256:…",
//!   "resource_changes": [{
//!     "address": "service.web",            // balancer.NAME, drift, service.NAME.instance["ID"]
//!     "mode": "managed",
//!     "type": "kiln_service",              // kiln_balancer, kiln_drift, kiln_instance
//!     "name": "web",
//!     "change": {
//!       "actions": ["create", "delete"],   // ["no-op"] ["create"] ["create","delete"] ["update"] ["delete"]
//!       "before": { … },                   // as "after"; null when created
//!       "after": {                         // null when deleted
//!         "image": "web", "image_digest": "sha256:…", "instances": 3, "port": 8080,
//!         "env": { "GREETING": "sha256:1a2b3c4d5e6f" },
//!         "health": { … } | null, "rollout": { … }, "notify": ["http://…"]  // notify only when set
//!       }
//!     },
//!     "action_reason": "image changed, env changed" | null,
//!     "rollout": {                         // a new release's schedule, else null
//!       "strategy": "canary", "from_release": 1, "to_release": 2, "instances": 3,
//!       "batches": [1, 2], "surge": 3, "expected_duration": "1m 20s",
//!       "waits_for_promotion": true, "steps": [ … ], "analysis": { … }, "warm_for": "5m",
//!       "rollback": "…"
//!     }
//!   }],
//!   "services": {                          // the desired spec of every service, as apply runs it
//!     "web": {
//!       "name": "web", "image": "web", "image_digest": "sha256:…",
//!       "instances": 3, "port": 8080,
//!       "env": { "GREETING": "sha256:1a2b3c4d5e6f" },          // values masked
//!       "health": { "path": "/healthz", "interval": "5s", "timeout": "2s",
//!                   "healthy_threshold": 2, "unhealthy_threshold": 3 } | null,
//!       "rollout": {
//!         "strategy": "rolling" | "canary" | "blue_green",
//!         "steps": [{ "weight": 10, "pause": "30s" | null }],
//!         "analysis": { "interval": "10s", "max_error_rate": 0.01, "max_p50_latency": null,
//!                       "max_p99_latency": "300ms", "max_error_rate_increase": 0.005,
//!                       "max_p99_increase": null, "min_requests": 50,
//!                       "failure_limit": 0, "inconclusive_limit": 3 } | null,
//!         "auto_rollback": true, "auto_promote": false, "scale_down_delay": "5m",
//!         "progress_deadline": "10m", "max_parallel": 1, "min_healthy_time": "10s",
//!         "healthy_deadline": "5m", "canary_instances": 1 | null,
//!         "preview_listen": "127.0.0.1:8081"           // only when set
//!       },
//!       "notify": ["http://…"]                          // only when set
//!     }
//!   },
//!   "balancers": { "public": { "name": "public", "listen": "0.0.0.0:8080",
//!                   "routes": [{ "host": null, "path_prefix": "/", "service": "web" }] } },
//!   "drift": { … },                        // drift remediations only (`kiln drift --remediate`)
//!   "kiln": {
//!     "environment": { "name": "prod", "protected": true },
//!     "actor": "alice@build-1",
//!     "now": "2026-11-29T12:00:00Z",
//!     "images": {                          // every image a service uses, and their ancestors
//!       "sha256:…": {
//!         "name": "web", "digest": "sha256:…", "in_store": true, "verified": true,
//!         "labels": { "version": "1.0.0", "org.opencontainers.image.revision": "abc123" },
//!         "git": { "commit": "abc123", "dirty": false } | null,
//!         "created": "2026-11-01T08:00:00Z" | null, "age_seconds": 2347200 | null,
//!         "ancestry": ["sha256:parent", …],                 // nearest first
//!         "revoked": { "reason": "…", "at": "…" } | null,   // set on the image and its descendants
//!         "entrypoint": ["/bin/app"], "cmd": ["--serve"], "exposed_ports": [8080]
//!       }
//!     }
//!   }
//! }
//! ```
//!
//! Durations are humantime strings (`"30s"`, `"1m 20s"`), as in every kiln JSON. Environment
//! values are replaced by `sha256:` and 12 hex digits of their sha256 ([`mask_env_value`]):
//! policies test keys and whether a value changed, never the value.
//!
//! # The built-in pack
//!
//! [`builtin_pack`] returns kiln's own checks as the set `builtin` (package `kiln.builtin`,
//! embedded from `policy/builtin/*.rego`), one id per check ([`BUILTIN_CHECKS`]); each can be
//! disabled by [`BuiltinSettings::disabled`] (handed to the policies as
//! `data.kiln.settings`) or excepted by a package's `exception`. What a plan touches decides
//! which checks look at a service:
//!
//! | check | denies | looks at services that |
//! |---|---|---|
//! | `image_from_store` | an image not in kiln's store, or not verified | start instances (new release, scale-up, drift replacement) |
//! | `image_labels` | no `version` label; no git commit (label `org.opencontainers.image.revision` or the git record); in a protected environment, a dirty tree | get a new release |
//! | `no_ssh` | port 22 as the service's port or an image's exposed port, `sshd`/`dropbear` in the entrypoint or cmd; a balancer listening on `:22` | change (create, replace, update, drift replacement) |
//! | `health_required` | no health check | change |
//! | `capacity` | a canary step whose weight exceeds the canary's share of the instances (`weight × instances > 100 × canary_instances`), for a service of more than one instance; **warns** when a rolling update's `max_parallel` ≥ `instances` | get a new release replacing a stable one |
//! | `protected_progressive` | in a protected environment, a strategy other than `canary`/`blue_green`, or one without `analysis` | get a new release (including their first) |
//! | `max_image_age` | an image older than `max_image_age_days` (default 90) by `age_seconds` | get a new release |
//! | `revoked` | an image with `revoked` set, or one whose `ancestry` holds an image with `revoked` set | start instances |
//!
//! The label, age and revocation checks need the image's record in `kiln.images`; an image
//! without one is reported by `image_from_store`. An image without `age_seconds` is not
//! checked for age, and an ancestor counts as revoked only when its own record (with
//! `revoked` set) is in `kiln.images`.
//!
//! *`capacity`.* kiln's rolling update is create-before-destroy: an old instance is retired
//! only when a ready new one took its place, so it never drops routed capacity, whatever
//! `max_parallel` says; blue/green brings the new release up at full size. A canary is where
//! capacity drops: a step's weight is a share of *requests*, served by `canary_instances`
//! instances, so `10` instances with `1` canary at a `50` % step puts five instances' load on
//! one. That is denied. A rolling update with `max_parallel` ≥ `instances` keeps capacity but
//! replaces the whole service in one batch (twice the instances meanwhile, and every request
//! on brand-new instances within one health period), which is a warning.
//!
//! *`max_image_age`* denies rather than warns: kiln never patches a running instance, so an
//! old image is old software until it is rebuilt, and a denial is the only signal that makes
//! that happen. It applies to new releases only, so scaling up or healing what already runs is
//! never held up; the pack is soft-mandatory by default, so a hotfix can still be shipped on
//! an old image with a logged override, and the limit is a setting.

mod builtin;
mod error;
mod eval;
mod input;
pub mod report;
mod set;
mod testing;

pub use builtin::{BUILTIN_CHECKS, BUILTIN_SET, BuiltinSettings, builtin_pack};
pub use error::{Error, Result};
pub use eval::{Decision, Evaluator, Kind, Limits, Outcome, evaluate};
pub use input::{
    Context, Environment, GitFacts, ImageFacts, Revocation, build_input, mask_env_value,
};
pub use set::{Level, Module, PolicySet, load_dir};
pub use testing::{TestOutcome, TestReport, TestResult, run_tests};
