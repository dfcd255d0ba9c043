#!/usr/bin/env bash
# Cold release builds of the kiln binary, without and with the `aws` feature, each into an
# empty target directory: wall time, peak RSS of the largest compiler process, binary size.
#   bench/build.sh [SCRATCH_DIR]      (default /tmp/kiln-build-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=${1:-/tmp/kiln-build-bench}
mkdir -p "$scratch"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(cargo --version); commit $(git rev-parse --short HEAD)"
for variant in default aws; do
  target="$scratch/target-$variant"
  rm -rf "$target"
  args=(build --release --locked -p kiln)
  [ "$variant" = aws ] && args+=(--features aws)
  log="$scratch/$variant.log"
  start=$(date +%s)
  /usr/bin/time -v env CARGO_TARGET_DIR="$target" cargo "${args[@]}" >"$log" 2>&1
  end=$(date +%s)
  rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
  size=$(stat -c %s "$target/release/kiln")
  echo "$variant: $((end - start)) s wall, peak RSS $((rss_kb / 1024)) MiB, binary $((size / 1024 / 1024)) MiB"
done

# The same `aws` build with the SDK's service crates at the release profile's own opt-level 3,
# to show what the workspace's `opt-level = 1` for them saves.
if [ "${KILN_BENCH_OPT3:-1}" = 1 ]; then
  target="$scratch/target-aws-opt3"
  rm -rf "$target"
  overrides=()
  for crate in ec2 autoscaling elasticloadbalancingv2 ssm s3 dynamodb sts; do
    overrides+=(--config "profile.release.package.aws-sdk-$crate.opt-level=3")
  done
  log="$scratch/aws-opt3.log"
  start=$(date +%s)
  /usr/bin/time -v env CARGO_TARGET_DIR="$target" cargo "${overrides[@]}" build --release --locked -p kiln --features aws >"$log" 2>&1
  end=$(date +%s)
  rss_kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
  size=$(stat -c %s "$target/release/kiln")
  echo "aws, SDK at opt-level 3: $((end - start)) s wall, peak RSS $((rss_kb / 1024)) MiB, binary $((size / 1024 / 1024)) MiB"
fi
