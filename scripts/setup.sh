#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine (run as root) for building and
# testing Partis: system packages (QEMU for the nested test host, tools that
# prepare guest images), npm dependencies, and the TypeScript build.
#   scripts/setup.sh            # safe to run again; does only what is missing
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: binary/command each needs, so we only touch apt when something is missing.
declare -A need=(
  [busybox-static]=/bin/busybox
  [cpio]=/usr/bin/cpio
  [kmod]=/usr/sbin/depmod
  [zstd]=/usr/bin/zstd
  # unpacking bzImage kernels on the host (Debian's kernels are xz-compressed)
  [xz-utils]=/usr/bin/xz
  [util-linux]=/usr/bin/setpriv
  [dpkg]=/usr/bin/dpkg-deb
  [acpica-tools]=/usr/bin/iasl
  # device tests: ISO images for the CD-ROM, ext4 images, bridges/TAPs for NICs
  [genisoimage]=/usr/bin/genisoimage
  [e2fsprogs]=/sbin/mkfs.ext4
  [iproute2]=/sbin/ip
  # static guest tools busybox lacks (test/guest/tools: the AF_VSOCK client/server), and bench programs
  [gcc]=/usr/bin/gcc
  [libc6-dev]=/usr/lib/x86_64-linux-gnu/libc.a
)
missing=()
for pkg in "${!need[@]}"; do
  [ -e "${need[$pkg]}" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages (${missing[*]}); run as root" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# QEMU: the nested test host's emulator (software AMD-V where the host's KVM cannot run stock guests;
# also the baseline VMM of the benchmarks) and qemu-img (the storage tests' oracle), at least 10: a
# current QEMU (Proxmox VE 9 ships 10.0) rather than Debian 12's 7.2, with three years of TCG fixes.
# On Debian 12 that is bookworm-backports (Debian 13 has it). docs/guests.md, "QEMU 10 for the nested
# test host": it did not end the nested host's stack-guard panics.
QEMU_MIN_MAJOR=10
qemu_major() { # $1: a QEMU program; prints its major version, or nothing
  "$1" --version 2>/dev/null | sed -n 's/^.*version \([0-9]*\)\..*/\1/p' | head -1
}
qemu_new_enough() {
  local p v
  for p in /usr/bin/qemu-system-x86_64 /usr/bin/qemu-img; do
    v=$(qemu_major "$p")
    [ -n "$v" ] && [ "$v" -ge "$QEMU_MIN_MAJOR" ] || return 1
  done
}
if ! qemu_new_enough; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: QEMU ${QEMU_MIN_MAJOR} or newer (qemu-system-x86, qemu-utils) is missing; run as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
  target=()
  if [ "$codename" = bookworm ]; then
    if ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      echo "setup: adding bookworm-backports to apt's sources (QEMU ${QEMU_MIN_MAJOR})"
      echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/partis-bookworm-backports.list
    fi
    target=(-t bookworm-backports)
  fi
  apt-get update -q
  echo "setup: installing qemu-system-x86 and qemu-utils ${target[*]}"
  apt-get install -y -q --no-install-recommends "${target[@]}" qemu-system-x86 qemu-utils
  if ! qemu_new_enough; then
    echo "setup: QEMU is still older than ${QEMU_MIN_MAJOR}: $(/usr/bin/qemu-system-x86_64 --version 2>/dev/null | head -1)" >&2
    exit 1
  fi
fi

# Partis downloads kernel/busybox .debs with `apt-get download`: it needs package lists.
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
  echo "setup: apt package lists are empty; running apt-get update"
  apt-get update -q
fi

# npm dependencies: install when node_modules is absent or older than the lock file.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ] || [ ! -e node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund
fi

echo "setup: npx tsc -p . && node scripts/bundle.mjs"
npx tsc -p .
# The programs users run, bundled (scripts/bundle.mjs: start-up time).
node scripts/bundle.mjs
echo "setup: done"
