# max_image_age: a new release does not ship an image older than
# `data.kiln.settings.max_image_age_days` (default 90): old images miss the fixes of their
# base. Scale-ups and drift replacements of what already runs are not held up by it.
package kiln.builtin

deny_max_image_age contains msg if {
	enabled("max_image_age")
	some name in released
	image := service_image[name]
	image.age_seconds > max_image_age_days * 86400
	days := floor(image.age_seconds / 86400)
	msg := sprintf("service.%s: %s is %d days old (limit %d days); rebuild it", [name, image_ref(name), days, max_image_age_days])
}
