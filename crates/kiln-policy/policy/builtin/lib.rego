# Shared helpers of kiln's built-in checks. Every check lives in its own file, has one id
# (the suffix of its rules: `deny_<id>`, `warn_<id>`), and is skipped when its id is in
# `data.kiln.settings.disabled`.
package kiln.builtin

# Settings, passed by kiln as `data.kiln.settings`; every one has a default, so the pack also
# runs without them (as in its tests).

default max_image_age_days := 90

max_image_age_days := data.kiln.settings.max_image_age_days

disabled(id) if data.kiln.settings.disabled[_] == id

enabled(id) if not disabled(id)

protected if input.kiln.environment.protected == true

environment_name := object.get(input.kiln, ["environment", "name"], "this environment")

# Which services a plan touches. `changed`: created, replaced or updated, or with an instance
# replaced because of drift. `launching`: the plan starts instances of them (a new release, a
# scale-up, a drift replacement). `released`: they get a new release (created or replaced).
# `replaced`: a new release replaces a stable one (a rollout in the proper sense).

changed contains rc.name if {
	some rc in input.resource_changes
	rc.type == "kiln_service"
	rc.change.actions in [["create"], ["create", "delete"], ["update"]]
}

changed contains name if some name in drift_replaced

launching contains name if some name in released

launching contains rc.name if {
	some rc in input.resource_changes
	rc.type == "kiln_service"
	rc.change.actions == ["update"]
	rc.change.after.instances > rc.change.before.instances
}

launching contains name if some name in drift_replaced

released contains rc.name if {
	some rc in input.resource_changes
	rc.type == "kiln_service"
	rc.change.actions in [["create"], ["create", "delete"]]
}

replaced contains rc.name if {
	some rc in input.resource_changes
	rc.type == "kiln_service"
	rc.change.actions == ["create", "delete"]
}

# A drift remediation replaces instances: `service.NAME.instance["ID"]`.
drift_replaced contains name if {
	some rc in input.resource_changes
	rc.type == "kiln_instance"
	rc.change.actions == ["create", "delete"]
	startswith(rc.address, "service.")
	rest := substring(rc.address, count("service."), -1)
	i := indexof(rest, ".instance[")
	i > 0
	name := substring(rest, 0, i)
}

# kiln's record of the image each service runs, by service name; a service whose image kiln
# has no record of has no entry. (An object rule rather than a function: regorus computes it
# once per evaluation, not once per call.)
service_image[name] := image if {
	some name, s in input.services
	image := input.kiln.images[s.image_digest]
}

# `sha256:1a2b3c4d5e6f`: a digest as people read it.
short(digest) := substring(digest, 0, 19)

# `image web (sha256:1a2b3c4d5e6f)`.
image_ref(name) := sprintf("image %s (%s)", [input.services[name].image, short(input.services[name].image_digest)])
