#!/usr/bin/env bash
# Second command of the README: installs and starts everything the tests need, then runs
# formatting, lint and every test. Used as is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh test

# The moto server (installed by deps.sh) for kiln-aws's tests: on a free loopback port, stopped
# when this script exits, however it exits.
moto_venv=""
for v in "${KILN_MOTO_VENV:-}" /var/cache/kiln/moto-venv "$(cd .. && pwd)/.kiln-cache/moto-venv"; do
  if [ -n "$v" ] && [ -x "$v/bin/moto_server" ]; then moto_venv=$v; break; fi
done
if [ -z "$moto_venv" ]; then
  echo "moto_server not found: scripts/deps.sh test should have installed it" >&2
  exit 1
fi
moto_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_log=$(mktemp)
"$moto_venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" </dev/null >"$moto_log" 2>&1 &
moto_pid=$!
stop_moto() {
  kill "$moto_pid" 2>/dev/null || true
  wait "$moto_pid" 2>/dev/null || true
  rm -f "$moto_log"
}
trap stop_moto EXIT
moto_up=""
for _ in $(seq 1 60); do # 30 s
  if curl -fsS -o /dev/null "http://127.0.0.1:$moto_port/moto-api/" 2>/dev/null; then moto_up=1; break; fi
  kill -0 "$moto_pid" 2>/dev/null || break
  sleep 0.5
done
if [ -z "$moto_up" ]; then
  echo "moto_server did not answer on 127.0.0.1:$moto_port within 30 s; its output:" >&2
  cat "$moto_log" >&2
  exit 1
fi
export KILN_MOTO_URL="http://127.0.0.1:$moto_port"
echo "== moto $("$moto_venv/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))') at $KILN_MOTO_URL"

# Reuse a build cache outside the checkout when the machine keeps one; a clean machine builds
# from scratch in the same place.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/kiln/target}"
mkdir -p "$CARGO_TARGET_DIR" 2>/dev/null || export CARGO_TARGET_DIR="$PWD/target"
export CARGO_TERM_COLOR=never

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
# Both builds of the CLI: the default one, and the one with AWS support (the SDK).
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --workspace --all-targets --features kiln/aws -- -D warnings
echo "== cargo test"
# The example's tour (crates/kiln/tests/example.rs) drives the kiln-load binary.
cargo build --locked -p kiln-load
# With AWS support: the AWS end-to-end tests (crates/kiln/tests/aws.rs) run against moto.
cargo test --locked --workspace --features kiln/aws
