#!/usr/bin/env bash
# Benchmarks of deploying on the local runtime: the real binary, its server in the background,
# real sandboxed instances (bubblewrap + busybox httpd) behind kiln's proxy, load from kiln-load.
#
#   bench/deploy.sh [WORKDIR]      (needs bubblewrap, a static busybox, python3, jq)
#
# 1. 20 consecutive rolling deploys of a 3-instance service (max_parallel 1, health every 100 ms,
#    min_healthy_time 300ms) while kiln-load keeps 8 connections busy: failed requests (goal 0),
#    requests per release, p50/p99, wall time of each `kiln apply` (it waits for its rollout).
# 2. 100 instances from nothing to routable: `kiln apply` on an empty state (the server starts,
#    the image is already baked; the bake is timed on its own), 3 runs. Side by side, the floor:
#    the same 100 bubblewrap sandboxes started by a script that polls /healthz every 100 ms.
# 3. VmRSS of `kiln server` with those 100 instances, idle and after 60 s of load (goal < 50 MiB),
#    and the instances' own RSS (bwrap ×2 + httpd each) for context.
# 4. `kiln_core::plan::plan` for 1,000 services × 10 instances (goal < 1 s): the example
#    crates/kiln-core/examples/plan_bench.rs.
#
# Everything listens on 127.0.0.1 and every command is bounded by `timeout`. On exit (also on an
# error or Ctrl-C) every project is brought down with `kiln down --auto-approve`; any process of
# kiln's still running for WORKDIR afterwards is reported and killed by its pid.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/kiln-deploy-bench.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
for tool in bwrap python3 jq; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install bubblewrap python3 jq)" >&2; exit 1; }
done
busybox=$(for b in /bin/busybox /usr/bin/busybox; do [ -x "$b" ] && echo "$b" && break; done)
[ -n "$busybox" ] || { echo "needs a static busybox (apt-get install busybox-static)" >&2; exit 1; }

cargo build --release --locked -p kiln -p kiln-load --manifest-path "$repo/Cargo.toml" >&2
cargo build --release --locked -p kiln-core --example plan_bench --manifest-path "$repo/Cargo.toml" >&2
target=${CARGO_TARGET_DIR:-$repo/target}/release
kiln=$target/kiln
load=$target/kiln-load

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(. /etc/os-release && echo "$PRETTY_NAME"), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "kiln: $("$kiln" --version); $(bwrap --version); $("$busybox" | head -1 | cut -d' ' -f1-3)"
echo "workdir: $work"

# ---------------------------------------------------------------------------------------------
# Projects, and bringing them down for sure.

rolling=$work/rolling
hundred=$work/hundred
load_pid=

# make_project DIR INSTANCES MAX_PARALLEL MIN_HEALTHY_TIME HEALTHY_DEADLINE: the project of
# crates/kiln/tests/deploy.rs (busybox httpd, health every 100 ms) with these settings.
make_project() {
  local dir=$1
  rm -rf "$dir"
  mkdir -p "$dir/rootfs/bin" "$dir/rootfs/etc" "$dir/site/cgi-bin"
  cp "$busybox" "$dir/rootfs/bin/busybox"
  for app in sh echo cat mkdir rm ls chmod touch; do ln -s busybox "$dir/rootfs/bin/$app"; done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$dir/rootfs/etc/passwd"
  echo ok > "$dir/site/healthz"
  echo '<h1>shop</h1>' > "$dir/site/index.html"
  printf '#!/bin/sh\necho "Content-Type: text/plain"\necho\necho "$GREETING $KILN_RELEASE $KILN_INSTANCE_ID"\n' \
    > "$dir/site/cgi-bin/version"
  chmod 755 "$dir/site/cgi-bin/version"
  sed -e "s/@INSTANCES@/$2/" -e "s/@MAX_PARALLEL@/$3/" -e "s/@MIN_HEALTHY@/$4/" -e "s/@DEADLINE@/$5/" \
    > "$dir/kiln.hcl" <<'HCL'
project = "shop"

variable "greeting" { default = "hello" }

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
  instances = @INSTANCES@
  port      = 8080
  env       = { GREETING = var.greeting }
  health {
    path              = "/healthz"
    interval          = "100ms"
    timeout           = "500ms"
    healthy_threshold = 1
  }
  rollout {
    strategy         = "rolling"
    max_parallel     = @MAX_PARALLEL@
    min_healthy_time = "@MIN_HEALTHY@"
    healthy_deadline = "@DEADLINE@"
  }
}

