#!/bin/sh
# The multi-vCPU crash loop of docs/guests.md ("Triple faults of multi-vCPU
# guests inside the nested test host"): N boots of a 4-vCPU default guest by
# Partis and, interleaved, by QEMU with memfd-backed guest RAM, counting the
# runs that do not reach `CPUS=4`. Run it inside the nested test host:
#   node dist/partis/partis.js host nested -- env N=10 LOAD=1 scripts/nested-smp-loop.sh
# N boots each (default 10); LOAD=1 adds a busy loop beside them; NOQEMU=1 /
# NOPARTIS=1 leave one VMM out; logs go to $LOGS (default .cache/smp-loop).
cd "$(dirname "$0")/.." || exit 1
N=${N:-10}
LOGS=${LOGS:-.cache/smp-loop}
mkdir -p "$LOGS"
CACHE=${PARTIS_CACHE:-$HOME/.cache/partis}
K=$(ls "$CACHE"/kernel/*/root/boot/vmlinuz-* | head -1)
I=$(ls -t "$CACHE"/initramfs/default-guest-*/initrd.cpio.gz | head -1)
B64=$(printf '%s' 'echo CPUS=$(nproc); poweroff -f' | base64 -w0)
APPEND="console=ttyS0 panic=-1 loglevel=7 partis.run=b64:$B64"
[ -n "$LOAD" ] && { timeout 7200 sh -c 'while :; do :; done' & }
pf=0; qf=0
for i in $(seq 1 "$N"); do
  if [ -z "$NOPARTIS" ]; then
    timeout 200 node dist/partis/partis.js run --cpus 4 --memory 512M --append "$APPEND" </dev/null >"$LOGS/partis-$i.log" 2>&1
    rc=$?
    if [ $rc = 0 ] && grep -q CPUS=4 "$LOGS/partis-$i.log"; then echo "partis $i ok"; else pf=$((pf+1)); echo "partis $i FAILED (status $rc)"; tail -3 "$LOGS/partis-$i.log"; fi
  fi
  if [ -z "$NOQEMU" ]; then
    timeout 200 qemu-system-x86_64 -enable-kvm -cpu host -smp 4 -m 512M \
      -object memory-backend-memfd,id=m0,size=512M,share=on -machine q35,memory-backend=m0 \
      -no-reboot -nodefaults -no-user-config -nographic -serial stdio \
      -kernel "$K" -initrd "$I" -append "$APPEND" </dev/null >"$LOGS/qemu-$i.log" 2>&1
    rc=$?
    # -no-reboot: a guest reset (a triple fault included) ends QEMU with status 0, without the marker.
    if grep -q CPUS=4 "$LOGS/qemu-$i.log"; then echo "qemu $i ok"; else qf=$((qf+1)); echo "qemu $i FAILED (status $rc)"; tail -3 "$LOGS/qemu-$i.log"; fi
  fi
done
echo "failed: partis $pf, qemu $qf (of $N each)"
