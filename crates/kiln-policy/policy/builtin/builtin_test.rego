# Tests of the built-in pack, run by `run_tests` (and by `opa test policy/builtin`).
package kiln.builtin_test

# Rules of kiln.builtin are named in full (`data.kiln.builtin.deny_…`), not through
# `import data.kiln.builtin`: regorus 0.14.1 resolves a package reached through an import
# alias module by module, and a rule there that uses a helper of a later file comes out empty.

digest := "sha256:1a2b3c4d5e6f0000000000000000000000000000000000000000000000000000"

image := {
	"name": "web", "digest": digest, "in_store": true, "verified": true,
	"labels": {"version": "1.0.0"}, "git": {"commit": "abc123", "dirty": false},
	"age_seconds": 86400, "ancestry": [], "revoked": null,
	"entrypoint": ["/bin/app"], "cmd": [], "exposed_ports": [8080],
}

service := {
	"name": "web", "image": "web", "image_digest": digest, "instances": 3, "port": 8080,
	"env": {}, "health": {"path": "/healthz"},
	"rollout": {"strategy": "canary", "steps": [{"weight": 10}], "analysis": {"interval": "10s"}, "max_parallel": 1, "canary_instances": null},
}

plan(spec, img, protected) := {
	"resource_changes": [{
		"address": "service.web", "type": "kiln_service", "name": "web",
		"change": {"actions": ["create", "delete"], "before": spec, "after": spec},
	}],
	"services": {"web": spec},
	"kiln": {"environment": {"name": "prod", "protected": protected}, "images": {digest: img}},
}

test_a_good_release_passes if {
	count(data.kiln.builtin.deny_health_required) == 0 with input as plan(service, image, true)
	count(data.kiln.builtin.deny_image_labels) == 0 with input as plan(service, image, true)
	count(data.kiln.builtin.deny_protected_progressive) == 0 with input as plan(service, image, true)
}

test_no_health_check_is_denied if {
	no_health := object.union(service, {"health": null})
	data.kiln.builtin.deny_health_required == {"service.web: has no health check"} with input as plan(no_health, image, false)
}

test_a_disabled_check_is_silent if {
	no_health := object.union(service, {"health": null})
	count(data.kiln.builtin.deny_health_required) == 0 with input as plan(no_health, image, false)
		with data.kiln.settings as {"disabled": ["health_required"]}
}

test_rolling_is_denied_only_when_protected if {
	rolling := object.union(service, {"rollout": {"strategy": "rolling", "steps": [], "analysis": null, "max_parallel": 1}})
	count(data.kiln.builtin.deny_protected_progressive) == 1 with input as plan(rolling, image, true)
	count(data.kiln.builtin.deny_protected_progressive) == 0 with input as plan(rolling, image, false)
}

test_the_age_limit_is_a_setting if {
	old := object.union(image, {"age_seconds": 100 * 86400})
	count(data.kiln.builtin.deny_max_image_age) == 1 with input as plan(service, old, false)
	count(data.kiln.builtin.deny_max_image_age) == 0 with input as plan(service, old, false)
		with data.kiln.settings as {"max_image_age_days": 120}
}
