# no_ssh: nothing listens on or exposes port 22, and no image starts an ssh daemon
# (`sshd`, `dropbear`). Immutable instances are replaced, never logged into.
package kiln.builtin

ssh_ports := {22, "22", "22/tcp", "22/udp"}

ssh_daemons := ["sshd", "dropbear"]

deny_no_ssh contains msg if {
	enabled("no_ssh")
	some name in changed
	input.services[name].port in ssh_ports
	msg := sprintf("service.%s: listens on port 22 (ssh)", [name])
}

deny_no_ssh contains msg if {
	enabled("no_ssh")
	some name in changed
	some port in service_image[name].exposed_ports
	port in ssh_ports
	msg := sprintf("service.%s: %s exposes port 22 (ssh)", [name, image_ref(name)])
}

deny_no_ssh contains msg if {
	enabled("no_ssh")
	some name in changed
	image := service_image[name]
	some field in ["entrypoint", "cmd"]
	some arg in object.get(image, field, [])
	some daemon in ssh_daemons
	contains(lower(arg), daemon)
	msg := sprintf("service.%s: %s runs an ssh daemon (%s: %s)", [name, image_ref(name), field, arg])
}

deny_no_ssh contains msg if {
	enabled("no_ssh")
	some rc in input.resource_changes
	rc.type == "kiln_balancer"
	rc.change.actions in [["create"], ["update"]]
	endswith(rc.change.after.listen, ":22")
	msg := sprintf("balancer.%s: listens on port 22 (%s)", [rc.name, rc.change.after.listen])
}
