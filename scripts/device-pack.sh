#!/bin/bash
# Packs into .device/ (git-ignored) what scripts/device-check.sh needs on a
# lent machine that reaches no network (no apt, no npm): this host's `node`
# (xz), the two npm packages the compiled tree loads at run time (koffi with
# its linux-x64 build only, commander), and a trimmed guest-artifact cache
# (the default guest's kernel and initramfs, the busybox entry, the memoised
# apt answers) so `partis run` with no --kernel finds everything cached.
#
#   npm run build && scripts/device-pack.sh
#   then, through the workplace's device tool: carry [".device", "dist"],
#   command: scripts/device-check.sh   (docs/DEVELOPING.md, "On a lent machine")
#
# The whole carry (tree, dist/, .device/) must stay under the tool's 64 MiB;
# the script prints the total.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f dist/partis/partis.js ] || { echo "device-pack: build first (npm run build)" >&2; exit 2; }
cache=${PARTIS_CACHE:-$HOME/.cache/partis}
out=.device
rm -rf "$out"
mkdir -p "$out/node_modules/koffi/build/koffi" "$out/cache"

# The default guest's artifacts, prepared here if need be (this host has apt).
guest=$(node --input-type=module -e '
  const { prepareDefaultGuest } = await import(process.cwd() + "/dist/src/images/default-guest.js");
  const g = await prepareDefaultGuest();
  console.log(JSON.stringify(g));')
kernel=$(node -e 'console.log(JSON.parse(process.argv[1]).kernel)' "$guest")
initrd=$(node -e 'console.log(JSON.parse(process.argv[1]).initrd)' "$guest")
modules=$(node -e 'console.log(JSON.parse(process.argv[1]).modulesDir)' "$guest")
case "$kernel$initrd" in "$cache"/*"$cache"/*) ;; *) echo "device-pack: the default guest is not under $cache" >&2; exit 1 ;; esac

# Kernel entry: the bzImage and the module indexes only (the initramfs is cached; its modules are in it).
kentry=${kernel%/root/boot/*}
krel=${kentry#"$cache"/}
mkdir -p "$out/cache/$krel/root/boot" "$out/cache/$krel/root/lib/modules/$(basename "$modules")"
cp "$kernel" "$out/cache/$krel/root/boot/"
cp "$modules"/modules.dep "$modules"/modules.order "$modules"/modules.builtin "$out/cache/$krel/root/lib/modules/$(basename "$modules")/"
# The initramfs entry of the default guest, the busybox entry, the apt answers.
irel=$(dirname "${initrd#"$cache"/}")
mkdir -p "$out/cache/$(dirname "$irel")"
cp -r "$cache/$irel" "$out/cache/$irel"
cp -r "$cache/busybox" "$out/cache/"
cp "$cache/apt-resolved.json" "$out/cache/"

# npm packages loaded at run time.
cp -r node_modules/commander "$out/node_modules/"
cp node_modules/koffi/package.json node_modules/koffi/index.js node_modules/koffi/indirect.js "$out/node_modules/koffi/"
cp -r node_modules/koffi/build/koffi/linux_x64 "$out/node_modules/koffi/build/koffi/"

# Node itself (the lent machine's image has none of the right version, or none).
xz -T0 -6 -c "$(readlink -f "$(command -v node)")" > "$out/node.xz"
node --version > "$out/node.version"

tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total=$(( tree + $(du -sb dist | cut -f1) + $(du -sb "$out" | cut -f1) ))
echo "device-pack: .device/ $(du -sh "$out" | cut -f1), carry total $((total / 1048576)) MiB of the tool's 64"
[ "$total" -lt $((64 * 1048576)) ] || { echo "device-pack: over 64 MiB" >&2; exit 1; }
