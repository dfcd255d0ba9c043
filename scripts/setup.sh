#!/usr/bin/env bash
# First command of the README: installs what kiln needs, builds it, and runs the example.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh runtime
cargo build --release --locked -p kiln
kiln=$PWD/target/release/kiln
[ -n "${CARGO_TARGET_DIR:-}" ] && kiln=$CARGO_TARGET_DIR/release/kiln

cd examples/hello
./make-rootfs.sh
"$kiln" validate
echo "== first bake: every step runs"
"$kiln" bake
echo "== second bake: every step comes from the cache, same digests"
"$kiln" bake
"$kiln" images ls
echo
echo "kiln is at $kiln — try: cd examples/hello && $kiln images inspect web"
