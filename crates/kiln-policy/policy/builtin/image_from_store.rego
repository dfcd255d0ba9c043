# image_from_store: every image a service starts from is in kiln's store, and its digest was
# verified against its content.
package kiln.builtin

deny_image_from_store contains msg if {
	enabled("image_from_store")
	some name in launching
	not service_image[name]
	msg := sprintf("service.%s: %s is not in kiln's image store", [name, image_ref(name)])
}

deny_image_from_store contains msg if {
	enabled("image_from_store")
	some name in launching
	image := service_image[name]
	object.get(image, "in_store", false) != true
	msg := sprintf("service.%s: %s is not in kiln's image store", [name, image_ref(name)])
}

deny_image_from_store contains msg if {
	enabled("image_from_store")
	some name in launching
	image := service_image[name]
	image.in_store == true
	object.get(image, "verified", false) != true
	msg := sprintf("service.%s: %s has a digest that was not verified against its content", [name, image_ref(name)])
}
