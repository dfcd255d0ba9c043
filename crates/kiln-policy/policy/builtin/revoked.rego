# revoked: no instance starts from a revoked image, or from one built on a revoked image.
# kiln marks `revoked` on an image and on each of its descendants; both that mark and the
# image's `ancestry` are checked, so a record that missed the mark is still caught.
package kiln.builtin

deny_revoked contains msg if {
	enabled("revoked")
	some name in launching
	image := service_image[name]
	image.revoked != null
	msg := sprintf("service.%s: %s is revoked: %s", [name, image_ref(name), object.get(image.revoked, "reason", "no reason given")])
}

deny_revoked contains msg if {
	enabled("revoked")
	some name in launching
	image := service_image[name]
	object.get(image, "revoked", null) == null
	some parent in object.get(image, "ancestry", [])
	revocation := input.kiln.images[parent].revoked
	revocation != null
	msg := sprintf("service.%s: %s is built on the revoked image %s: %s", [name, image_ref(name), short(parent), object.get(revocation, "reason", "no reason given")])
}
