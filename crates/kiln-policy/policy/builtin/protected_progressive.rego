# protected_progressive: in a protected environment a new release (a new service or a
# replacement) rolls out as `canary` or `blue_green` with an `analysis` block, so that its
# metrics, not only its health checks, decide whether it takes every request. (A service's
# first release has no stable one to compare with and rolls out like a rolling update, but
# its config already has to say how its next releases roll out.)
package kiln.builtin

progressive := {"canary", "blue_green"}

deny_protected_progressive contains msg if {
	enabled("protected_progressive")
	protected
	some name in released
	s := input.services[name]
	not s.rollout.strategy in progressive
	msg := sprintf("service.%s: a new release in the protected environment %s must roll out as canary or blue_green (strategy is %s)", [name, environment_name, s.rollout.strategy])
}

deny_protected_progressive contains msg if {
	enabled("protected_progressive")
	protected
	some name in released
	s := input.services[name]
	s.rollout.strategy in progressive
	object.get(s.rollout, "analysis", null) == null
	msg := sprintf("service.%s: a %s release in the protected environment %s needs an analysis block", [name, s.rollout.strategy, environment_name])
}
