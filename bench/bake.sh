#!/usr/bin/env bash
# Benchmarks of `kiln bake`, each side by side with its baseline in the same run.
#
#   bench/bake.sh [WORKDIR]      (needs hyperfine: apt-get install hyperfine)
#
# 1. Cold bake of a 200 MB tree of 4,000 files (base = "dir:…") vs `tar -c | sha256sum` of the
#    same tree: both read every byte and hash a tar stream; kiln also hashes each input file for
#    its cache key and writes the layer into its store.
# 2. No-op re-bake of that tree and of the example image (nothing changed: every step cached).
# 3. Digest equality of the same config baked in two clean stores.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/kiln-bench.XXXXXX)}
mkdir -p "$work"
cargo build --release --locked -p kiln --manifest-path "$repo/Cargo.toml" >&2
kiln=${CARGO_TARGET_DIR:-$repo/target}/release/kiln
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)" >&2; exit 1; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "kiln: $("$kiln" --version), tar: $(tar --version | head -1), sha256sum: $(sha256sum --version | head -1)"

# A 200 MB tree: 40 directories × 100 files × 50 kB, incompressible.
tree=$work/tree
if [ ! -d "$tree" ]; then
  for d in $(seq -w 1 40); do
    mkdir -p "$tree/d$d"
    for f in $(seq -w 1 100); do
      head -c 50000 /dev/urandom > "$tree/d$d/f$f.bin"
    done
  done
fi
echo "tree: $(find "$tree" -type f | wc -l) files, $(du -sb "$tree" | cut -f1) bytes"

cat > "$work/kiln.hcl" <<HCL
project = "bench"
image "tree" { base = "dir:./tree" }
HCL
cd "$work"

echo
echo "== 1. cold bake vs tar | sha256sum (page cache warm for both)"
hyperfine --warmup 1 --runs 10 --export-json "$work/throughput.json" \
  --prepare "rm -rf $work/store" \
  -n "kiln bake (cold store)" "$kiln --store $work/store bake" \
  -n "tar -c | sha256sum" "tar -cf - -C $tree . | sha256sum"

echo
echo "== 2. no-op re-bake"
"$kiln" --store "$work/store" bake >/dev/null
cp -r "$repo/examples/hello" "$work/hello"
rm -rf "$work/hello/.kiln"
(cd "$work/hello" && ./make-rootfs.sh && "$kiln" bake >/dev/null)
hyperfine --warmup 2 --runs 20 -N --export-json "$work/noop.json" \
  -n "no-op re-bake, 200 MB tree" "$kiln --store $work/store bake" \
  -n "no-op re-bake, examples/hello" "$kiln -c $work/hello/kiln.hcl bake"

echo
echo "== 3. digest equality across two clean stores"
rm -rf "$work/s1" "$work/s2"
d1=$(cd "$work/hello" && "$kiln" --store "$work/s1" bake web | awk '/^web /{print $2}')
touch "$work/hello/site/"*   # new mtimes must not matter
d2=$(cd "$work/hello" && "$kiln" --store "$work/s2" bake web | awk '/^web /{print $2}')
echo "store 1: $d1"
echo "store 2: $d2"
[ "$d1" = "$d2" ] && echo "equal" || { echo "DIFFERENT"; exit 1; }

python3 - "$work/throughput.json" "$work/noop.json" <<'PY'
import json, sys, statistics
for path in sys.argv[1:]:
    results = json.load(open(path))["results"]
    print()
    for r in results:
        print(f"{r['command']:<32} median {statistics.median(r['times'])*1000:8.1f} ms  (min {min(r['times'])*1000:.1f}, max {max(r['times'])*1000:.1f}, n={len(r['times'])})")
    if "throughput" in path:
        k, t = (statistics.median(r["times"]) for r in results)
        print(f"kiln speed relative to tar | sha256sum: {t / k:.2f}x (medians)")
PY
