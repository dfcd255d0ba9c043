# health_required: every service the plan changes has a health check; without one kiln counts
# an instance healthy as soon as it started, so a rollout cannot tell a broken release.
package kiln.builtin

deny_health_required contains msg if {
	enabled("health_required")
	some name in changed
	object.get(input.services[name], "health", null) == null
	msg := sprintf("service.%s: has no health check", [name])
}
