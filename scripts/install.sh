#!/usr/bin/env bash
# Prepares a (possibly fresh) Debian 12 machine, as root, for bun-iommufd's tests and benchmark:
# system packages (QEMU and busybox for the test guest, the toolchain that builds its kernel and
# the C baseline), Bun through npm, and the project's dependencies. Safe to run again.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "${BASH_SOURCE[0]}")/.."

t0=$SECONDS
say() { printf '[install +%ds] %s\n' "$((SECONDS - t0))" "$*"; }

installed() { [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == ii* ]]; }

packages=(qemu-system-x86 busybox-static cpio flex bison bc libelf-dev libssl-dev build-essential
  rsync libcap-dev xz-utils util-linux strace fio)
missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
if ! command -v bun >/dev/null && ! command -v npm >/dev/null; then missing+=(nodejs npm); fi

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: missing packages ${missing[*]}; run as root (or install them) first" >&2
    exit 1
  fi
  say "installing ${missing[*]}"
  apt-get update -q
  # Recommends would pull in a desktop's worth of QEMU GUI libraries a headless guest never uses.
  apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  say "all system packages present"
fi

if ! command -v bun >/dev/null; then
  say "installing bun with npm"
  npm install -g bun
  hash -r
  # Should npm have skipped bun's install script, run it: it puts the real binary in place.
  if ! bun --version >/dev/null 2>&1; then
    (cd "$(npm root -g)/bun" && node install.js)
    hash -r
  fi
fi
say "bun $(bun --version)"

bun install --frozen-lockfile
say "dependencies installed"
