#!/usr/bin/env bash
# Benchmarks of progressive delivery on the local runtime: the real binary, its server in the
# background, real sandboxed instances (bubblewrap + busybox httpd, a CGI app) behind kiln's
# proxy, load from kiln-load.
#
#   bench/progressive.sh [WORKDIR]      (needs bubblewrap, a static busybox, python3, jq)
#
# 1. 100 blue/green switches under `kiln-load -c 8`: `auto_promote = true`,
#    `scale_down_delay = "100ms"`; each `kiln apply` makes a new release, which comes up at full
#    size beside the old one, takes every request in one switch, and then the old one is drained
#    and stopped. Failed requests (goal 0), `kiln apply` wall time.
# 2. 100 warm rollbacks under `kiln-load -c 8`: `scale_down_delay = "5m"`; each cycle applies a
#    new release (blue/green, auto_promote), waits until it takes every request, then runs
#    `kiln rollback web --to vOLD --auto-approve` while the old release is still warm. Failed
#    requests (goal 0).
# 3. Warm rollback time, for each rollback of 2.: from the start of the `kiln rollback` command
#    to the moment every new request is served by the old release (goal < 100 ms), seen by a
#    probe that sends one request after the other on a keep-alive connection and records the
#    `X-Kiln-Release` of each with the time it was sent.
# 4. A bad canary (answers 500 to ~20 % of requests; steps 20 % / 50 %, analysis every 500 ms,
#    max_error_rate 5 %, min_requests 20), 10 times under `kiln-load -c 8`: requests it served
#    before analysis aborted it, and how many of them failed.
#
# Everything listens on 127.0.0.1 and every command is bounded by `timeout`. On exit (also on an
# error or Ctrl-C) every project is brought down with `kiln down --auto-approve`; any process of
# kiln's still running for WORKDIR afterwards is reported and killed by its pid.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/kiln-progressive-bench.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
for tool in bwrap python3 jq; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install bubblewrap python3 jq)" >&2; exit 1; }
done
busybox=$(for b in /bin/busybox /usr/bin/busybox; do [ -x "$b" ] && echo "$b" && break; done)
[ -n "$busybox" ] || { echo "needs a static busybox (apt-get install busybox-static)" >&2; exit 1; }
# Sizes, for a quick try: SWITCHES=10 ROLLBACKS=10 CANARIES=3 bench/progressive.sh
switches=${SWITCHES:-100}
rollbacks=${ROLLBACKS:-100}
canaries=${CANARIES:-10}

cargo build --release --locked -p kiln -p kiln-load --manifest-path "$repo/Cargo.toml" >&2
target=${CARGO_TARGET_DIR:-$repo/target}/release
kiln=$target/kiln
load=$target/kiln-load

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(. /etc/os-release && echo "$PRETTY_NAME"), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "kiln: $("$kiln" --version) ($(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet HEAD -- crates 2>/dev/null || echo ', with uncommitted changes')); $(bwrap --version); $("$busybox" | head -1 | cut -d' ' -f1-3)"
echo "workdir: $work"

# ---------------------------------------------------------------------------------------------
# Projects, and bringing them down for sure.

switch=$work/switch
rollback=$work/rollback
canary=$work/canary
load_pid=

