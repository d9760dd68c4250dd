/**
 * The default Linux guest: the stock Debian `linux-image-amd64` kernel and a
 * busybox initramfs built by Partis, cached under `$PARTIS_CACHE` (default
 * `~/.cache/partis`). See docs/guests.md for what the guest does at boot.
 *
 * Console: ttyS0 (16550 at 0x3f8, IRQ 4). Boot marker: `PARTIS-GUEST-READY`.
 * The ACPI power button powers the guest off (busybox acpid →
 * /etc/acpi/PWRF/00000080). `partis.run=b64:<base64>` or
 * `partis.run=<percent-encoded>` on the kernel command line runs a shell
 * command after the marker, before the console shell starts.
 */
import { createHash } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { CpioEntry } from "./cpio.js";
import { prepareBusybox, prepareDebianKernel } from "./debian-kernel.js";
import { defaultCacheDir, ensureCacheEntry } from "./image-cache.js";
import { buildInitramfs } from "./initramfs.js";
import { loadModuleIndex, planModuleLoad } from "./kernel-modules.js";
import { unpackKernel } from "./kernel-unpack.js";

/** Modules loaded by default: ACPI power button and the input event layer acpid reads. */
export const DEFAULT_GUEST_MODULES: readonly string[] = [
  "button",
  "evdev",
  // A kernel panic is reported to the host (ACPI QEMU0001, port 0x505).
  "pvpanic-mmio",
  // Partis's synthetic devices (virtio over PCI) and emulated ones (PIIX IDE, NE2000 PCI).
  "virtio_pci",
  "virtio_blk",
  "virtio_net",
  "virtio_console",
  "virtio-rng",
  "vmw_vsock_virtio_transport",
  "ata_piix",
  "sd_mod",
  "sr_mod",
  "ne2k-pci",
  // File systems for disks and CDs (ext4 needs a crc32c implementation at mount).
  "crc32c_generic",
  "ext4",
  "isofs",
];

/** The marker the guest prints on its console once user space is up. */
export const GUEST_READY_MARKER = "PARTIS-GUEST-READY";

/** Bump when the scripts or layout below change: it is part of the cache key. */
const GUEST_LAYOUT_VERSION = 1;

export interface DefaultGuest {
  kernel: string;
  initrd: string;
  modulesDir: string;
  kernelVersion: string;
}

export interface PrepareDefaultGuestOptions {
  cacheDir?: string;
  log?: (line: string) => void;
  /** Kernel modules to include and load at boot (dependencies are added). Default {@link DEFAULT_GUEST_MODULES}. */
  modules?: readonly string[];
  /** Debian kernel package or metapackage. Default `linux-image-amd64`. */
  kernelPackage?: string;
}

/** The kernel command-line option that makes the guest run `command` (a busybox sh command line). */
export function guestRunOption(command: string): string {
  return `partis.run=b64:${Buffer.from(command, "utf8").toString("base64")}`;
}

const INIT = `#!/bin/sh
# Partis default guest: minimal mounts, then busybox init (/etc/inittab).
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec /sbin/init
`;

const INITTAB = `::sysinit:/etc/rc
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/rc.shutdown
::restart:/sbin/init
`;

const RC = `#!/bin/sh
export PATH=/sbin:/usr/sbin:/bin:/usr/bin
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname partis-guest
ip link set lo up 2>/dev/null
# Kernel modules, dependencies first (order computed from modules.dep when the image was built).
while read -r m; do
  [ -n "$m" ] || continue
  insmod "/lib/modules/$m" 2>/dev/null || echo "partis-guest: insmod $m failed" >&2
done < /lib/modules/load-order
# ACPI power button -> /etc/acpi/PWRF/00000080 (busybox acpid reads /dev/input/event*).
acpid -c /etc/acpi -l /var/log/acpid.log
# The marker promises a live power button: acpid opens the input devices after it forks, so wait
# (5 s at most) until it holds one; a press in between would be lost.
i=0
while [ $i -lt 50 ] && ! ls -l /proc/$(pidof acpid)/fd 2>/dev/null | grep -q /dev/input/event; do sleep 0.1; i=$((i+1)); done
echo ${GUEST_READY_MARKER}
# partis.run=b64:<base64> | partis.run=<percent-encoded>
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    partis.run=b64:*) printf '%s' "\${arg#partis.run=b64:}" | base64 -d > /run/partis-run.sh ;;
    partis.run=*) v="\${arg#partis.run=}"; printf '%b' "$(printf '%s' "$v" | sed 's/+/ /g; s/%\\([0-9A-Fa-f][0-9A-Fa-f]\\)/\\\\x\\1/g')" > /run/partis-run.sh ;;
  esac
done
if [ -s /run/partis-run.sh ]; then
  sh /run/partis-run.sh
fi
exit 0
`;

