#!/usr/bin/env bash
# Second command of the README: installs and starts everything the tests need, then runs
# formatting, lint and every test. Used as is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh test

# Reuse a build cache outside the checkout when the machine keeps one; a clean machine builds
# from scratch in the same place.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/kiln/target}"
mkdir -p "$CARGO_TARGET_DIR" 2>/dev/null || export CARGO_TARGET_DIR="$PWD/target"
export CARGO_TERM_COLOR=never

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo test"
# The example's tour (crates/kiln/tests/example.rs) drives the kiln-load binary.
cargo build --locked -p kiln-load
cargo test --locked --workspace
