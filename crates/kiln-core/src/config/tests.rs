#![allow(clippy::unwrap_used)]

use std::time::Duration;

use expect_test::{Expect, expect};

use super::{Source, bake_order, load};
use crate::model::{Base, Config, Script, Step, Strategy, VarOverride, VarSource};

/// The example from PRODUCT.md, verbatim.
const PRODUCT_EXAMPLE: &str = r#"project = "shop"

variable "replicas" { default = 3 }

image "web" {
  base = "scratch"                 # or another image ("image.base"), "tar:./rootfs.tar", "dir:./rootfs"
  provisioner "file" {
    source      = "build/web"
    destination = "/app/web"
    mode        = "0755"
  }
  provisioner "shell" { inline = ["mkdir -p /app/data"] }   # runs sandboxed inside the image root
  entrypoint = ["/app/web"]
  env        = { RUST_LOG = "info" }
  labels     = { team = "storefront" }
}

service "web" {
  image     = image.web
  instances = var.replicas
  port      = 8080                 # the app's port; the local runtime assigns a host port and sets PORT
  env       = { GREETING = "hello" }

  health {
    path = "/healthz"
    interval = "1s"
    timeout = "500ms"
    healthy_threshold = 2
    unhealthy_threshold = 3
  }

  rollout {
    strategy = "canary"            # rolling | blue_green | canary
    steps    = [{ weight = 10, pause = "30s" }, { weight = 50, pause = "30s" }]
    analysis {
      interval = "5s"
      max_error_rate = 0.01
      max_p99_latency = "300ms"
      min_requests = 50
    }
    auto_rollback     = true
    scale_down_delay  = "5m"       # old release stays warm for instant rollback
    progress_deadline = "10m"
  }
}

balancer "public" {
  listen = "127.0.0.1:8080"
  route {
    path_prefix = "/"
    service = service.web
  }
}
"#;

fn source(text: &str) -> Source {
    Source {
        name: "kiln.hcl".into(),
        text: text.into(),
    }
}

fn flag(name: &str, value: &str) -> VarOverride {
    VarOverride {
        name: name.into(),
        value: value.into(),
        source: VarSource::Flag,
    }
}

fn env(name: &str, value: &str) -> VarOverride {
    VarOverride {
        source: VarSource::Env,
        ..flag(name, value)
    }
}

fn load_ok(text: &str, overrides: &[VarOverride]) -> Config {
    let (config, diags) = load(&source(text), overrides);
    let rendered: Vec<String> = diags.iter().map(ToString::to_string).collect();
    assert!(diags.is_empty(), "{}", rendered.join("\n"));
    config.unwrap()
}

/// Loads `text` and compares every rendered diagnostic with `expected`; the config must be
/// refused when any of them is an error.
fn check(text: &str, overrides: &[VarOverride], expected: &Expect) {
    let (config, diags) = load(&source(text), overrides);
    let errors = diags.iter().any(|d| d.is_error());
    assert_eq!(
        config.is_some(),
        !errors,
        "a config comes back exactly when there is no error"
    );
    let rendered: Vec<String> = diags.iter().map(ToString::to_string).collect();
    expected.assert_eq(&rendered.join("\n\n"));
}

const WEB: &str = "project = \"shop\"\nimage \"web\" {}\n";

#[test]
fn product_example_loads_cleanly() {
    let config = load_ok(PRODUCT_EXAMPLE, &[]);
    assert_eq!(config.project, "shop");
    assert_eq!(config.variables["replicas"].value, serde_json::json!(3));
    assert_eq!(config.variables["replicas"].source, VarSource::Default);
    assert_eq!(config.variables["replicas"].loc.to_string(), "kiln.hcl:3:1");

    let web = &config.images["web"];
    assert_eq!(web.base, Base::Scratch);
    assert_eq!(web.loc.to_string(), "kiln.hcl:5:1");
    assert_eq!(web.base_loc.to_string(), "kiln.hcl:6:10");
    let Step::File(file) = &web.provisioners[0].step else {
        panic!("first provisioner is the file one");
    };
    assert_eq!(
        (file.destination.as_str(), file.mode),
        ("/app/web", Some(0o755))
    );
    assert_eq!(file.source_loc.to_string(), "kiln.hcl:8:19");
    assert_eq!(web.provisioners[1].loc.to_string(), "kiln.hcl:12:3");
    let Step::Shell(shell) = &web.provisioners[1].step else {
        panic!("second provisioner is the shell one");
    };
    assert_eq!(
        shell.script,
        Script::Inline(vec!["mkdir -p /app/data".into()])
    );
    assert!(!shell.network);
    assert_eq!(web.run.entrypoint, Some(vec!["/app/web".into()]));
    assert_eq!(web.run.env["RUST_LOG"], "info");
    assert_eq!(web.run.labels["team"], "storefront");

    let svc = &config.services["web"];
    assert_eq!(
        (svc.image.as_str(), svc.instances, svc.port),
        ("web", 3, 8080)
    );
    assert_eq!(svc.env["GREETING"], "hello");
    let health = svc.health.as_ref().unwrap();
    assert_eq!(health.path, "/healthz");
    assert_eq!(health.timeout, Duration::from_millis(500));
    let rollout = &svc.rollout;
    assert_eq!(rollout.strategy, Strategy::Canary);
    let steps: Vec<_> = rollout.steps.iter().map(|s| (s.weight, s.pause)).collect();
    let thirty = Some(Duration::from_secs(30));
    assert_eq!(steps, [(10, thirty), (50, thirty)]);
    let analysis = rollout.analysis.as_ref().unwrap();
    assert_eq!(analysis.interval, Duration::from_secs(5));
    assert_eq!(analysis.max_error_rate, Some(0.01));
    assert_eq!(analysis.max_p99_latency, Some(Duration::from_millis(300)));
    assert_eq!((analysis.min_requests, analysis.failure_limit), (50, 0));
    assert_eq!(rollout.scale_down_delay, Duration::from_secs(300));
    assert_eq!(rollout.min_healthy_time, Duration::from_secs(10));
    assert_eq!((rollout.auto_rollback, rollout.auto_promote), (true, false));

    let public = &config.balancers["public"];
    assert_eq!(public.listen, "127.0.0.1:8080");
    assert_eq!(public.routes.len(), 1);
    assert_eq!(public.routes[0].service, "web");
    assert_eq!(public.routes[0].path_prefix, "/");
    assert_eq!(public.loc.to_string(), "kiln.hcl:47:1");
}