balancer "public" {
  listen = "127.0.0.1:0"
  route {
    path_prefix = "/"
    service     = service.web
  }
}
HCL
}

# The pids of kiln's processes for the project in DIR: its server and its sandboxes (an
# instance's httpd dies with the bwrap that is pid 1 of its namespace).
leftovers() {
  local dir=$1 p cmd
  for p in /proc/[0-9]*; do
    cmd=$({ tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null) || continue
    case $cmd in
      *bwrap\ *"$dir/.kiln/"* | *kiln\ --config\ "$dir/kiln.hcl"\ *server*) echo "${p#/proc/}" ;;
    esac
  done
}

# bring_down DIR: `kiln down --auto-approve`, then make sure nothing of the project runs. What
# kiln left behind is counted (in $work/leftovers.txt) and killed by pid.
bring_down() {
  local dir=$1 pids n t0 t1 i
  [ -f "$dir/kiln.hcl" ] || return 0
  if [ -S "$dir/.kiln/kiln.sock" ]; then
    t0=$(date +%s%N)
    timeout 120 "$kiln" -c "$dir/kiln.hcl" down --auto-approve >/dev/null \
      || echo "  ! kiln down failed for $dir" >&2
    t1=$(date +%s%N)
    echo "  kiln down ($(basename "$dir")): $(( (t1 - t0) / 1000000 )) ms"
    sleep 1
  fi
  pids=$(leftovers "$dir")
  n=$(echo $pids | wc -w)
  if [ "$n" -gt 0 ]; then
    echo "$(basename "$dir") $n" >> "$work/leftovers.txt"
    echo "  ! after kiln down, $n processes of $(basename "$dir") still run (kiln bug, see BENCHMARKS.md); killing them by pid"
    kill -KILL $pids 2>/dev/null || true
    for i in $(seq 1 100); do
      [ -z "$(leftovers "$dir")" ] && break
      sleep 0.1
    done
  fi
}

