# image_labels: a released image says what it is: a `version` label and the git commit it was
# built from (the label `org.opencontainers.image.revision` or kiln's git record); in a
# protected environment its tree must not have been dirty. An empty value counts as missing.
package kiln.builtin

deny_image_labels contains msg if {
	enabled("image_labels")
	some name in released
	image := service_image[name]
	object.get(image, ["labels", "version"], "") == ""
	msg := sprintf("service.%s: %s has no version label", [name, image_ref(name)])
}

deny_image_labels contains msg if {
	enabled("image_labels")
	some name in released
	image := service_image[name]
	object.get(image, ["labels", "org.opencontainers.image.revision"], "") == ""
	object.get(image, ["git", "commit"], "") == ""
	msg := sprintf("service.%s: %s has no git commit (label org.opencontainers.image.revision or a git record)", [name, image_ref(name)])
}

deny_image_labels contains msg if {
	enabled("image_labels")
	protected
	some name in released
	service_image[name].git.dirty == true
	msg := sprintf("service.%s: %s was built from a dirty git tree, which the protected environment %s refuses", [name, image_ref(name), environment_name])
}
