#!/usr/bin/env bash
# The tour of README.md, run for real: a canary that promotes, a canary that aborts on its own,
# a blue/green release checked through its preview route and promoted, and a rollback, all
# while kiln-load sends requests through kiln's proxy the whole time. At the end it prints what
# the load saw: how many requests, how many failed, and which releases served them.
#
#   ./tour.sh            (after ../../scripts/setup.sh; uses the kiln and kiln-load it built)
#
# Set KILN and KILN_LOAD to use other binaries. The project is brought down at the end, also on
# an error or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")"
target=${CARGO_TARGET_DIR:-../../target}/release
kiln=${KILN:-$target/kiln}
load=${KILN_LOAD:-$target/kiln-load}
for bin in "$kiln" "$load"; do
  [ -x "$bin" ] || { echo "$bin not found: run scripts/setup.sh first, or set KILN and KILN_LOAD" >&2; exit 1; }
done
url=http://127.0.0.1:8080

# Shows a command as a user would type it, then runs it.
run() {
  printf '\n$ kiln %s\n' "$*"
  "$kiln" "$@"
}
# Shows a shell command, then runs it.
show() {
  printf '\n$ %s\n' "$1"
  eval "$1"
}
# Waits until the rollout of web is in STAGE: `preview` (blue/green, waiting for promotion),
# `passed` (a verdict passed) or `promoted`.
wait_for() {
  for _ in $(seq 600); do
    "$kiln" rollout status web --json 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin) or {}
want = sys.argv[1]
ok = {
    "preview": (r.get("stage") or "").startswith("preview"),
    "passed": any(line.startswith("analysis: pass") for line in r.get("log", [])),
    "promoted": r.get("promoted", False),
}[want]
sys.exit(0 if ok else 1)' "$1" && return 0
    sleep 0.1
  done
  echo "the rollout of web never reached '$1'" >&2
  return 1
}

load_pid=
preview_pid=
finish() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  [ -n "$preview_pid" ] && kill "$preview_pid" 2>/dev/null || true
  "$kiln" down --auto-approve >/dev/null 2>&1 || true
}
trap finish EXIT

[ -d rootfs ] || ./make-rootfs.sh
"$kiln" bake >/dev/null 2>&1
echo "== v1: the first release goes straight in"
run up

echo
echo "== load: 4 clients asking /cgi-bin/version through the proxy until the end of the tour"
"$load" "$url/cgi-bin/version" --concurrency 4 --duration 3600 >.kiln/tour-load.json &
load_pid=$!

echo
echo "== v2: a canary that promotes (20 % of requests, then 50 %, then all, each step on a passing verdict)"
run apply -var greeting=bonjour --auto-approve

echo
echo "== v3: a bad canary, answering 500 to 20 % of its requests: analysis aborts it on its own"
run apply -var greeting=bonjour -var fail_percent=20 --auto-approve || true
run releases web

echo
echo "== v4: blue/green, checked through the preview route before anyone else sees it"
run apply -var greeting=hallo -var strategy=blue_green --auto-approve --detach
wait_for preview
show "curl -s $url/cgi-bin/version"
show "curl -s -H 'X-Kiln-Preview: 1' $url/cgi-bin/version"
show "curl -s http://127.0.0.1:8081/cgi-bin/version"
echo
echo "# a smoke test on the preview listener gives the pre-promotion analysis requests to judge"
printf '$ kiln-load http://127.0.0.1:8081/cgi-bin/version --concurrency 2 &\n'
"$load" http://127.0.0.1:8081/cgi-bin/version --concurrency 2 --duration 3600 >.kiln/tour-preview.json &
preview_pid=$!
wait_for passed
kill -TERM "$preview_pid"
wait "$preview_pid" || true
preview_pid=
run rollout status web
run rollout promote web --auto-approve
wait_for promoted
show "curl -s $url/cgi-bin/version"

echo
echo "== rollback: v2 is still warm, so only traffic moves"
run rollback web --auto-approve
show "curl -s $url/cgi-bin/version"
echo
echo "# v1 stopped long ago: going back to it launches its image again from the store (digest"
echo "# verified), checks it healthy, then switches every request to it, as a new release v5"
run rollback web --to v1 --auto-approve
show "curl -s $url/cgi-bin/version"
run releases web
run status

echo
echo "== what the load saw"
kill -TERM "$load_pid"
wait "$load_pid" || true
load_pid=
python3 - .kiln/tour-load.json .kiln/tour-preview.json <<'PY'
import json, sys
p = json.load(open(sys.argv[2]))
print(f"preview smoke test: {p['requests']} requests, {p['failed']} failed, served by {p['releases']}")
s = json.load(open(sys.argv[1]))
print(f"{s['requests']} requests, {s['failed']} failed; by status: {s['statuses']}")
print("answered 2xx by: " + ", ".join(f"{r} {n}" for r, n in sorted(s["releases"].items())))
print("failed by: " + (", ".join(f"{r} {n}" for r, n in sorted(s["failed_by_release"].items())) or "none"))
print(f"latency p50 {s['p50_us'] / 1000:.1f} ms, p99 {s['p99_us'] / 1000:.1f} ms")
PY
