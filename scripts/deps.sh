#!/usr/bin/env bash
# Installs the system packages kiln and its tests use, on Debian or Ubuntu.
# Usage: scripts/deps.sh [runtime|test]   (default: runtime)
# `test` also installs the moto server (the AWS emulator kiln-aws's tests run against) into a
# Python venv, reused when it already has the pinned version: /var/cache/kiln/moto-venv, or
# ../.kiln-cache/moto-venv beside the checkout when /var/cache is not writable, or
# $KILN_MOTO_VENV. scripts/test.sh finds it the same way.
set -euo pipefail

# The moto version the tests are known to pass with (pip resolved `moto[server]` to it).
MOTO_VERSION=5.2.5

runtime=(bubblewrap busybox-static git ca-certificates curl python3)
test=(skopeo python3-venv)

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

if [ "${1:-runtime}" = test ]; then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  venv=${KILN_MOTO_VENV:-}
  if [ -z "$venv" ]; then
    if mkdir -p /var/cache/kiln 2>/dev/null && [ -w /var/cache/kiln ]; then
      venv=/var/cache/kiln/moto-venv
    else
      venv=$(cd "$repo/.." && pwd)/.kiln-cache/moto-venv
    fi
  fi
  have=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null || true)
  if [ "$have" != "$MOTO_VERSION" ] || [ ! -x "$venv/bin/moto_server" ]; then
    echo "installing moto $MOTO_VERSION into $venv" >&2
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" </dev/null >&2
  fi
fi

if ! command -v cargo >/dev/null; then
  echo "kiln builds with Rust 1.89 or newer: install it with rustup (https://rustup.rs), then run this again" >&2
  exit 1
fi