const RC_SHUTDOWN = `#!/bin/sh
killall acpid 2>/dev/null
sync
umount -a -r 2>/dev/null
exit 0
`;

const ACPI_POWER = `#!/bin/sh
# busybox acpid: power button (EV_KEY KEY_POWER -> action PWRF/00000080)
echo PARTIS-POWER-BUTTON > /dev/console
sync
poweroff -f
`;

const PROFILE = `export PATH=/sbin:/usr/sbin:/bin:/usr/bin
export PS1='partis-guest:\\w# '
`;

function guestFiles(): CpioEntry[] {
  const text = (s: string): Buffer => Buffer.from(s, "utf8");
  return [
    { kind: "file", path: "init", data: text(INIT), mode: 0o755 },
    { kind: "file", path: "etc/inittab", data: text(INITTAB) },
    { kind: "file", path: "etc/rc", data: text(RC), mode: 0o755 },
    { kind: "file", path: "etc/rc.shutdown", data: text(RC_SHUTDOWN), mode: 0o755 },
    { kind: "file", path: "etc/acpi/PWRF/00000080", data: text(ACPI_POWER), mode: 0o755 },
    { kind: "file", path: "etc/profile", data: text(PROFILE) },
    { kind: "file", path: "etc/passwd", data: text("root:x:0:0:root:/root:/bin/sh\n") },
    { kind: "file", path: "etc/group", data: text("root:x:0:\n") },
    { kind: "file", path: "etc/hostname", data: text("partis-guest\n") },
  ];
}

/**
 * Downloads (once) the Debian kernel and busybox-static and builds (once per
 * content) the default guest initramfs. Returns absolute paths in the cache.
 */
export async function prepareDefaultGuest(opts: PrepareDefaultGuestOptions = {}): Promise<DefaultGuest> {
  const cacheDir = opts.cacheDir ?? defaultCacheDir();
  const log = opts.log ?? ((): void => {});
  const modules = opts.modules ?? DEFAULT_GUEST_MODULES;
  const kernel = await prepareDebianKernel(cacheDir, log, opts.kernelPackage);
  const busybox = await prepareBusybox(cacheDir, log);
  const files = guestFiles();
  const key = createHash("sha256")
    .update(JSON.stringify({ v: GUEST_LAYOUT_VERSION, k: kernel.package, b: busybox.version, m: [...modules].sort(), f: files.map((f) => [f.path, f.kind === "file" ? Buffer.from(f.data).toString("base64") : ""]) }))
    .digest("hex")
    .slice(0, 16);
  const entry = join(cacheDir, "initramfs", `default-guest-${kernel.kernelVersion}-${key}`);
  await ensureCacheEntry(entry, async (tmp) => {
    log(`building default guest initramfs (${modules.join(", ")})`);
    const index = await loadModuleIndex(kernel.modulesDir, kernel.kernelVersion);
    const plan = planModuleLoad(index, modules);
    await writeFile(join(tmp, "initrd.cpio.gz"), await buildInitramfs({ busybox: busybox.path, modules: { index, plan }, files }));
    await writeFile(join(tmp, "modules.txt"), [...plan.load.map((m) => m.path), ...plan.builtin.map((b) => `builtin: ${b}`)].join("\n") + "\n");
  });
  // The kernel unpacked on the host as well (partis run's default, --kernel-unpack auto), so no boot pays for it.
  await unpackKernel(kernel.kernel, { cacheDir, log });
  return { kernel: kernel.kernel, initrd: join(entry, "initrd.cpio.gz"), modulesDir: kernel.modulesDir, kernelVersion: kernel.kernelVersion };
}