cleanup() {
  local code=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$load_pid" ]; then
    kill -TERM "$load_pid" 2>/dev/null
    wait "$load_pid" 2>/dev/null
  fi
  bring_down "$rolling"
  bring_down "$hundred"
  local bw sv
  bw=$(pgrep -a bwrap | grep -c -- "$work/") || true
  sv=$(pgrep -af "kiln.*server" | grep -c -- "$work/") || true
  echo "after cleanup: pgrep -a bwrap: $bw of $(pgrep -c bwrap) in $work; pgrep -af \"kiln.*server\": $sv of $(pgrep -cf "kiln.*server") in $work"
  [ "$bw" -eq 0 ] && [ "$sv" -eq 0 ] || { echo "processes of kiln's remain" >&2; code=1; }
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A project left by an earlier run in the same WORKDIR.
bring_down "$rolling"
bring_down "$hundred"
rm -f "$work/leftovers.txt"

# ---------------------------------------------------------------------------------------------
echo
echo "== 4. plan of 1,000 services x 10 instances (goal < 1 s)"
timeout 300 "$target/examples/plan_bench" 20 | tee "$work/plan.txt"

# ---------------------------------------------------------------------------------------------
echo
echo "== 1. 20 rolling deploys of 3 instances under load (kiln-load -c 8; goal 0 failed)"
make_project "$rolling" 3 1 300ms 3s
kr() { timeout 120 "$kiln" -c "$rolling/kiln.hcl" "$@"; }
kr up > "$rolling/up.out" 2> "$rolling/up.err"
url=$(awk '/^public: /{print $2}' "$rolling/up.out")
echo "  up: $url"
# Long enough for 20 deploys; stopped with SIGTERM as soon as they are done.
timeout 400 "$load" "$url" -c 8 -d 300 > "$work/rolling-load.json" &
load_pid=$!
sleep 1
: > "$work/rolling-deploys.txt"
for i in $(seq 1 20); do
  t0=$(date +%s%N)
  rc=0
  kr apply --auto-approve -var "greeting=deploy-$i" > /dev/null 2>> "$rolling/apply.log" || rc=$?
  t1=$(date +%s%N)
  echo "$i $(( (t1 - t0) / 1000000 )) $rc" >> "$work/rolling-deploys.txt"
done
sleep 1
kill -TERM "$load_pid"
wait "$load_pid" || true   # kiln-load exits 1 when a request failed; the JSON says which
load_pid=
kr status --json > "$work/rolling-status.json"
echo "  state.db after: $(du -cb "$rolling/.kiln/state.db"* | tail -1 | cut -f1) bytes, serial $(jq .serial "$work/rolling-status.json")"
python3 - "$work/rolling-load.json" "$work/rolling-deploys.txt" "$work/rolling-status.json" <<'PY'
import json, statistics, sys
load = json.load(open(sys.argv[1]))
deploys = [line.split() for line in open(sys.argv[2])]
times = [int(t) for _, t, _ in deploys]
bad = [i for i, _, rc in deploys if rc != "0"]
status = json.load(open(sys.argv[3]))
inst = status["services"][0]["instances"]
rel = sorted(load["releases"].items(), key=lambda kv: int(kv[0].lstrip("v") or 0))
print(f"  requests {load['requests']}, failed {load['failed']}, statuses {load['statuses']}, "
      f"p50 {load['p50_us']/1000:.2f} ms, p99 {load['p99_us']/1000:.2f} ms")
if load["failures"]:
    print(f"  first failures: {load['failures']}")
print("  per release: " + ", ".join(f"{k} {v}" for k, v in rel))
print(f"  kiln apply wall time: median {statistics.median(times)} ms (min {min(times)}, max {max(times)}, n={len(times)}); "
      f"failed applies: {bad or 'none'}")
print(f"  after: {len(inst)} instances, releases {sorted({i['release'] for i in inst})}, "
      f"{sum(i['routable'] for i in inst)} routable")
PY
bring_down "$rolling"

# ---------------------------------------------------------------------------------------------
echo
echo "== 2. 100 instances from an empty state to routable (max_parallel 100, min_healthy_time 0s), 3 runs"
make_project "$hundred" 100 100 0s 60s
kh() { timeout 300 "$kiln" -c "$hundred/kiln.hcl" "$@"; }
t0=$(date +%s%N); kh bake > /dev/null 2>&1; t1=$(date +%s%N)
echo "  bake (not counted): cold $(( (t1 - t0) / 1000000 )) ms"
: > "$work/launch.txt"
for run in 1 2 3; do
  bring_down "$hundred"
  # An empty state; the store and the unpacked root filesystem stay.
  rm -rf "$hundred/.kiln/state.db" "$hundred/.kiln/state.db-wal" "$hundred/.kiln/state.db-shm" "$hundred/.kiln/run"
  t0=$(date +%s%N); kh bake > /dev/null 2>&1; t1=$(date +%s%N)
  bake_ms=$(( (t1 - t0) / 1000000 ))
  # Starts `kiln apply`, polls `kiln status --json` every 100 ms until 100 instances are
  # routable, and waits for apply to return (it follows the rollout).
  timeout 300 python3 - "$kiln" "$hundred/kiln.hcl" 100 "$bake_ms" >> "$work/launch.txt" <<'PY'
import json, os, subprocess, sys, threading, time
kiln, config, want, bake_ms = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
log = open(config.rsplit("/", 1)[0] + "/apply.log", "a")
t0 = time.monotonic()
apply = subprocess.Popen([kiln, "-c", config, "apply", "--auto-approve"],
                         stdout=subprocess.DEVNULL, stderr=log)
done, sandboxes = {}, {}
threading.Thread(target=lambda: done.update(rc=apply.wait(), t=time.monotonic() - t0),
                 daemon=True).start()
def count_sandboxes():
    # When the last of the instances' sandboxes (outer bwrap) appeared, sampled every 50 ms.
    needle = config.rsplit("/", 1)[0].encode() + b"/.kiln/"
    while "t" not in done:
        n = 0
        for p in os.listdir("/proc"):
            try:
                if p.isdigit():
                    c = open(f"/proc/{p}/cmdline", "rb").read()
                    n += c.startswith(b"/usr/bin/bwrap") and needle in c
            except OSError:
                pass
        if n // 2 >= want and "t" not in sandboxes:
            sandboxes["t"] = time.monotonic() - t0
        time.sleep(0.05)
threading.Thread(target=count_sandboxes, daemon=True).start()
routable_at, polls = None, 0
while time.monotonic() - t0 < 240 and (routable_at is None or "t" not in done):
    if routable_at is None:
        polls += 1
        r = subprocess.run([kiln, "-c", config, "status", "--json"], capture_output=True, timeout=30)
        try:
            s = json.loads(r.stdout)
            n = sum(1 for svc in s["services"] for i in svc["instances"] if i["routable"])
        except (ValueError, KeyError):
            n = 0
        if n >= want:
            routable_at = time.monotonic() - t0
    time.sleep(0.1)
apply.wait(timeout=30)
print(f"{done['t']*1000:.0f} {routable_at*1000 if routable_at else -1:.0f} {done['rc']} {bake_ms} {polls} "
      f"{sandboxes.get('t', -1)*1000:.0f}")
PY
  read -r apply_ms routable_ms rc bake_ms polls sandboxes_ms < <(tail -1 "$work/launch.txt")
  echo "  run $run: kiln apply ${apply_ms} ms (exit $rc), 100 routable in status after ${routable_ms} ms, the 100th sandbox started after ${sandboxes_ms} ms; bake ${bake_ms} ms (cached, not counted)"
  echo "    state after: serial $(kh status --json | jq .serial), state.db $(du -cb "$hundred/.kiln/state.db"* | tail -1 | cut -f1) bytes"
done

# ---------------------------------------------------------------------------------------------
echo
echo "== 3. kiln server RSS with 100 instances (goal < 50 MiB)"
server_pid=$(cat "$hundred/.kiln/server.pid")
# rss.py PID: the server's VmRSS/VmHWM/threads, and the RSS of its descendants (the instances).
cat > "$work/rss.py" <<'PY'
import os, sys
pid = int(sys.argv[1])
def status(p):
    out = {}
    for line in open(f"/proc/{p}/status"):
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out
def kib(v):
    return int(v.split()[0]) if v else 0
children = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p))
desc, todo = [], [pid]
while todo:
    for c in children.get(todo.pop(), []):
        desc.append(c)
        todo.append(c)
