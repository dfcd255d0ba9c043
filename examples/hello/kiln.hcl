# A small web site served by busybox httpd, baked into a reproducible image.
# Run ./make-rootfs.sh once to build the busybox base, then `kiln bake`.

project = "hello"

variable "greeting" {
  default = "hello from kiln"
}

variable "replicas" {
  default = 2
}

image "base" {
  base   = "dir:./rootfs"
  labels = { "org.opencontainers.image.title" = "busybox base" }
}

image "web" {
  base = image.base

  provisioner "file" {
    source      = "site"
    destination = "/var/www"
  }

  provisioner "shell" {
    inline = [
      "echo 'baked by kiln' > /var/www/about.txt",
      "mkdir -p /var/log",
    ]
  }

  # The local runtime sets PORT; the shell expands it when the instance starts.
  entrypoint = ["/bin/sh", "-c", "exec httpd -f -p \"$PORT\" -h /var/www"]
  ports      = [8080]
  labels     = { version = "1.0.0" }
}

service "web" {
  image     = image.web
  instances = var.replicas
  port      = 8080
  env       = { GREETING = var.greeting }   # a change here makes a new release

  health {
    path     = "/healthz"
    interval = "1s"
  }

  rollout {
    strategy         = "rolling"
    max_parallel     = 1
    min_healthy_time = "2s"
  }
}

balancer "public" {
  listen = "127.0.0.1:8080"
  route {
    path_prefix = "/"
    service     = service.web
  }
}
