#!/usr/bin/env bash
# Every Partis test: installs what it needs (scripts/setup.sh), then runs the
# unit suites here and the real-guest suites (directly on a VT-x/AMD-V host,
# inside the nested test host on a PVM host). Closing line: "N passed, N failed" (", N skipped" when some were).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec node scripts/run-tests.mjs "${1:-all}"
