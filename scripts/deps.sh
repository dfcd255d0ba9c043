#!/usr/bin/env bash
# Installs the system packages kiln and its tests use, on Debian or Ubuntu.
# Usage: scripts/deps.sh [runtime|test]   (default: runtime)
set -euo pipefail

runtime=(bubblewrap busybox-static git ca-certificates curl python3)
test=(skopeo)

want=("${runtime[@]}")
if [ "${1:-runtime}" = test ]; then
  want+=("${test[@]}")
fi

missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "kiln builds with Rust 1.89 or newer: install it with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi
