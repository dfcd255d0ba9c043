#!/usr/bin/env bash
# First command of the README: installs what kiln needs, builds it, and runs the example.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/deps.sh runtime
cargo build --release --locked -p kiln -p kiln-load
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
echo "== deploy: start the local server, launch the instances, route traffic"
"$kiln" up
url=$("$kiln" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["balancers"][0]["bound"])')
echo "== the example answers through kiln's proxy:"
curl -fsS -D - "http://$url/cgi-bin/version" | grep -Ei '^x-kiln-release|from'
echo
echo "kiln is at $kiln. The example is running at http://$url/"
echo "Try: cd examples/hello && $kiln apply -var greeting=bonjour   (a canary release)"
echo "     $kiln status; $kiln releases web; $kiln rollback web; $kiln down"
echo "The whole tour, under load: examples/hello/tour.sh (see examples/hello/README.md)"
