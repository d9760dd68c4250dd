/**
 * The nested test host's boot image: the same stock Debian kernel as the
 * default guest, and a busybox initramfs whose /init loads KVM (kvm-amd),
 * virtio-pci, 9p and virtio-console, mounts the host's root (virtfs, read-only)
 * plus the writable shares, chroots into it and runs the command described in
 * the control share (see nested-host.ts).
 */
import { createHash } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { CpioEntry } from "../images/cpio.js";
import { prepareBusybox, prepareDebianKernel } from "../images/debian-kernel.js";
import { defaultCacheDir, ensureCacheEntry } from "../images/image-cache.js";
import { buildInitramfs } from "../images/initramfs.js";
import { loadModuleIndex, planModuleLoad } from "../images/kernel-modules.js";

/**
 * Modules of the nested host (dependencies such as ccp, irqbypass, virtio_ring, netfs, fscache are added);
 * vhost_vsock: QEMU's vhost-vsock-pci, the other side of bench/devices/guest-vsock.ts.
 */
export const NESTED_HOST_MODULES: readonly string[] = ["kvm_amd", "virtio_pci", "virtio_console", "9pnet_virtio", "9p", "tun", "vhost_vsock"];

const LAYOUT_VERSION = 2;

/** 9p mount options: 9P2000.L, the largest message size Linux's virtio transport takes (<512 KiB). */
export const NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000";

const INIT = `#!/bin/sh
# Partis nested test host (PID 1): set up, chroot into the host's root, run the command, power off.
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
  echo "partis-nested: $*" > /dev/console
  [ -d /ctl ] && echo "$*" > /ctl/error
  sync
  poweroff -f
}
while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$m" || echo "partis-nested: insmod $m failed" > /dev/console
done < /lib/modules/load-order
# Guest RAM of the VMMs inside is a memfd: let it use transparent huge pages
# when they ask (madvise), as anonymous memory does.
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null
# No proactive compaction: under TCG kcompactd has spun for minutes from the
# first seconds of uptime (soft lockups, docs/guests.md); compaction still
# runs when an allocation needs it.
echo 0 > /proc/sys/vm/compaction_proactiveness 2>/dev/null
mkdir -p /ctl /host
mount -t 9p -o ${NINEP_OPTS} partisctl /ctl || fail "cannot mount the control share"
# Heartbeat for the outer watchdog (nested-host.ts): a nested host whose
# user space stops altogether is stopped, not waited for.
# It also watches for the kernel's hung-task report (a task blocked for 120 s): at the first one it
# dumps every blocked task's stack on the console (sysrq w; the console level raised so that the
# dump, printed at KERN_INFO, gets there), for the outer watchdog's report.
( dumped=
  while :; do
    : > /ctl/heartbeat
    if [ -z "$dumped" ] && dmesg | grep -q "blocked for more than"; then
      dumped=1
      echo 7 > /proc/sys/kernel/printk
      echo w > /proc/sysrq-trigger
    fi
    sleep 10
  done ) &
mount -t 9p -o ${NINEP_OPTS},cache=loose,ro hostroot /host || fail "cannot mount the host root (virtfs hostroot)"
mount -t tmpfs -o mode=1777 tmpfs /host/tmp || fail "tmpfs /tmp"
mount -t tmpfs -o mode=755 tmpfs /host/run || fail "tmpfs /run"
# Writable shares: lines "<tag> <absolute path>"
while read -r tag path; do
  [ -n "$tag" ] || continue
  mkdir -p "/host$path" 2>/dev/null
  mount -t 9p -o ${NINEP_OPTS},cache=mmap "$tag" "/host$path" || fail "cannot mount share $tag at $path"
done < /ctl/shares
mount -t proc proc /host/proc || fail "proc"
mount -t sysfs sysfs /host/sys || fail "sysfs"
mount -t devtmpfs devtmpfs /host/dev || fail "devtmpfs"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /host/dev/shm
ip link set lo up 2>/dev/null
[ -e /dev/kvm ] || echo "partis-nested: /dev/kvm is missing (kvm_amd not loaded?)" > /dev/console
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] || continue
  case "$(cat "$p/name")" in
    partis.stdin) IN=/dev/\${p##*/} ;;
    partis.stdout) OUT=/dev/\${p##*/} ;;
    partis.stderr) ERR=/dev/\${p##*/} ;;
  esac
done
cp /ctl/command.sh /host/run/partis-command.sh || fail "cannot copy the command"
if [ -e /ctl/tty ]; then
  read -r rows cols < /ctl/tty
  # The window size lives as long as the tty is open: set it on the command's own descriptor.
  setsid -c /bin/sh -c "stty rows $rows cols $cols 2>/dev/null; exec chroot /host /bin/sh /run/partis-command.sh" <>/dev/hvc0 >&0 2>&0
  status=$?
else
  [ -n "$IN" ] && [ -n "$OUT" ] && [ -n "$ERR" ] || fail "virtio-serial ports missing"
  chroot /host /bin/sh /run/partis-command.sh <"$IN" >"$OUT" 2>"$ERR"
  status=$?
fi
echo "$status" > /ctl/status
sync
poweroff -f
`;

export interface NestedHostImage {
  kernel: string;
  initrd: string;
  kernelVersion: string;
}

/** Builds (once per content) the nested host's initramfs; same kernel as the default guest. */
export async function prepareNestedHostImage(opts: { cacheDir?: string; log?: (l: string) => void } = {}): Promise<NestedHostImage> {
  const cacheDir = opts.cacheDir ?? defaultCacheDir();
  const log = opts.log ?? ((): void => {});
  const kernel = await prepareDebianKernel(cacheDir, log);
  const busybox = await prepareBusybox(cacheDir, log);
  const files: CpioEntry[] = [{ kind: "file", path: "init", data: Buffer.from(INIT, "utf8"), mode: 0o755 }];
  const key = createHash("sha256")
    .update(JSON.stringify({ v: LAYOUT_VERSION, k: kernel.package, b: busybox.version, m: NESTED_HOST_MODULES, init: INIT }))
    .digest("hex")
    .slice(0, 16);
  const entry = join(cacheDir, "initramfs", `nested-host-${kernel.kernelVersion}-${key}`);
  await ensureCacheEntry(entry, async (tmp) => {
    log("building nested host initramfs");
    const index = await loadModuleIndex(kernel.modulesDir, kernel.kernelVersion);
    const plan = planModuleLoad(index, NESTED_HOST_MODULES);
    await writeFile(join(tmp, "initrd.cpio.gz"), await buildInitramfs({ busybox: busybox.path, modules: { index, plan }, files }));
    await writeFile(join(tmp, "modules.txt"), plan.load.map((m) => m.path).join("\n") + "\n");
  });
  return { kernel: kernel.kernel, initrd: join(entry, "initrd.cpio.gz"), kernelVersion: kernel.kernelVersion };
}
