#!/usr/bin/env bash
# Benchmark of drift detection (`kiln_bake::verify_tree`), side by side with sha256sum in the
# same run.
#
#   bench/drift.sh [WORKDIR]      (needs python3)
#
# 1. A deterministic tree of 10,000 files / 500 MB in 100 directories (python3's `random` seeded
#    with 42: 9,950 files of 256 B–128 KiB and 50 of 1–16 MiB, log-uniform, scaled to 500 MB
#    in total; incompressible content). Kept in WORKDIR/tree for later runs.
# 2. crates/kiln-bake/examples/verify_bench.rs on it: bakes the tree into a one-layer image,
#    builds the file manifest, unpacks the image as an instance root, then times (5 runs,
#    medians) (a) a full verification with no stat cache, (b) a second full verification,
#    (c) a verification prefiltered by the stat cache after a clean pass. Every run must
#    report 0 changes.
# 3. The baselines, 5 runs each (median): `find | xargs -0 sha256sum` in one process, and
#    `xargs -0 -P2 -n 500 sha256sum` (two processes).
#
# The page cache is warm for everything (the trees were just written or read), so this measures
# hashing and file-system calls, not the disk.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/kiln-drift-bench.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
command -v python3 >/dev/null || { echo "needs python3 (apt-get install python3)" >&2; exit 1; }
cargo build --release --locked -p kiln-bake --example verify_bench --manifest-path "$repo/Cargo.toml" >&2
bench=${CARGO_TARGET_DIR:-$repo/target}/release/examples/verify_bench

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "sha256sum: $(sha256sum --version | head -1), find: $(find --version | head -1), python3: $(python3 --version | cut -d' ' -f2)"

tree=$work/tree
if [ ! -f "$work/tree.done" ]; then
  rm -rf "$tree"
  python3 - "$tree" <<'PY'
import math, os, random, sys
root = sys.argv[1]
rng = random.Random(42)
def log_uniform(lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))
sizes = [log_uniform(256, 128 << 10) for _ in range(9950)] + [log_uniform(1 << 20, 16 << 20) for _ in range(50)]
rng.shuffle(sizes)
scale = 500_000_000 / sum(sizes)
sizes = [max(1, int(s * scale)) for s in sizes]
sizes[-1] += 500_000_000 - sum(sizes)
for i, size in enumerate(sizes):
    d = os.path.join(root, f"d{i // 1000:02}", f"e{i // 100 % 10:02}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05}.bin"), "wb") as f:
        f.write(rng.randbytes(size))
PY
  touch "$work/tree.done"
fi
echo "tree: $(find "$tree" -type f | wc -l) files, $(du -sb --apparent-size "$tree" | cut -f1) bytes, largest $(find "$tree" -type f -printf '%s\n' | sort -n | tail -1) bytes"

echo
echo "== kiln verify_tree (crates/kiln-bake/examples/verify_bench.rs)"
"$bench" "$tree" "$work" | tee "$work/verify.txt"
kv=$(grep '^verify_bench:' "$work/verify.txt")
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$kv"; }
full=$(field full_ms); second=$(field second_ms); quick=$(field quick_ms); changes=$(field changes)
[ "$changes" = 0 ] || { echo "kiln reported $changes changes on an untouched tree" >&2; exit 1; }

# Median wall time in ms of 5 runs of a shell command (after one warm-up run).
median_ms() {
  local cmd=$1 times=() i start end
  bash -c "$cmd"
  for i in 1 2 3 4 5; do
    start=$(date +%s%N)
    bash -c "$cmd"
    end=$(date +%s%N)
    times+=("$(( (end - start) / 1000 ))")
  done
  printf '%s\n' "${times[@]}" | sort -n | sed -n 3p | awk '{printf "%.1f", $1 / 1000}'
}

echo
echo "== baselines (5 runs each, medians)"
one=$(median_ms "find '$tree' -type f -print0 | xargs -0 sha256sum > /dev/null")
echo "find | xargs -0 sha256sum (1 process)           median $one ms"
two=$(median_ms "find '$tree' -type f -print0 | xargs -0 -P2 -n 500 sha256sum > /dev/null")
echo "find | xargs -0 -P2 -n 500 sha256sum           median $two ms"

echo
echo "== kiln / sha256sum (time ratios; below 1 means kiln is faster)"
python3 - "$full" "$second" "$quick" "$one" "$two" <<'PY'
import sys
full, second, quick, one, two = map(float, sys.argv[1:])
for label, k in [("(a) full, no stat cache", full), ("(b) full, second pass", second), ("(c) stat-prefiltered", quick)]:
    print(f"{label:<26} {k:8.1f} ms   vs 1 process: {k / one:6.3f} ({one / k:5.1f}x faster)   vs -P2: {k / two:6.3f} ({two / k:5.1f}x faster)")
PY