total = pss = 0
for p in desc:
    try:
        total += kib(status(p).get("VmRSS", ""))
        for line in open(f"/proc/{p}/smaps_rollup"):
            if line.startswith("Pss:"):
                pss += kib(line.split(":")[1].strip())
    except OSError:
        pass
s = status(pid)
print(f"{kib(s['VmRSS'])} {kib(s['VmHWM'])} {s['Threads']} {len(desc)} {total} {pss}")
PY
read -r rss hwm threads nproc_inst inst_rss inst_pss < <(python3 "$work/rss.py" "$server_pid")
echo "  100 instances serving, idle: server VmRSS $((rss / 1024)) MiB ($rss KiB), VmHWM $((hwm / 1024)) MiB, $threads threads; instances: $nproc_inst processes, $((inst_rss / 1024)) MiB RSS in all ($((inst_pss / 1024)) MiB PSS)"
url=$(kh status --json | jq -r '"http://" + .balancers[0].bound + "/"')
timeout 120 "$load" "$url" -c 8 -d 60 > "$work/hundred-load.json" || true
read -r rss2 hwm2 threads2 nproc_inst2 inst_rss2 inst_pss2 < <(python3 "$work/rss.py" "$server_pid")
echo "  after 60 s of kiln-load -c 8: server VmRSS $((rss2 / 1024)) MiB ($rss2 KiB), VmHWM $((hwm2 / 1024)) MiB, $threads2 threads; instances: $nproc_inst2 processes, $((inst_rss2 / 1024)) MiB RSS in all ($((inst_pss2 / 1024)) MiB PSS)"
jq -c '{requests, failed, p50_us, p99_us}' "$work/hundred-load.json" | sed 's/^/  load: /'
echo "$rss $hwm $threads $nproc_inst $inst_rss $rss2 $hwm2 $threads2 $nproc_inst2 $inst_rss2 $inst_pss $inst_pss2" > "$work/rss.txt"
# The argv of one instance's sandbox, for the baseline below.
leader=$(for p in $(leftovers "$hundred"); do
  [ "$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null)" = "$server_pid" ] && echo "$p" && break
done)
python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1],"rb").read().decode().split("\0")[:-1]))' \
  "/proc/$leader/cmdline" > "$work/bwrap-argv.json"
bring_down "$hundred"

# ---------------------------------------------------------------------------------------------
echo
echo "== 2b. baseline: the same 100 bubblewrap sandboxes started by a script, polled every 100 ms"
: > "$work/baseline.txt"
for run in 1 2 3; do
  timeout 120 python3 - "$work/bwrap-argv.json" 100 >> "$work/baseline.txt" <<'PY'
import json, os, signal, socket, subprocess, sys, time
argv, want = json.load(open(sys.argv[1])), int(sys.argv[2])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # so that `finally` cleans up
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
def with_env(args, name, value):
    args = list(args)
    i = next(i for i in range(len(args) - 2) if args[i] == "--setenv" and args[i + 1] == name)
    args[i + 2] = value
    return args
