# capacity: a new release of a service with more than one instance must not leave it with less
# capacity than it had.
#
# kiln's rolling update is create-before-destroy and never retires an old instance before a
# ready new one took its place, and blue/green brings the new release up at full size, so
# neither drops routed capacity. A canary does: its steps send a share of *requests* to
# `canary_instances` instances (weights are request shares, not instance counts), so a step
# whose weight is larger than the canary's share of the instances loads each canary instance
# more than a stable one ever was (10 instances, 1 canary, a 50 % step: one instance takes the
# load of five). That is denied: `weight × instances > 100 × canary_instances`.
#
# A rolling update with `max_parallel` ≥ `instances` keeps capacity but replaces the whole
# service at once (every request on brand-new instances within one health period, and twice
# the instances running meanwhile): a warning.
package kiln.builtin

canary_size(s) := n if {
	c := object.get(s.rollout, "canary_instances", null)
	c != null
	n := min([max([c, 1]), s.instances])
}

canary_size(s) := s.instances if object.get(s.rollout, "canary_instances", null) == null

deny_capacity contains msg if {
	enabled("capacity")
	some name in replaced
	s := input.services[name]
	s.instances > 1
	s.rollout.strategy == "canary"
	canary := canary_size(s)
	some i, step in s.rollout.steps
	step.weight * s.instances > 100 * canary
	needed := ceil((step.weight * s.instances) / 100)
	msg := sprintf("service.%s: canary step %d sends %d%% of requests to %d of %d instances; raise canary_instances to at least %d or lower the weight", [name, i + 1, step.weight, canary, s.instances, needed])
}

warn_capacity contains msg if {
	enabled("capacity")
	some name in replaced
	s := input.services[name]
	s.instances > 1
	s.rollout.strategy == "rolling"
	s.rollout.max_parallel >= s.instances
	msg := sprintf("service.%s: max_parallel %d replaces all %d instances at once; lower it to roll out in batches", [name, s.rollout.max_parallel, s.instances])
}
