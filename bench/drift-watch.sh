#!/usr/bin/env bash
# Detection latency of continuous drift detection: the real binary, its server in the
# background, 2 sandboxed instances (bubblewrap + busybox httpd) of an image whose root holds
# FILES extra files (default 10,000 of 5 KiB: 50 MB) beside the site.
#
#   bench/drift-watch.sh [WORKDIR]     (needs bubblewrap, a static busybox, python3)
#
# The project's `drift` block sets `interval = "1h"`, so only the inotify watcher can find a
# change in time. ROUNDS times (default 20): one file of the image root is rewritten on the host
# (alternately a small site file and one of the extra files), and `kiln status --json` is polled
# every 20 ms until the change shows among the service's findings: that is the detection
# latency (goal < 5 s). The file is then restored and the poll waits until the findings are
# empty again (the time to see the root clean, also reported). Medians, min and max.
#
# On exit (also on an error or Ctrl-C) the project is brought down with `kiln down`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/kiln-drift-watch.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
for tool in bwrap python3; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install bubblewrap python3)" >&2; exit 1; }
done
busybox=$(for b in /bin/busybox /usr/bin/busybox; do [ -x "$b" ] && echo "$b" && break; done)
[ -n "$busybox" ] || { echo "needs a static busybox (apt-get install busybox-static)" >&2; exit 1; }
files=${FILES:-10000}
rounds=${ROUNDS:-20}

cargo build --release --locked -p kiln --manifest-path "$repo/Cargo.toml" >&2
kiln=${CARGO_TARGET_DIR:-$repo/target}/release/kiln

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(. /etc/os-release && echo "$PRETTY_NAME"), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "kiln: $("$kiln" --version) ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')); $(bwrap --version)"
echo "workdir: $work; $files extra files in the image root; $rounds rounds"

dir=$work/project
rm -rf "$dir"
mkdir -p "$dir/rootfs/bin" "$dir/rootfs/etc" "$dir/site/data"
cp "$busybox" "$dir/rootfs/bin/busybox"
for app in sh httpd; do ln -s busybox "$dir/rootfs/bin/$app"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$dir/rootfs/etc/passwd"
echo ok > "$dir/site/healthz"
echo '<h1>shop</h1>' > "$dir/site/index.html"
python3 - "$dir/site/data" "$files" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
for i in range(n):
    sub = os.path.join(root, f"d{i // 500:03d}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"f{i:05d}.bin"), "wb") as f:
        f.write(rng.randbytes(5120))
PY
cat > "$dir/kiln.hcl" <<'HCL'
project = "watch"

image "web" {
  base = "dir:./rootfs"
  provisioner "file" {
    source      = "site"
    destination = "/www"
  }
  entrypoint = ["/bin/sh", "-c", "exec httpd -f -p \"$PORT\" -h /www"]
}

service "web" {
  image     = image.web
  instances = 2
  port      = 8080
  health {
    path     = "/healthz"
    interval = "500ms"
  }
  rollout {
    min_healthy_time = "500ms"
  }
}

balancer "public" {
  listen = "127.0.0.1:0"
  route {
    path_prefix = "/"
    service     = service.web
  }
}

drift {
  interval = "1h"
}
HCL

finish() {
  (cd "$dir" && timeout 60 "$kiln" down --auto-approve >/dev/null 2>&1) || true
}
trap finish EXIT

cd "$dir"
timeout 300 "$kiln" up >/dev/null 2>&1
root=$(find .kiln/rootfs -mindepth 1 -maxdepth 1 -type d ! -name '.*' | head -1)
echo "image root: $root ($(find "$root" -type f | wc -l) files, $(du -sh "$root" | cut -f1))"
# The first check builds the manifest and hashes everything; the watcher then has a baseline.
timeout 120 "$kiln" drift --detailed-exitcode >/dev/null

python3 - "$kiln" "$root" "$rounds" <<'PY'
import json, os, statistics, subprocess, sys, time
kiln, root, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])

def findings():
    out = subprocess.run([kiln, "status", "--json"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["services"][0].get("drift", [])

def wait(pred, limit=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if pred(findings()):
            return time.monotonic()
        time.sleep(0.02)
    raise SystemExit("timed out")

found, clean = [], []
for i in range(rounds):
    rel = "www/index.html" if i % 2 == 0 else f"www/data/d{i % 20:03d}/f{(i % 20) * 500:05d}.bin"
    path = os.path.join(root, rel)
    original = open(path, "rb").read()
    t0 = time.monotonic()
    with open(path, "wb") as f:
        f.write(original[:-1] + b"!")
    t1 = wait(lambda fs: any(f.get("subject") == "/" + rel for f in fs))
    found.append((t1 - t0) * 1000)
    t2 = time.monotonic()
    with open(path, "wb") as f:
        f.write(original)
    t3 = wait(lambda fs: not fs)
    clean.append((t3 - t2) * 1000)

def show(name, xs):
    print(f"{name}: median {statistics.median(xs):.0f} ms, min {min(xs):.0f} ms, max {max(xs):.0f} ms (n={len(xs)})")
show("edit -> reported by kiln status", found)
show("restore -> reported clean", clean)
print("all within 5 s:", all(x < 5000 for x in found))
PY