#[test]
fn defaults_apply_when_blocks_are_left_out() {
    let config = load_ok(
        "project = \"p\"\nimage \"web\" {}\nservice \"web\" {\n  image = \"image.web\"\n  port = 80\n  health {}\n}\n",
        &[],
    );
    let svc = &config.services["web"];
    assert_eq!(svc.instances, 1);
    let health = svc.health.as_ref().unwrap();
    assert_eq!(
        (health.path.as_str(), health.interval),
        ("/", Duration::from_secs(2))
    );
    assert_eq!(
        (health.healthy_threshold, health.unhealthy_threshold),
        (2, 3)
    );
    assert_eq!(svc.rollout.strategy, Strategy::Rolling);
    assert_eq!(svc.rollout.progress_deadline, Duration::from_secs(600));
    assert_eq!(svc.rollout.healthy_deadline, Duration::from_secs(300));
    assert_eq!(svc.rollout.max_parallel, 1);
}

#[test]
fn three_mistakes_three_diagnostics() {
    check(
        r#"project = "shop"
image "web" {
  bsae = "scratch"
}
service "web" {
  image = image.wbe
  port  = 8080
  health { interval = 30 }
}
"#,
        &[],
        &expect![[r#"
            kiln.hcl:3:3: error: unknown attribute `bsae` in image block
              |
            3 |   bsae = "scratch"
              |   ^^^^
              = help: did you mean `base`?

            kiln.hcl:6:11: error: unknown image `wbe`
              |
            6 |   image = image.wbe
              |           ^^^^^^^^^
              = help: did you mean `web`?

            kiln.hcl:8:23: error: expected a duration such as "30s", found number 30
              |
            8 |   health { interval = 30 }
              |                       ^^"#]],
    );
}

#[test]
fn references_inside_templates_are_checked() {
    check(
        "project = \"p-${var.nmae}\"\nvariable \"name\" { default = \"x\" }\n",
        &[],
        &expect![[r#"
            kiln.hcl:1:16: error: unknown variable `nmae`
              |
            1 | project = "p-${var.nmae}"
              |                ^^^^^^^^
              = help: did you mean `name`?"#]],
    );
    let config = load_ok(
        "project = \"p-${var.name}\"\nvariable \"name\" { default = \"x\" }\n",
        &[],
    );
    assert_eq!(config.project, "p-x");
}

const REPLICAS: &str = "project = \"p\"\nvariable \"replicas\" { default = 3 }\n";

#[test]
fn flags_beat_env_beat_defaults() {
    let value = |overrides: &[VarOverride]| {
        let var = &load_ok(REPLICAS, overrides).variables["replicas"];
        (var.value.clone(), var.source)
    };
    assert_eq!(value(&[]), (serde_json::json!(3), VarSource::Default));
    assert_eq!(
        value(&[env("replicas", "4")]),
        (serde_json::json!(4), VarSource::Env)
    );
    assert_eq!(
        value(&[flag("replicas", "5"), env("replicas", "4")]),
        (serde_json::json!(5), VarSource::Flag)
    );
    assert_eq!(
        value(&[
            env("replicas", "4"),
            flag("replicas", "5"),
            flag("replicas", "6")
        ]),
        (serde_json::json!(6), VarSource::Flag)
    );
}

#[test]
fn overrides_take_the_declared_type() {
    let text = r#"project = "p"
variable "tags" { type = "list" }
variable "debug" { type = bool }
variable "name" {}
variable "limits" { default = { cpu = 1 } }
"#;
    let config = load_ok(
        text,
        &[
            flag("tags", r#"["a", "b"]"#),
            env("debug", "true"),
            flag("name", "42"),
            flag("limits", "{ cpu = 2, mem = \"1G\" }"),
            env("undeclared", "ignored"),
        ],
    );
    let value = |n: &str| config.variables[n].value.clone();
    assert_eq!(value("tags"), serde_json::json!(["a", "b"]));
    assert_eq!(value("debug"), serde_json::json!(true));
    assert_eq!(value("name"), serde_json::json!("42"));
    assert_eq!(
        value("limits"),
        serde_json::json!({ "cpu": 2, "mem": "1G" })
    );
}

#[test]
fn bad_override_values_name_the_flag() {
    check(
        REPLICAS,
        &[flag("replicas", "abc")],
        &expect![[r#"
            kiln.hcl:0:0: error: -var replicas=abc: expected a number
              = help: `replicas` is declared at kiln.hcl:2:1"#]],
    );
    check(
        "project = \"p\"\nvariable \"token\" {\n  type = \"number\"\n  sensitive = true\n}\n",
        &[env("token", "s3cret")],
        &expect![[r#"
            kiln.hcl:0:0: error: KILN_VAR_token=(sensitive): expected a number
              = help: `token` is declared at kiln.hcl:2:1"#]],
    );
}

#[test]
fn undeclared_flag_is_an_error() {
    check(
        REPLICAS,
        &[flag("replica", "2")],
        &expect![[r#"
            kiln.hcl:0:0: error: -var replica: no variable `replica` is declared
              = help: did you mean `replicas`?"#]],
    );
}

#[test]
fn variable_without_value_and_its_uses() {
    // The use of `var.port` is not reported again: the variable's own error says it all.
    check(
        "project = \"p\"\nvariable \"port\" { type = \"number\" }\nimage \"web\" {}\nservice \"web\" {\n  image = image.web\n  port = var.port\n}\n",
        &[],
        &expect![[r#"
            kiln.hcl:2:1: error: variable `port` has no value; set it with -var port=… or KILN_VAR_port
              |
            2 | variable "port" { type = "number" }
              | ^^^^^^^^^^^^^^^"#]],
    );
}

#[test]
fn variable_defaults_are_literal_and_typed() {
    check(
        "project = \"p\"\nvariable \"a\" { default = var.b }\nvariable \"b\" {\n  type = \"number\"\n  default = \"x\"\n}\nvariable \"c\" { type = \"numbr\" }\n",
        &[],
        &expect![[r#"
            kiln.hcl:2:26: error: a variable default must be a literal value, not a reference
              |
            2 | variable "a" { default = var.b }
              |                          ^^^^^

            kiln.hcl:5:13: error: expected a number, found string "x"
              |
            5 |   default = "x"
              |             ^^^

            kiln.hcl:7:1: error: variable `c` has no value; set it with -var c=… or KILN_VAR_c
              |
            7 | variable "c" { type = "numbr" }
              | ^^^^^^^^^^^^

            kiln.hcl:7:23: error: expected a type, one of `string`, `number`, `bool`, `list` or `map`
              |
            7 | variable "c" { type = "numbr" }
              |                       ^^^^^^^
              = help: did you mean `number`?"#]],
    );
}

#[test]
fn missing_required_attributes_point_at_the_block() {
    check(
        "image \"web\" {}\nservice \"web\" { image = image.web }\n",
        &[],
        &expect![[r#"
            kiln.hcl:1:1: error: missing required attribute `project`
              |
            1 | image "web" {}
              | ^
            
            kiln.hcl:2:1: error: missing required attribute `port` in service block
              |
            2 | service "web" { image = image.web }
              | ^^^^^^^^^^^^^"#]],
    );
}

#[test]
fn bad_base_lists_the_accepted_forms() {
    check(
        "project = \"p\"\nimage \"web\" { base = \"ubuntu:24.04\" }\nimage \"api\" { base = \"image.wbe\" }\n",
        &[],
        &expect![[r#"
            kiln.hcl:2:22: error: expected a base such as "scratch", image.NAME, "tar:PATH", "dir:PATH" or "oci:PATH[:TAG]", found string "ubuntu:24.04"
              |
            2 | image "web" { base = "ubuntu:24.04" }
              |                      ^^^^^^^^^^^^^^

            kiln.hcl:3:22: error: unknown image `wbe`
              |
            3 | image "api" { base = "image.wbe" }
              |                      ^^^^^^^^^^^
              = help: did you mean `web`?"#]],
    );
}

#[test]
fn base_cycles_are_reported_at_each_image() {
    check(
        "project = \"p\"\nimage \"a\" { base = image.b }\nimage \"b\" { base = \"image.a\" }\nimage \"c\" { base = image.a }\nimage \"d\" { base = image.d }\n",
        &[],
        &expect![[r#"
            kiln.hcl:2:20: error: image `a` depends on itself: a → b → a
              |
            2 | image "a" { base = image.b }
              |                    ^^^^^^^
            
            kiln.hcl:3:20: error: image `b` depends on itself: b → a → b
              |
            3 | image "b" { base = "image.a" }
              |                    ^^^^^^^^^
            
            kiln.hcl:5:20: error: image `d` depends on itself: d → d
              |
            5 | image "d" { base = image.d }
              |                    ^^^^^^^"#]],
    );
}

#[test]
fn unknown_blocks_and_misplaced_items() {
    check(
        "project = \"p\"\nimgae \"web\" {}\nimage \"web\" {\n  provisioner \"fiel\" {}\n  env { A = 1 }\n}\nimage \"web\" {}\n",
        &[],
        &expect![[r#"
            kiln.hcl:2:1: error: unknown block type `imgae`
              |
            2 | imgae "web" {}
              | ^^^^^
              = help: did you mean `image`?
            
            kiln.hcl:4:15: error: unknown provisioner type `fiel`
              |
            4 |   provisioner "fiel" {}
              |               ^^^^^^
              = help: did you mean `file`?
            
            kiln.hcl:5:3: error: `env` is an attribute, not a block
              |
            5 |   env { A = 1 }
              |   ^^^
              = help: write it as `env = …`
            
            kiln.hcl:7:7: error: image `web` is already declared at kiln.hcl:3:1
              |
            7 | image "web" {}
              |       ^^^^^"#]],
    );
}

#[test]
fn syntax_errors_stop_with_a_location() {
    check(
        "project = \"p\"\nimage \"web\" {\n  cmd = [\"a\",\n}\n",
        &[],
        &expect![[r#"
            kiln.hcl:4:1: error: syntax error: invalid expression; expected `"`, `[`, `{`, `-`, `!`, `(`, `_`, `<`, letter or digit
              |
            4 | }
              | ^"#]],
    );
    check(
        "project = \"p\"\nproject = \"q\"\n",
        &[],
        &expect![[r#"
            kiln.hcl:2:1: error: attribute `project` is set twice in the same block
              |
            2 | project = "q"
              | ^^^^^^^"#]],
    );
}

#[test]
fn provisioners_check_their_values() {
    check(
        r#"project = "p"
image "web" {
  provisioner "file" {
    source = "a"
    destination = "app"
    mode = "0999"
    owner = "root"
  }
  provisioner "shell" {}
  provisioner "shell" {
    inline = ["true"]
    script = "x.sh"
  }
  ports = [8080, 0]
}
"#,
        &[],
        &expect![[r#"
            kiln.hcl:5:19: error: expected an absolute path in the image, found string "app"
              |
            5 |     destination = "app"
              |                   ^^^^^
            
            kiln.hcl:6:12: error: expected an octal mode from "0000" to "7777", such as "0755", found string "0999"
              |
            6 |     mode = "0999"
              |            ^^^^^^
            
            kiln.hcl:7:13: error: expected a numeric owner such as "1000:1000" or 1000, found string "root"
              |
            7 |     owner = "root"
              |             ^^^^^^
            
            kiln.hcl:9:3: error: shell provisioner needs `inline` or `script`
              |
            9 |   provisioner "shell" {}
              |   ^^^^^^^^^^^^^^^^^^^
            
            kiln.hcl:12:5: error: set either `inline` or `script`, not both
               |
            12 |     script = "x.sh"
               |     ^^^^^^
            
            kiln.hcl:14:18: error: expected an integer from 1 to 65535, found number 0
               |
            14 |   ports = [8080, 0]
               |                  ^"#]],
    );
    let config = load_ok(
        "project = \"p\"\nimage \"web\" {\n  base = \"oci:./layout:v1\"\n  provisioner \"file\" {\n    source = \"a\"\n    destination = \"/a\"\n    mode = 644\n    owner = \"1:2\"\n  }\n  provisioner \"shell\" { script = \"s.sh\" }\n}\n",
        &[],
    );
    let web = &config.images["web"];
    let Step::File(file) = &web.provisioners[0].step else {
        panic!("file step");
    };
    assert_eq!(file.mode, Some(0o644));
    assert_eq!(file.owner.map(|o| (o.uid, o.gid)), Some((1, 2)));
    let Step::Shell(shell) = &web.provisioners[1].step else {
        panic!("shell step");
    };
    let Script::File { path, loc } = &shell.script else {
        panic!("script file");
    };
    assert_eq!(
        (path.as_str(), loc.to_string()),
        ("s.sh", "kiln.hcl:10:34".to_owned())
    );
}

#[test]
fn rollout_rules() {
    let service = |rollout: &str| {
        format!(
            "{WEB}service \"web\" {{\n  image = image.web\n  port = 80\n  rollout {{\n{rollout}\n  }}\n}}\n"
        )
    };
    check(
        &service("    strategy = \"canary\""),
        &[],
        &expect![[r#"
            kiln.hcl:7:16: error: a canary rollout needs at least one step
              |
            7 |     strategy = "canary"
              |                ^^^^^^^^
              = help: add steps = [{ weight = 10, pause = "30s" }, …]"#]],
    );
    check(
        &service(
            "    strategy = \"canary\"\n    steps = [{ weight = 50 }, { weight = 20, paus = \"1m\" }]",
        ),
        &[],
        &expect![[r#"
            kiln.hcl:8:42: error: canary weight 20 is lower than the previous step's 50; weights must not decrease
              |
            8 |     steps = [{ weight = 50 }, { weight = 20, paus = "1m" }]
              |                                          ^^

            kiln.hcl:8:46: error: unknown key `paus` in canary step
              |
            8 |     steps = [{ weight = 50 }, { weight = 20, paus = "1m" }]
              |                                              ^^^^
              = help: did you mean `pause`?"#]],
    );
    check(
        &service("    strategy = \"blue-green\"\n    steps = [{ weight = 101 }]"),
        &[],
        &expect![[r#"
            kiln.hcl:7:16: error: expected "rolling", "blue_green" or "canary", found string "blue-green"
              |
            7 |     strategy = "blue-green"
              |                ^^^^^^^^^^^^
              = help: did you mean `blue_green`?

            kiln.hcl:8:25: error: expected an integer from 0 to 100, found number 101
              |
            8 |     steps = [{ weight = 101 }]
              |                         ^^^"#]],
    );
    check(
        &service(
            "    strategy = \"blue_green\"\n    steps = [{ weight = 10 }]\n    max_parallel = 0",
        ),
        &[],
        &expect![[r#"
            kiln.hcl:8:5: warning: `steps` only apply to the canary strategy and are ignored here
              |
            8 |     steps = [{ weight = 10 }]
              |     ^^^^^
            
            kiln.hcl:9:20: error: expected an integer of at least 1, found number 0
              |
            9 |     max_parallel = 0
              |                    ^"#]],
    );
    // A strategy picked by a variable keeps every strategy's settings without a warning: the
    // config is meant to serve more than one.
    let chosen = format!(
        "variable \"strategy\" {{ default = \"canary\" }}\n{}",
        service(
            "    strategy = var.strategy\n    steps = [{ weight = 10 }]\n    preview_listen = \"127.0.0.1:8081\""
        )
    );
    for strategy in ["canary", "blue_green", "rolling"] {
        let config = load_ok(&chosen, &[flag("strategy", strategy)]);
        assert_eq!(
            config.services["web"].rollout.steps.len(),
            1,
            "{strategy}: the steps are kept"
        );
    }
}

#[test]
fn analysis_rules_relative_to_stable() {
    let service = |analysis: &str| {
        format!(
            "{WEB}service \"web\" {{\n  image = image.web\n  port = 80\n  rollout {{\n    \
             strategy = \"canary\"\n    steps = [{{ weight = 10 }}]\n    analysis {{\n{analysis}\n    }}\n  }}\n}}\n"
        )
    };
    let config = load_ok(
        &service(
            "      max_error_rate_increase = 0.005\n      max_p99_increase = 0.2\n      \
             failure_limit = 2\n      inconclusive_limit = 3",
        ),
        &[],
    );
    let analysis = config.services["web"].rollout.analysis.clone().unwrap();
    assert_eq!(analysis.max_error_rate_increase, Some(0.005));
    assert_eq!(analysis.max_p99_increase, Some(0.2));
    assert_eq!(
        (analysis.failure_limit, analysis.inconclusive_limit),
        (2, 3)
    );
    // Absent, the relative rules are not checked; the absolute defaults are unchanged.
    let plain = load_ok(&service("      max_error_rate = 0.01"), &[]);
    let plain = plain.services["web"].rollout.analysis.clone().unwrap();
    assert_eq!(
        (plain.max_error_rate_increase, plain.max_p99_increase),
        (None, None)
    );
    assert_eq!(
        (plain.min_requests, plain.interval),
        (50, Duration::from_secs(10))
    );
    check(
        &service("      max_error_rate_increase = 2\n      max_p99_increase = -1"),
        &[],
        &expect![[r#"
            kiln.hcl:10:33: error: expected a number from 0 to 1, found number 2
               |
            10 |       max_error_rate_increase = 2
               |                                 ^

            kiln.hcl:11:26: error: expected a number from 0 to 100, found number -1
               |
            11 |       max_p99_increase = -1
               |                          ^^"#]],
    );
}

#[test]
fn warnings_alone_still_load() {
    let text = format!(
        "{WEB}service \"web\" {{\n  image = image.web\n  port = 80\n  rollout {{ steps = [{{ weight = 10 }}] }}\n}}\n"
    );
    let (config, diags) = load(&source(&text), &[]);
    assert_eq!(diags.len(), 1);
    assert!(!diags[0].is_error());
    assert!(config.is_some());
}

#[test]
fn balancers_check_addresses_routes_and_services() {
    check(
        &format!(
            "{WEB}service \"web\" {{\n  image = image.web\n  port = 80\n}}\nbalancer \"a\" {{\n  listen = \"localhost:80\"\n  route {{ service = service.wbe }}\n}}\nbalancer \"b\" {{ listen = \"127.0.0.1:80\" }}\nbalancer \"c\" {{\n  listen = \"127.0.0.1:80\"\n  route {{\n    path_prefix = \"api\"\n    service = \"web\"\n  }}\n}}\n"
        ),
        &[],
        &expect![[r#"
            kiln.hcl:8:12: error: expected an address such as "127.0.0.1:8080", found string "localhost:80"
              |
            8 |   listen = "localhost:80"
              |            ^^^^^^^^^^^^^^

            kiln.hcl:9:21: error: unknown service `wbe`
              |
            9 |   route { service = service.wbe }
              |                     ^^^^^^^^^^^
              = help: did you mean `web`?

            kiln.hcl:11:1: error: balancer needs at least one `route` block
               |
            11 | balancer "b" { listen = "127.0.0.1:80" }
               | ^^^^^^^^^^^^

            kiln.hcl:13:12: error: balancer `b` already listens on 127.0.0.1:80
               |
            13 |   listen = "127.0.0.1:80"
               |            ^^^^^^^^^^^^^^

            kiln.hcl:15:19: error: expected a path starting with `/`, found string "api"
               |
            15 |     path_prefix = "api"
               |                   ^^^^^

            kiln.hcl:16:15: error: expected a reference such as service.NAME, found string "web"
               |
            16 |     service = "web"
               |               ^^^^^
              = help: did you mean service.web?"#]],
    );
}

#[test]
fn bake_order_puts_bases_first() {
    let config = load_ok(
        "project = \"p\"\nimage \"app\" { base = image.runtime }\nimage \"runtime\" { base = image.os }\nimage \"os\" {}\nimage \"tools\" { base = image.os }\nimage \"alone\" {}\n",
        &[],
    );
    let order = |targets: &[&str]| {
        let targets: Vec<String> = targets.iter().map(|t| (*t).to_owned()).collect();
        bake_order(&config, &targets)
    };
    assert_eq!(
        order(&[]).unwrap(),
        ["alone", "os", "runtime", "app", "tools"]
    );
    assert_eq!(order(&["app"]).unwrap(), ["os", "runtime", "app"]);
    assert_eq!(
        order(&["tools", "alone"]).unwrap(),
        ["alone", "os", "tools"]
    );
    assert_eq!(
        order(&["ap"]).unwrap_err(),
        "unknown image `ap`; did you mean `app`?"
    );
    assert_eq!(order(&["zzz"]).unwrap_err(), "unknown image `zzz`");
}

mod props {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any non-decreasing list of weights from 0 to 100, with or without pauses, loads and
        /// comes back as written.
        #[test]
        fn non_decreasing_weights_load(
            mut weights in proptest::collection::vec(0u8..=100, 1..8),
            pauses in proptest::collection::vec(proptest::option::of(1u64..3600), 8),
        ) {
            weights.sort_unstable();
            let steps: Vec<String> = weights
                .iter()
                .zip(&pauses)
                .map(|(w, p)| match p {
                    Some(p) => format!("{{ weight = {w}, pause = \"{p}s\" }}"),
                    None => format!("{{ weight = {w} }}"),
                })
                .collect();
            let text = format!(
                "{WEB}service \"web\" {{\n  image = image.web\n  port = 80\n  rollout {{\n    strategy = \"canary\"\n    steps = [{}]\n  }}\n}}\n",
                steps.join(", ")
            );
            let config = load_ok(&text, &[]);
            let got: Vec<(u8, Option<Duration>)> = config.services["web"]
                .rollout
                .steps
                .iter()
                .map(|s| (s.weight, s.pause))
                .collect();
            let want: Vec<(u8, Option<Duration>)> = weights
                .iter()
                .zip(&pauses)
                .map(|(w, p)| (*w, p.map(Duration::from_secs)))
                .collect();
            prop_assert_eq!(got, want);
        }
    }
}

#[test]
fn expressions_evaluate_and_their_errors_point_at_them() {
    let config = load_ok(
        "project = \"p\"\nvariable \"l\" { default = [\"a\", \"b\"] }\nimage \"web\" {\n  cmd = [for s in var.l : \"${s}-x\" if s != \"b\"]\n  env = { N = 1, B = true }\n}\n",
        &[],
    );
    let web = &config.images["web"].run;
    assert_eq!(web.cmd, Some(vec!["a-x".to_owned()]));
    assert_eq!(
        (web.env["N"].as_str(), web.env["B"].as_str()),
        ("1", "true")
    );
    check(
        "project = upper(\"x\")\nvariable \"l\" { default = [\"a\"] }\nvariable \"m\" { default = { a = 1 } }\nimage \"web\" {\n  cmd = [for s in var.l : \"${s}-${var.m[\"a\"]}\"]\n  user = 1 + \"a\"\n  workdir = foo\n  env = { A = 1, B = true, C = [1] }\n}\n",
        &[],
        &expect![[r#"
            kiln.hcl:1:11: error: cannot evaluate this expression: undefined function `upper`
              |
            1 | project = upper("x")
              |           ^^^^^^^^^^

            kiln.hcl:6:10: error: cannot evaluate this expression: binary operator `+` is not applicable to `1` and `"a"`
              |
            6 |   user = 1 + "a"
              |          ^^^^^^^

            kiln.hcl:7:13: error: unknown name `foo`
              |
            7 |   workdir = foo
              |             ^^^
              = help: references start with `var.`, `image.`, `service.` or `target.`

            kiln.hcl:8:32: error: expected a string, number or bool, found a list
              |
            8 |   env = { A = 1, B = true, C = [1] }
              |                                ^^^"#]],
    );
}

#[test]
fn nomad_and_asg_names_are_accepted_for_revert_and_surge() {
    let config = load_ok(
        r#"
project = "p"
image "web" {}
service "web" {
  image = image.web
  port  = 80
  rollout {
    auto_revert = false
    max_surge   = 3
  }
}
"#,
        &[],
    );
    let rollout = &config.services["web"].rollout;
    assert!(!rollout.auto_rollback);
    assert_eq!(rollout.max_parallel, 3);
}

#[test]
fn notify_blocks_at_the_top_and_in_services() {
    let config = load_ok(
        &format!(
            "{WEB}notify {{ webhook = \"http://127.0.0.1:9000/all\" }}\nnotify {{ webhook = \"http://hooks.internal/ops\" }}\nservice \"web\" {{\n  image = image.web\n  port = 80\n  notify {{ webhook = \"http://localhost:8080/web?team=store\" }}\n}}\nservice \"api\" {{\n  image = image.web\n  port = 81\n}}\n"
        ),
        &[],
    );
    let hooks = |n: &[crate::model::Notify]| -> Vec<String> {
        n.iter().map(|n| n.webhook.clone()).collect()
    };
    assert_eq!(
        hooks(&config.notify),
        ["http://127.0.0.1:9000/all", "http://hooks.internal/ops"]
    );
    assert_eq!(
        hooks(&config.services["web"].notify),
        ["http://localhost:8080/web?team=store"]
    );
    assert!(config.services["api"].notify.is_empty());

    // The desired spec has the top-level hooks then the service's own, each once.
    let digests = std::collections::BTreeMap::from([("web".to_owned(), crate::Digest::of(b"w"))]);
    let (specs, _, _) = crate::state::desired(&config, &digests);
    assert_eq!(
        specs["web"].notify,
        [
            "http://127.0.0.1:9000/all",
            "http://hooks.internal/ops",
            "http://localhost:8080/web?team=store"
        ]
    );
    assert_eq!(
        specs["api"].notify,
        ["http://127.0.0.1:9000/all", "http://hooks.internal/ops"]
    );
}

#[test]
fn notify_webhooks_must_be_http_urls() {
    check(
        &format!(
            "{WEB}notify {{ webhook = \"https://hooks.example.com/x\" }}\nnotify \"x\" {{}}\nservice \"web\" {{\n  image = image.web\n  port = 80\n  notify {{\n    webhook = \"hooks.example.com\"\n    url = \"http://a\"\n  }}\n  notify {{ webhook = \"http://host:99999/\" }}\n  notify {{ webhook = 42 }}\n}}\n"
        ),
        &[],
        &expect![[r#"
            kiln.hcl:3:20: error: webhook `https://hooks.example.com/x`: https is not supported yet
              |
            3 | notify { webhook = "https://hooks.example.com/x" }
              |                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
              = help: kiln has no TLS client yet; use an http:// URL, for example a relay on localhost

            kiln.hcl:4:1: error: missing required attribute `webhook` in notify block
              |
            4 | notify "x" {}
              | ^^^^^^^^^^

            kiln.hcl:4:8: error: `notify` block takes no labels
              |
            4 | notify "x" {}
              |        ^^^

            kiln.hcl:9:15: error: webhook `hooks.example.com` is not an http:// URL
              |
            9 |     webhook = "hooks.example.com"
              |               ^^^^^^^^^^^^^^^^^^^
              = help: write it as "http://host:port/path"

            kiln.hcl:10:5: error: unknown attribute `url` in notify block
               |
            10 |     url = "http://a"
               |     ^^^
              = help: expected one of `webhook`

            kiln.hcl:12:22: error: webhook `http://host:99999/` has a bad port `99999`
               |
            12 |   notify { webhook = "http://host:99999/" }
               |                      ^^^^^^^^^^^^^^^^^^^^
              = help: a port is a number from 1 to 65535

            kiln.hcl:13:22: error: expected a string, found number 42
               |
            13 |   notify { webhook = 42 }
               |                      ^^"#]],
    );
}

#[test]
fn preview_listen_is_a_socket_address() {
    let service = |rollout: &str| {
        format!(
            "{WEB}service \"web\" {{\n  image = image.web\n  port = 80\n  rollout {{\n{rollout}\n  }}\n}}\n"
        )
    };
    let config = load_ok(
        &service("    strategy = \"blue_green\"\n    preview_listen = \"127.0.0.1:0\""),
        &[],
    );
    assert_eq!(
        config.services["web"].rollout.preview_listen.as_deref(),
        Some("127.0.0.1:0")
    );
    let plain = load_ok(&service("    strategy = \"blue_green\""), &[]);
    assert_eq!(plain.services["web"].rollout.preview_listen, None);
    check(
        &service(
            "    strategy = \"canary\"\n    steps = [{ weight = 10 }]\n    preview_listen = \"localhost:8081\"",
        ),
        &[],
        &expect![[r#"
            kiln.hcl:9:22: error: expected an address such as "127.0.0.1:8081", found string "localhost:8081"
              |
            9 |     preview_listen = "localhost:8081"
              |                      ^^^^^^^^^^^^^^^^"#]],
    );
    check(
        &service("    preview_listen = 8081\n    preview_listn = \"x\""),
        &[],
        &expect![[r#"
            kiln.hcl:7:5: warning: `preview_listen` only applies to the blue_green and canary strategies and is ignored here
              |
            7 |     preview_listen = 8081
              |     ^^^^^^^^^^^^^^

            kiln.hcl:7:22: error: expected an address such as "127.0.0.1:8081", found number 8081
              |
            7 |     preview_listen = 8081
              |                      ^^^^

            kiln.hcl:8:5: error: unknown attribute `preview_listn` in rollout block
              |
            8 |     preview_listn = "x"
              |     ^^^^^^^^^^^^^
              = help: did you mean `preview_listen`?"#]],
    );
    check(
        &service("    preview_listen = \"[::1]:8081\""),
        &[],
        &expect![[r#"
            kiln.hcl:7:5: warning: `preview_listen` only applies to the blue_green and canary strategies and is ignored here
              |
            7 |     preview_listen = "[::1]:8081"
              |     ^^^^^^^^^^^^^^"#]],
    );
}

#[test]
fn the_drift_block_sets_continuous_drift_detection() {
    let config = load_ok(
        "project = \"p\"\ndrift {\n  interval = \"10s\"\n  auto_remediate = true\n  full_every = 3\n}\n",
        &[],
    );
    assert_eq!(config.drift.interval, Duration::from_secs(10));
    assert!(config.drift.auto_remediate);
    assert!(config.drift.watch, "watching is on unless turned off");
    assert_eq!(config.drift.full_every, 3);
    // Without the block: checks every 30 s, watching, never remediating on their own.
    let config = load_ok("project = \"p\"\n", &[]);
    assert_eq!(config.drift, crate::model::DriftSettings::default());
    check(
        "project = \"p\"\ndrift {\n  interval = 10\n  auto_remediat = true\n}\n",
        &[],
        &expect![[r#"
            kiln.hcl:3:14: error: expected a duration such as "30s", found number 10
              |
            3 |   interval = 10
              |              ^^

            kiln.hcl:4:3: error: unknown attribute `auto_remediat` in drift block
              |
            4 |   auto_remediat = true
              |   ^^^^^^^^^^^^^
              = help: did you mean `auto_remediate`?"#]],
    );
}

#[test]
fn environment_and_policy_blocks() {
    let config = load_ok(
        r#"project = "p"
environment {
  name      = "prod"
  protected = true
}
policy "team" {
  dir         = "rules"
  enforcement = "soft_mandatory"
}
policy "builtin" {
  enforcement   = "hard_mandatory"
  disable       = ["max_image_age"]
  max_image_age = "30d"
}
"#,
        &[],
    );
    assert_eq!(config.environment.name, "prod");
    assert!(config.environment.protected);
    assert_eq!(config.policies.len(), 1);
    assert_eq!(config.policies[0].dir, "rules");
    assert_eq!(
        config.policies[0].enforcement,
        crate::model::Enforcement::SoftMandatory
    );
    assert_eq!(
        config.builtin_policy.enforcement,
        Some(crate::model::Enforcement::HardMandatory)
    );
    assert_eq!(config.builtin_policy.disable, ["max_image_age"]);
    assert_eq!(
        config.builtin_policy.max_image_age,
        Duration::from_secs(30 * 24 * 3600)
    );
    check(
        "project = \"p\"\npolicy \"team\" {\n  enforcement = \"strict\"\n}\n",
        &[],
        &expect![[r#"
            kiln.hcl:3:17: error: expected "advisory", "soft_mandatory" or "hard_mandatory", found string "strict"
              |
            3 |   enforcement = "strict"
              |                 ^^^^^^^^"#]],
    );
}

const AWS_PROJECT: &str = r#"project = "shop"
target "aws" {
  region          = "eu-west-1"
  endpoint_url    = "http://127.0.0.1:5055"
  subnets         = ["subnet-0a1", "subnet-0b2"]
  security_groups = ["sg-0c3"]
  instance_type   = "t3.small"
  artifact_bucket = "shop-kiln-artifacts"
  tags            = { team = "storefront", cost = 42 }
  source_ami_filter {
    filters     = { name = "debian-12-amd64-*", "virtualization-type" = ["hvm"] }
    owners      = ["136693071363"]
    most_recent = true
  }
}
backend "s3" {
  bucket         = "shop-kiln-state"
  key            = "prod/kiln.json"
  region         = "eu-west-1"
  dynamodb_table = "kiln-locks"
}
image "web" {
  target = target.aws
}
service "web" {
  image  = image.web
  port   = 8080
  target = target.aws
}
"#;

#[test]
fn the_aws_target_and_the_s3_backend() {
    use crate::model::{Backend, SourceAmi, TargetKind};
    let config = load_ok(AWS_PROJECT, &[]);
    let aws = config.aws.as_ref().unwrap();
    assert_eq!(aws.region, "eu-west-1");
    assert_eq!(aws.endpoint_url.as_deref(), Some("http://127.0.0.1:5055"));
    assert_eq!(aws.subnets, ["subnet-0a1", "subnet-0b2"]);
    assert_eq!(aws.security_groups, ["sg-0c3"]);
    assert_eq!(aws.instance_type, "t3.small");
    assert_eq!(aws.tags["cost"], "42");
    let Some(SourceAmi::Filter {
        filters,
        owners,
        most_recent,
    }) = &aws.source_ami
    else {
        panic!("a filter was given: {:?}", aws.source_ami);
    };
    assert_eq!(filters["name"], ["debian-12-amd64-*"]);
    assert_eq!(filters["virtualization-type"], ["hvm"]);
    assert_eq!(owners, &["136693071363"]);
    assert!(most_recent);
    let Some(Backend::S3(s3)) = &config.backend else {
        panic!("an s3 backend was given");
    };
    assert_eq!(
        (
            s3.bucket.as_str(),
            s3.key.as_str(),
            s3.dynamodb_table.as_str()
        ),
        ("shop-kiln-state", "prod/kiln.json", "kiln-locks")
    );
    assert_eq!(config.services["web"].target, TargetKind::Aws);
    assert_eq!(config.images["web"].target, TargetKind::Aws);
    assert_eq!(config.target(), TargetKind::Aws);

    let local = load_ok(WEB, &[]);
    assert_eq!(local.target(), TargetKind::Local);
    assert!(local.aws.is_none() && local.backend.is_none());
}

#[test]
fn aws_target_values_are_checked_where_they_are_written() {
    check(
        r#"project = "p"
target "aws" {
  region          = "Ireland"
  subnets         = ["subnet-1", "sn-2"]
  security_groups = []
  instance_type   = "large"
  tags            = { "kiln:release" = "1" }
  source_ami      = "ami-0abc"
  source_ami_filter {
    filters = {}
    owners  = []
  }
}
"#,
        &[],
        &expect![[r#"
            kiln.hcl:3:21: error: expected a region such as "eu-west-1", found string "Ireland"
              |
            3 |   region          = "Ireland"
              |                     ^^^^^^^^^

            kiln.hcl:4:34: error: expected an id such as "subnet-0123abcd", found string "sn-2"
              |
            4 |   subnets         = ["subnet-1", "sn-2"]
              |                                  ^^^^^^

            kiln.hcl:5:21: error: expected at least one sg-… id
              |
            5 |   security_groups = []
              |                     ^^

            kiln.hcl:6:21: error: expected an instance type such as "t3.small", found string "large"
              |
            6 |   instance_type   = "large"
              |                     ^^^^^^^

            kiln.hcl:7:40: error: tag `kiln:release`: keys starting with `kiln:` or `aws:` are reserved
              |
            7 |   tags            = { "kiln:release" = "1" }
              |                                        ^^^

            kiln.hcl:8:3: error: set either `source_ami` or a `source_ami_filter` block, not both
              |
            8 |   source_ami      = "ami-0abc"
              |   ^^^^^^^^^^"#]],
    );
    check(
        r#"project = "p"
target "gcp" {}
target "aws" {
  region = "eu-west-1"
}
backend "postgres" {}
backend "s3" {
  bucket = "UPPER"
  key    = "/abs"
}
"#,
        &[],
        &expect![[r#"
            kiln.hcl:2:8: error: unknown target `gcp`; expected `aws`
              |
            2 | target "gcp" {}
              |        ^^^^^
              = help: the local runtime needs no block

            kiln.hcl:3:1: error: missing required attribute `subnets` in target "aws" block
              |
            3 | target "aws" {
              | ^^^^^^^^^^^^

            kiln.hcl:3:1: error: missing required attribute `security_groups` in target "aws" block
              |
            3 | target "aws" {
              | ^^^^^^^^^^^^

            kiln.hcl:3:1: error: missing required attribute `instance_type` in target "aws" block
              |
            3 | target "aws" {
              | ^^^^^^^^^^^^

            kiln.hcl:6:9: error: unknown backend `postgres`; expected `s3`
              |
            6 | backend "postgres" {}
              |         ^^^^^^^^^^
              = help: without a backend block the state is kept in SQLite under .kiln/

            kiln.hcl:7:1: error: only one `backend` block is allowed: the state lives in one place
              |
            7 | backend "s3" {
              | ^^^^^^^^^^^^"#]],
    );
}

#[test]
fn a_project_deploys_to_one_target_with_images_baked_for_it() {
    check(
        r#"project = "p"
image "web" {}
service "web" {
  image  = image.web
  port   = 80
  target = target.aws
}
service "api" {
  image  = image.web
  port   = 81
  target = target.awz
}
"#,
        &[],
        &expect![[r#"
            kiln.hcl:6:12: error: unknown target `aws`
              |
            6 |   target = target.aws
              |            ^^^^^^^^^^

            kiln.hcl:11:12: error: unknown target `awz`
               |
            11 |   target = target.awz
               |            ^^^^^^^^^^"#]],
    );
    check(
        r#"project = "p"
target "aws" {
  region          = "eu-west-1"
  subnets         = ["subnet-1"]
  security_groups = ["sg-1"]
  instance_type   = "t3.micro"
}
image "web" {}
image "api" { target = target.aws }
service "web" {
  image  = image.web
  port   = 80
  target = target.aws
}
service "api" {
  image  = image.api
  port   = 81
}
"#,
        &[],
        &expect![[r#"
            kiln.hcl:2:1: error: image `api` is baked on target.aws, which needs `artifact_bucket` (where image archives are uploaded for AMI builds)
              |
            2 | target "aws" {
              | ^^^^^^^^^^^^

            kiln.hcl:2:1: error: image `api` is baked on target.aws, which needs `source_ami` or a `source_ami_filter` block (the AMI builds start from)
              |
            2 | target "aws" {
              | ^^^^^^^^^^^^

            kiln.hcl:10:1: error: service `web` runs on target.aws but its image `web` is not baked for it
               |
            10 | service "web" {
               | ^^^^^^^^^^^^^
              = help: add `target = target.aws` to image `web`: `kiln bake` then also makes its AMI

            kiln.hcl:15:1: error: service `api` runs on the local runtime but service `web` on target.aws; a project deploys to one target
               |
            15 | service "api" {
               | ^^^^^^^^^^^^^
              = help: add `target = target.aws` to service `api`"#]],
    );
}

#[test]
fn the_aws_example_loads_with_its_variables_set() {
    use crate::model::{Backend, TargetKind};
    let source = Source {
        name: "examples/aws/kiln.hcl".into(),
        text: include_str!("../../../../examples/aws/kiln.hcl").into(),
    };
    let overrides = [
        flag("subnets", r#"["subnet-0a1", "subnet-0b2"]"#),
        flag("security_group", "sg-0c3"),
        flag("artifact_bucket", "acme-kiln-artifacts"),
        flag("state_bucket", "acme-kiln-state"),
    ];
    let (config, diags) = load(&source, &overrides);
    let rendered: Vec<String> = diags.iter().map(ToString::to_string).collect();
    assert!(diags.is_empty(), "{}", rendered.join("\n"));
    let config = config.unwrap();
    assert_eq!(config.target(), TargetKind::Aws);
    let aws = config.aws.as_ref().unwrap();
    // An empty endpoint_url is AWS itself.
    assert_eq!(aws.endpoint_url, None);
    assert_eq!(aws.subnets, ["subnet-0a1", "subnet-0b2"]);
    let Some(Backend::S3(s3)) = &config.backend else {
        panic!("the example keeps its state in S3");
    };
    assert_eq!(s3.bucket, "acme-kiln-state");
    // Without the variables it says which are missing.
    let (config, diags) = load(&source, &[]);
    assert!(config.is_none());
    let missing: Vec<&str> = diags
        .iter()
        .filter(|d| d.message.contains("has no value"))
        .map(|d| d.message.as_str())
        .collect();
    assert_eq!(missing.len(), 4, "{diags:?}");
}
