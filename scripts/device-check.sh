#!/bin/bash
# Runs on a lent machine (the workplace's device tool), from the repository
# root, with .device/ (scripts/device-pack.sh) and dist/ carried: one call
# that says whether KVM there is hardware-assisted and, if it is, measures
# natively what the nested test host cannot:
#   1. the machine: CPU flags (vmx/svm/hypervisor), /dev/kvm, kvm modules;
#   2. `partis host check` (exit and verdict);
#   only where stock guests can run (VT-x/AMD-V):
#   3. the main job: the default guest answers a command and powers off;
#   4. the real-guest boot suite (test/guest/boot.test.ts);
#   5. the boot benchmark, Partis rows (QEMU rows too where qemu-system-x86_64 exists);
#   6. 64 vCPUs, both kinds of vCPU thread that matter (worker, native-main).
# Every step has its own time limit; the whole stays under ~8 minutes.
# Output goes to stdout and to $OUT/device-check.log (the tool brings $OUT back).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/partis-device-out}
mkdir -p "$out"
if [ -z "${PARTIS_DEVICE_LOGGED:-}" ]; then
  PARTIS_DEVICE_LOGGED=1 "$0" "$@" 2>&1 | tee "$out/device-check.log"
  exit "${PIPESTATUS[0]}"
fi
step() { echo; echo "== $* ($(date -u +%T))"; }

step machine
uname -a
echo "cpus $(nproc); $(grep -m1 '^model name' /proc/cpuinfo)"
free -m | sed -n 2p
flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
for f in vmx svm hypervisor ept npt; do case "$flags" in *" $f "*) echo "cpu flag: $f" ;; esac; done
ls -l /dev/kvm 2>&1
ls -d /sys/module/kvm* 2>&1
[ -r /sys/module/kvm_intel/parameters/nested ] && echo "kvm_intel nested: $(cat /sys/module/kvm_intel/parameters/nested)"
if [ ! -e /dev/kvm ]; then echo "VERDICT: no /dev/kvm on this machine: nothing of Partis can run here"; exit 0; fi

step node
if command -v node >/dev/null && node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
  echo "node $(node --version) (the machine's)"
else
  mkdir -p /tmp/partis-node/bin
  if command -v xz >/dev/null; then xz -dc .device/node.xz > /tmp/partis-node/bin/node
  else python3 -c 'import lzma,sys; sys.stdout.buffer.write(lzma.open(".device/node.xz").read())' > /tmp/partis-node/bin/node; fi
  chmod +x /tmp/partis-node/bin/node
  export PATH=/tmp/partis-node/bin:$PATH
  echo "node $(node --version) (carried; packed from $(cat .device/node.version))"
fi
[ -d node_modules ] || cp -r .device/node_modules node_modules
export PARTIS_CACHE=$PWD/.device/cache
# The memoised apt answers are keyed to the apt lists' mtime: make them this machine's (it reaches no mirror).
node -e '
  const fs = require("fs"); const f = process.env.PARTIS_CACHE + "/apt-resolved.json";
  let stamp = "none"; try { stamp = String(fs.statSync("/var/lib/apt/lists").mtimeMs); } catch {}
  const m = JSON.parse(fs.readFileSync(f, "utf8")); m.stamp = stamp; fs.writeFileSync(f, JSON.stringify(m));'
partis=(node "$PWD/dist/partis/partis.js")

step "partis host check"
"${partis[@]}" host check
echo "host check exit $?"
verdict=$(node --input-type=module -e '
  const h = await import(process.cwd() + "/dist/src/hypervisor/host.js");
  const v = h.stockGuestVerdict(h.probeHost());
  console.log(v.ok ? "ok" : "no");')
if [ "$verdict" != ok ]; then echo "VERDICT: /dev/kvm here cannot run stock guests (see host check): no native guest figures from this machine"; exit 0; fi
echo "VERDICT: hardware-assisted KVM: running the native checks"

step "main job: default guest, a command, poweroff"
printf 'echo SUM=$((40+2)) CPUS=$(nproc)\npoweroff\n' | timeout -k 10 60 "${partis[@]}" run --cpus 4
echo "main job exit $?"

step "real-guest boot suite"
timeout -k 10 240 node --test --test-reporter=spec --test-concurrency=1 dist/test/guest/boot.test.js
echo "boot suite exit $?"

step "boot benchmark"
rows=partis,partis-native-main
command -v qemu-system-x86_64 >/dev/null && rows=$rows,qemu-microvm,qemu-q35
timeout -k 10 150 node dist/bench/boot/boot-time.js --runs 7 --warmup 1 --isolates --only "$rows"
echo "boot bench exit $?"

step "64 vCPUs"
for kind in worker native-main; do
  s=$(date +%s%N)
  printf 'echo NPROC=$(nproc)\npoweroff\n' | timeout -k 10 120 "${partis[@]}" run --cpus 64 --memory 4G --vcpu-threads $kind | grep -a -E 'NPROC=[0-9]'
  echo "64 vCPUs, $kind: exit ${PIPESTATUS[1]}, $(( ($(date +%s%N) - s) / 1000000 )) ms to poweroff"
done
step done
