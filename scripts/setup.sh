#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine (run as root) for building and
# testing Partis: system packages (QEMU for the nested test host, tools that
# prepare guest images), npm dependencies, and the TypeScript build.
#   scripts/setup.sh            # safe to run again; does only what is missing
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: binary/command each needs, so we only touch apt when something is missing.
declare -A need=(
  [qemu-system-x86]=/usr/bin/qemu-system-x86_64
  [qemu-utils]=/usr/bin/qemu-img
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
