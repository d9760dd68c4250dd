#!/usr/bin/env bash
# The main job: boot the default VM with its console on this terminal.
# Installs what it needs first (scripts/setup.sh). On a host whose KVM is PVM
# (no VT-x/AMD-V), stock guests cannot run directly, so the VM runs inside the
# nested test host (software-emulated AMD-V: slow, but real).
# Extra arguments go to `partis run` (e.g. --cpus 4 --memory 1G).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >&2
partis=(node "$PWD/dist/partis/partis.js")
"${partis[@]}" host check >&2 || true
if node -e 'import("./dist/src/hypervisor/host.js").then(h => process.exit(h.stockGuestVerdict(h.probeHost()).ok ? 0 : 1))'; then
  exec "${partis[@]}" run "$@"
else
  exec "${partis[@]}" host nested -- "${partis[@]}" run "$@"
fi
