# A small web site served by busybox httpd, baked into a reproducible image.
# Run ./make-rootfs.sh once to build the busybox base, then `kiln bake`.

project = "hello"

variable "greeting" {
  default = "hello from kiln"
}

variable "replicas" {
  default = 2
}

variable "strategy" {
  default     = "canary"
  description = "how a new release rolls out: canary, blue_green or rolling"
}

variable "fail_percent" {
  default     = 0
  description = "the share of /cgi-bin/version requests answered with 500, to try a bad release"
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
  # A change of either makes a new release.
  env = {
    GREETING     = var.greeting
    FAIL_PERCENT = "${var.fail_percent}"
  }

  health {
    path     = "/healthz"
    interval = "1s"
  }

  rollout {
    strategy = var.strategy

    # canary: 20 % of requests for 10 s, then 50 % for 10 s, then everything, each step passed
    # only on a passing verdict.
    steps = [{ weight = 20, pause = "10s" }, { weight = 50, pause = "10s" }]

    # blue_green: the new release serves only preview requests (header `X-Kiln-Preview: 1`,
    # cookie `kiln-preview=1`, or this listener) until `kiln rollout promote`.
    preview_listen = "127.0.0.1:8081"
    auto_promote   = false

    # rolling: one instance at a time.
    max_parallel = 1

    min_healthy_time = "2s"
    scale_down_delay = "2m" # the old release stays warm this long: a rollback is instant

    analysis {
      interval       = "2s"
      max_error_rate = 0.05 # more than 5 % of requests answered 5xx fails the release
      min_requests   = 20   # a window with fewer is inconclusive, never a pass
    }
  }
}

balancer "public" {
  listen = "127.0.0.1:8080"
  route {
    path_prefix = "/"
    service     = service.web
  }
}