def healthy(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            return s.recv(64).split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]
    except OSError:
        return False
procs = []
try:
    t0 = time.monotonic()
    pending = {}
    for i in range(want):
        port = free_port()
        args = with_env(with_env(argv, "PORT", str(port)), "KILN_INSTANCE_ID", f"baseline-{i}")
        procs.append(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        pending[port] = i
    started = time.monotonic() - t0
    while pending and time.monotonic() - t0 < 60:
        for port in [p for p in pending if healthy(p)]:
            del pending[port]
        if pending:
            time.sleep(0.1)
    print(f"{(time.monotonic() - t0) * 1000:.0f} {started * 1000:.0f} {want - len(pending)}")
finally:
    # The outer bwrap and, below it, the inner one that is pid 1 of the sandbox.
    pids = {p.pid for p in procs}
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) in pids:
                os.kill(int(p), signal.SIGKILL)
        except OSError:
            pass
    for p in procs:
        p.kill()
        p.wait()
PY
  read -r all_ms spawn_ms ok < <(tail -1 "$work/baseline.txt")
  echo "  run $run: $ok of 100 answer /healthz after $all_ms ms (all spawned after $spawn_ms ms)"
  sleep 1
done

# ---------------------------------------------------------------------------------------------
echo
echo "== summary"
python3 - "$work" <<'PY'
import json, os, re, statistics, sys
w = sys.argv[1]
med = statistics.median
load = json.load(open(f"{w}/rolling-load.json"))
times = [int(l.split()[1]) for l in open(f"{w}/rolling-deploys.txt")]
print("20 rolling deploys under load:")
print(f"  | requests | failed | requests per release, v2…v20 (min–max) | p50 | p99 | `kiln apply` median (min–max) |")
rel = {k: v for k, v in load["releases"].items()}
mid = [v for k, v in rel.items() if k not in ("v1", "v21")]
print(f"  | {load['requests']:,} | **{load['failed']}** | {min(mid or [0]):,}–{max(mid or [0]):,} "
      f"(v1 {rel.get('v1', 0):,}, v21 {rel.get('v21', 0):,}) | {load['p50_us']/1000:.2f} ms | "
      f"{load['p99_us']/1000:.2f} ms | {med(times)/1000:.2f} s ({min(times)/1000:.2f}–{max(times)/1000:.2f}) |")
runs = [l.split() for l in open(f"{w}/launch.txt")]
base = [l.split() for l in open(f"{w}/baseline.txt")]
a = [int(r[0]) for r in runs]
s = [int(r[1]) for r in runs]
b = [int(r[0]) for r in base]
print("100 instances to routable (n=3):")
l = [int(r[5]) for r in runs]
print(f"  | `kiln apply` median | status shows 100 routable, median | 100th sandbox started, median | baseline (script + bwrap) median | kiln/baseline |")
print(f"  | {med(a)/1000:.2f} s ({', '.join(f'{x/1000:.2f}' for x in a)}) | {med(s)/1000:.2f} s ({', '.join(f'{x/1000:.2f}' for x in s)}) "
      f"| {med(l)/1000:.2f} s ({', '.join(f'{x/1000:.2f}' for x in l)}) "
      f"| {med(b)/1000:.2f} s ({', '.join(f'{x/1000:.2f}' for x in b)}) | {med(s)/med(b):.1f}x |")
r = [int(x) for x in open(f"{w}/rss.txt").read().split()]
print("kiln server RSS with 100 instances (goal < 50 MiB):")
print(f"  | idle VmRSS | after 60 s of load VmRSS | VmHWM | threads | instances: processes, RSS sum, PSS sum (idle → after load) |")
print(f"  | {r[0]/1024:.1f} MiB | {r[5]/1024:.1f} MiB | {r[6]/1024:.1f} MiB | {r[2]} | {r[3]} → {r[8]}, {r[4]/1024:.0f} → {r[9]/1024:.0f} MiB, {r[10]/1024:.0f} → {r[11]/1024:.0f} MiB |")
plan = open(f"{w}/plan.txt").read()
m = re.search(r"slowest plan\(\) median: ([\d.]+) ms", plan)
print(f"plan of 1,000 services x 10 instances: slowest median {m.group(1) if m else '?'} ms (goal < 1000 ms)")
if os.path.exists(f"{w}/leftovers.txt"):
    left = open(f"{w}/leftovers.txt").read().split("\n")
    print(f"kiln down left processes running: {[l for l in left if l]} (project, count)")
else:
    print("kiln down left no process running")
PY
