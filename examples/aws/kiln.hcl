# The hello site on AWS: an AMI baked from the kiln image, one Auto Scaling group per release
# behind an application load balancer, canary releases, the state shared in S3.
# See README.md; every setting is in docs/config.md and docs/aws.md.

project = "hello-aws"

variable "region" {
  default = "eu-west-1"
}

variable "endpoint_url" {
  default     = ""
  description = "an AWS emulator such as moto (http://127.0.0.1:5055); empty for AWS itself"
}

variable "subnets" {
  type        = "list"
  description = "two subnets in two zones (an ALB needs them), e.g. [\"subnet-0a1…\", \"subnet-0b2…\"]"
}

variable "security_group" {
  description = "lets the ALB reach instances on 8080 and the world reach the ALB on 80"
}

variable "artifact_bucket" {
  description = "where kiln uploads image archives for AMI builds"
}

variable "state_bucket" {
  description = "a versioned bucket for the team's state"
}

variable "lock_table" {
  default     = "kiln-locks"
  description = "a DynamoDB table with the string partition key LockID"
}

variable "greeting" {
  default = "hello from kiln on AWS"
}

target "aws" {
  region               = var.region
  endpoint_url         = var.endpoint_url
  subnets              = var.subnets
  security_groups      = [var.security_group]
  instance_type        = "t3.micro"
  iam_instance_profile = "kiln-app"
  artifact_bucket      = var.artifact_bucket
  tags                 = { example = "hello-aws" }

  source_ami_filter {
    filters     = { name = "al2023-ami-2023.*-x86_64", "virtualization-type" = "hvm" }
    owners      = ["amazon"]
    most_recent = true
  }
}

backend "s3" {
  bucket         = var.state_bucket
  key            = "hello-aws/kiln.json"
  region         = var.region
  dynamodb_table = var.lock_table
  endpoint_url   = var.endpoint_url
}

image "web" {
  target = target.aws
  base   = "dir:../hello/rootfs"

  provisioner "file" {
    source      = "site"
    destination = "/var/www"
  }

  entrypoint = ["/bin/sh", "-c", "exec httpd -f -p \"$PORT\" -h /var/www"]
  ports      = [8080]
  labels     = { version = "1.0.0" }
}

service "web" {
  target    = target.aws
  image     = image.web
  instances = 2
  port      = 8080
  env       = { GREETING = var.greeting }

  health {
    path     = "/healthz"
    interval = "10s"
  }

  rollout {
    # On AWS kiln reads no request metrics yet: canary steps are timed, or promoted by hand.
    strategy         = "canary"
    steps            = [{ weight = 10, pause = "5m" }, { weight = 50, pause = "5m" }]
    min_healthy_time = "30s"
    scale_down_delay = "30m"
  }
}

balancer "public" {
  listen = "0.0.0.0:80"
  route {
    path_prefix = "/"
    service     = service.web
  }
}