# make_project DIR ROLLOUT: busybox httpd with a static /index.html and /healthz, and the CGI
# /cgi-bin/app of crates/kiln/tests/progressive.rs (500 to about one request in five when FLAKY
# is set); 2 instances, health every 100 ms, min_healthy_time 200ms; ROLLOUT is the body of the
# service's rollout block.
make_project() {
  local dir=$1
  rm -rf "$dir"
  mkdir -p "$dir/rootfs/bin" "$dir/rootfs/etc" "$dir/site/cgi-bin"
  cp "$busybox" "$dir/rootfs/bin/busybox"
  for app in sh echo cat; do ln -s busybox "$dir/rootfs/bin/$app"; done
  echo 'root:x:0:0:root:/root:/bin/sh' > "$dir/rootfs/etc/passwd"
  echo ok > "$dir/site/healthz"
  echo '<h1>shop</h1>' > "$dir/site/index.html"
  cat > "$dir/site/cgi-bin/app" <<'SH'
#!/bin/sh
if [ -n "$FLAKY" ] && [ $((RANDOM % 5)) -eq 0 ]; then
  echo 'Status: 500 Internal Server Error'
  echo 'Content-Type: text/plain'
  echo
  echo "flaky $KILN_RELEASE"
  exit 0
fi
echo 'Content-Type: text/plain'
echo
echo "$GREETING $KILN_RELEASE"
SH
  chmod 755 "$dir/site/cgi-bin/app"
  cat > "$dir/kiln.hcl" <<HCL
project = "shop"

variable "greeting" { default = "hello" }
variable "flaky" { default = "" }

image "web" {
  base = "dir:./rootfs"
  provisioner "file" {
    source      = "site"
    destination = "/www"
  }
  entrypoint = ["/bin/sh", "-c", "exec httpd -f -p \"\$PORT\" -h /www"]
}

service "web" {
  image     = image.web
  instances = 2
  port      = 8080
  env       = { GREETING = var.greeting, FLAKY = var.flaky }
  health {
    path              = "/healthz"
    interval          = "100ms"
    timeout           = "500ms"
    healthy_threshold = 1
  }
  rollout {
    min_healthy_time = "200ms"
    healthy_deadline = "10s"
$2
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

# The pids of kiln's processes for the project in DIR: its server and its sandboxes.
leftovers() {
  local dir=$1 p cmd
  for p in /proc/[0-9]*; do
    cmd=$({ tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null) || continue
    case $cmd in
      *bwrap\ *"$dir/.kiln/"* | *kiln\ --config\ "$dir/kiln.hcl"\ *server*) echo "${p#/proc/}" ;;
    esac
  done
}

# bring_down DIR: `kiln down --auto-approve`, then make sure nothing of the project runs.
bring_down() {
  local dir=$1 pids i
  [ -f "$dir/kiln.hcl" ] || return 0
  if [ -S "$dir/.kiln/kiln.sock" ]; then
    timeout 120 "$kiln" -c "$dir/kiln.hcl" down --auto-approve >/dev/null \
      || echo "  ! kiln down failed for $dir" >&2
  fi
  for i in $(seq 1 50); do
    [ -z "$(leftovers "$dir")" ] && return 0
    sleep 0.1
  done
  pids=$(leftovers "$dir")
  echo "  ! after kiln down, $(echo $pids | wc -w) processes of $(basename "$dir") still run; killing them by pid"
  kill -KILL $pids 2>/dev/null || true
}

stop_load() {
  if [ -n "$load_pid" ]; then
    kill -TERM "$load_pid" 2>/dev/null || true
    wait "$load_pid" 2>/dev/null || true   # kiln-load exits 1 when a request failed
    load_pid=
  fi
}

cleanup() {
  local code=$?
  set +e
  trap - EXIT INT TERM
  stop_load
  bring_down "$switch"
  bring_down "$rollback"
  bring_down "$canary"
  local bw sv
  bw=$(pgrep -a bwrap | grep -c -- "$work/") || true
  sv=$(pgrep -af "kiln.*server" | grep -c -- "$work/") || true
  echo "after cleanup: pgrep -a bwrap: $bw of $(pgrep -c bwrap) in $work; pgrep -af \"kiln.*server\": $sv of $(pgrep -cf "kiln.*server") in $work"
  [ "$bw" -eq 0 ] && [ "$sv" -eq 0 ] || { echo "processes of kiln's remain" >&2; code=1; }
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bring_down "$switch"
bring_down "$rollback"
bring_down "$canary"

# up DIR: `kiln up`, prints the balancer's base URL.
up() {
  timeout 120 "$kiln" -c "$1/kiln.hcl" up > "$1/up.out" 2> "$1/up.err"
  awk '/^public: /{print $2}' "$1/up.out"
}

# ---------------------------------------------------------------------------------------------
echo
echo "== 1. $switches blue/green switches under load (kiln-load -c 8 on /index.html; goal 0 failed)"
make_project "$switch" '    strategy         = "blue_green"
    auto_promote     = true
    scale_down_delay = "100ms"'
url=$(up "$switch")
echo "  up: $url"
timeout 1200 "$load" "${url}index.html" -c 8 -d 1100 > "$work/switch-load.json" &
load_pid=$!
sleep 1
: > "$work/switch-applies.txt"
for i in $(seq 1 "$switches"); do
  t0=$(date +%s%N)
  rc=0
  timeout 120 "$kiln" -c "$switch/kiln.hcl" apply --auto-approve -var "greeting=switch-$i" \
    > /dev/null 2>> "$switch/apply.log" || rc=$?
  t1=$(date +%s%N)
  echo "$i $(( (t1 - t0) / 1000000 )) $rc" >> "$work/switch-applies.txt"
done
sleep 1
stop_load
timeout 30 "$kiln" -c "$switch/kiln.hcl" status --json > "$work/switch-status.json"
timeout 30 "$kiln" -c "$switch/kiln.hcl" releases web --json > "$work/switch-releases.json"
python3 - "$work/switch-load.json" "$work/switch-applies.txt" "$work/switch-status.json" "$work/switch-releases.json" <<'PY'
import json, statistics, sys
load = json.load(open(sys.argv[1]))
applies = [l.split() for l in open(sys.argv[2])]
times = [int(t) for _, t, _ in applies]
bad = [i for i, _, rc in applies if rc != "0"]
status = json.load(open(sys.argv[3]))["services"][0]
releases = json.load(open(sys.argv[4]))
served = [k for k, v in load["releases"].items() if v > 0]
print(f"  requests {load['requests']:,}, failed {load['failed']}, statuses {load['statuses']}, "
      f"p50 {load['p50_us']/1000:.2f} ms, p99 {load['p99_us']/1000:.2f} ms")
if load["failures"]:
    print(f"  first failures: {load['failures']}")
print(f"  {len(served)} releases served requests (of {len(releases)})")
print(f"  kiln apply wall time: median {statistics.median(times)} ms (min {min(times)}, max {max(times)}, n={len(times)}); "
      f"failed applies: {bad or 'none'}")
print(f"  after: stable v{status['stable']}, traffic {status['traffic']}, "
      f"{len(status['instances'])} instances of {sorted({i['release'] for i in status['instances']})}")
PY
bring_down "$switch"

# ---------------------------------------------------------------------------------------------
echo
echo "== 2+3. $rollbacks warm rollbacks under load (kiln-load -c 8 on /index.html; goal 0 failed), and the time each takes (goal < 100 ms)"
make_project "$rollback" '    strategy         = "blue_green"
    auto_promote     = true
    scale_down_delay = "5m"'
url=$(up "$rollback")
echo "  up: $url"
timeout 1200 "$load" "${url}index.html" -c 8 -d 1100 > "$work/rollback-load.json" &
load_pid=$!
sleep 1
# Drives the cycles: apply a new release (detached), wait until it takes every request, then
# `kiln rollback` with a probe running; wait until the rollout is over before the next cycle.
# One line per rollback: cycle, the released and the restored release, the time until every
# new request was served by the restored release, the time `kiln rollback` took, its exit code,
# requests the probe sent during the measurement.
rc=0
timeout 1500 python3 - "$kiln" "$rollback/kiln.hcl" "${url}index.html" "$rollbacks" \
  > "$work/rollbacks.txt" 2> "$work/rollbacks.err" <<'PY' || rc=$?
import http.client, json, subprocess, sys, threading, time
kiln, config, url, cycles = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
host, path = url[len("http://"):].split("/", 1)
path = "/" + path

def k(*args, timeout=60):
    return subprocess.run([kiln, "-c", config, *args], capture_output=True, text=True, timeout=timeout)

def service():
    r = k("status", "--json")
    return json.loads(r.stdout)["services"][0]

def wait(cond, what, limit=60):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        s = service()
        if cond(s):
            return s
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}: {s}")

def only(s, release):
    return {int(k): v for k, v in s["traffic"].items()} == {release: 100.0}

class Probe(threading.Thread):
    """One request after the other on one keep-alive connection: (monotonic send time, release,
    monotonic time the response was read)."""
    def __init__(self):
        super().__init__(daemon=True)
        self.seen, self.stop = [], False
    def run(self):
        conn = http.client.HTTPConnection(host, timeout=5)
        while not self.stop:
            t = time.monotonic()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                rel = resp.getheader("X-Kiln-Release", "-") if resp.status < 500 else f"status {resp.status}"
            except (OSError, http.client.HTTPException) as e:
                rel = f"error {e}"
                conn.close()
                conn = http.client.HTTPConnection(host, timeout=5)
            self.seen.append((t, rel, time.monotonic()))

for cycle in range(1, cycles + 1):
    s = wait(lambda s: s["rollout"] is None, "no rollout")
    old = s["stable"]
    r = k("apply", "--auto-approve", "--detach", "-var", f"greeting=cycle-{cycle}")
    if r.returncode != 0:
        raise SystemExit(f"apply failed: {r.stderr}")
    new = wait(lambda s: s["stable"] not in (None, old) and only(s, s["stable"]) and s["rollout"] is not None,
               "the promotion")["stable"]
    probe = Probe()
    probe.start()
    time.sleep(0.2)  # the probe sees the new release first
    t0 = time.monotonic()
    # `--to`: explicit (before commit c5912ce, a plain `kiln rollback` picked the release
    # rolled back in the cycle before instead of the warm one; see docs/BENCHMARKS.md).
    r = k("rollback", "web", "--to", f"v{old}", "--auto-approve")
    t_cli = time.monotonic() - t0
    if r.returncode != 0:
        probe.stop = True
        print(f"BLOCKED {r.stderr.strip()}", file=sys.stderr)
        raise SystemExit(3)
    wait(lambda s: only(s, old), "traffic back on the old release", 30)
    time.sleep(0.5)  # every request for 500 ms more: nothing goes to the new release again
    probe.stop = True
    probe.join()
    after = [s for s in probe.seen if s[0] >= t0]
    before = [rel for t, rel, _ in probe.seen if t < t0]
    # The first request of the final run of responses from the old release.
    last_other = max((i for i, (_, rel, _) in enumerate(after) if rel != f"v{old}"), default=-1)
    if last_other + 1 >= len(after):
        raise SystemExit(f"the probe never saw v{old} for good: {after[-5:]}")
    switched = after[last_other + 1][0] - t0
    # The last request still served by the new release: when it was sent and answered (the
    # probe's resolution: the switch happened after it was sent).
    last_new = after[last_other] if last_other >= 0 else (t0, "-", t0)
    odd = sorted({rel for rel in before + [rel for _, rel, _ in after]} - {f"v{old}", f"v{new}"})
    print(f"{cycle} v{new} v{old} {switched*1000:.1f} {t_cli*1000:.1f} {r.returncode} {len(after)} {'|'.join(odd) or '-'} "
          f"{(last_new[0] - t0)*1000:.1f} {(last_new[2] - t0)*1000:.1f}", flush=True)
PY
stop_load
if [ "$rc" -eq 3 ]; then
  echo "  BLOCKED: \`kiln rollback\` failed: $(cat "$work/rollbacks.err")"
  echo "  (the load during the attempt: $(jq -c '{requests, failed}' "$work/rollback-load.json"))"
elif [ "$rc" -ne 0 ]; then
  echo "  ! the rollback driver failed (exit $rc): $(tail -3 "$work/rollbacks.err")"
fi
if [ -s "$work/rollbacks.txt" ]; then
  python3 - "$work/rollback-load.json" "$work/rollbacks.txt" <<'PY'
import json, statistics, sys
load = json.load(open(sys.argv[1]))
rows = [l.split() for l in open(sys.argv[2])]
sw = sorted(float(r[3]) for r in rows)
cli = sorted(float(r[4]) for r in rows)
p95 = lambda xs: xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
odd = sorted({r[7] for r in rows} - {"-"})
print(f"  requests {load['requests']:,}, failed {load['failed']}, statuses {load['statuses']}, "
      f"p50 {load['p50_us']/1000:.2f} ms, p99 {load['p99_us']/1000:.2f} ms; {len(rows)} rollbacks")
if load["failures"]:
    print(f"  first failures: {load['failures']}")
print(f"  warm rollback, command start to every new request on the old release: median {statistics.median(sw):.1f} ms, "
      f"p95 {p95(sw):.1f} ms, min {sw[0]:.1f}, max {sw[-1]:.1f} (n={len(sw)})")
print(f"  the `kiln rollback` command itself: median {statistics.median(cli):.1f} ms, p95 {p95(cli):.1f} ms")
print(f"  probe saw anything but the two releases: {odd or 'no'}")
for r in rows:
    if float(r[3]) >= 100:
        print(f"  over 100 ms: rollback {r[0]} ({r[1]} -> {r[2]}): {r[3]} ms; the last request served by {r[1]} "
              f"was sent at {r[8]} ms and answered at {r[9]} ms; the command took {r[4]} ms")
PY
fi
bring_down "$rollback"

# ---------------------------------------------------------------------------------------------
echo
echo "== 4. a bad canary (500 to ~20 % of requests), $canaries times under load (kiln-load -c 8 on /cgi-bin/app)"
make_project "$canary" '    strategy         = "canary"
    steps            = [{ weight = 20, pause = "60s" }, { weight = 50, pause = "60s" }]
    scale_down_delay = "300ms"
    analysis {
      interval           = "500ms"
      max_error_rate     = 0.05
      min_requests       = 20
      inconclusive_limit = 100
    }'
url=$(up "$canary")
echo "  up: $url"
: > "$work/canaries.txt"
for i in $(seq 1 "$canaries"); do
  timeout 120 "$load" "${url}cgi-bin/app" -c 8 -d 100 > "$work/canary-load-$i.json" &
  load_pid=$!
  sleep 1
  t0=$(date +%s%N)
  rc=0
  timeout 120 "$kiln" -c "$canary/kiln.hcl" apply --auto-approve -var flaky=1 -var "greeting=bad-$i" \
    > /dev/null 2> "$canary/apply-$i.log" || rc=$?
  t1=$(date +%s%N)
  sleep 1
  stop_load
  echo "$i $(( (t1 - t0) / 1000000 )) $rc" >> "$work/canaries.txt"
  timeout 60 "$kiln" -c "$canary/kiln.hcl" status --json > "$work/canary-status-$i.json"
done
python3 - "$work" "$canaries" <<'PY'
import json, re, statistics, sys
w, n = sys.argv[1], int(sys.argv[2])
med = statistics.median
rows = []
for i in range(1, n + 1):
    load = json.load(open(f"{w}/canary-load-{i}.json"))
    _, ms, rc = open(f"{w}/canaries.txt").read().split("\n")[i - 1].split()
    log = open(f"{w}/canary/apply-{i}.log").read()
    status = json.load(open(f"{w}/canary-status-{i}.json"))["services"][0]
    bad = [k for k in load["releases"] if k != "v1"]
    ok_canary = sum(load["releases"][k] for k in bad)
    served = ok_canary + load["failed"]
    m = re.search(r"analysis: fail: error rate ([\d.]+)% above 5% \((\d+) requests, (\d+) errors", log)
    verdicts = len(re.findall(r"analysis: ", log))
    rows.append(dict(requests=load["requests"], failed=load["failed"], served=served, ms=int(ms), rc=rc,
                     window=int(m.group(2)) if m else -1, rate=float(m.group(1)) if m else -1,
                     verdicts=verdicts, step2="step 2 of 2" in log, back=status["traffic"] == {"1": 100.0}
                     or {int(k): v for k, v in status["traffic"].items()} == {1: 100.0}))
    r = rows[-1]
    print(f"  run {i}: canary served {served} requests ({r['failed']} failed) of {r['requests']:,}; "
          f"{verdicts} verdict(s), the failing window: {r['window']} requests, {r['rate']}% errors; "
          f"apply {ms} ms, exit {rc}; reached step 2: {r['step2']}; traffic back on v1: {r['back']}")
print(f"  median: canary served {med(r['served'] for r in rows)} requests, {med(r['failed'] for r in rows)} failed "
      f"(min–max {min(r['failed'] for r in rows)}–{max(r['failed'] for r in rows)}); "
      f"failed / all requests {100 * sum(r['failed'] for r in rows) / sum(r['requests'] for r in rows):.2f} %; "
      f"kiln apply {med(r['ms'] for r in rows)} ms")
PY
bring_down "$canary"
