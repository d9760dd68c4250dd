/**
 * In-guest disk benchmark: the same guest program, on the same kind of raw
 * image, through Partis's virtio-blk, Partis's IDE with bus-master DMA,
 * Partis's IDE in PIO mode, QEMU's virtio-blk and QEMU's IDE (DMA), side by
 * side in one run, with the same kernel, initramfs and guest command.
 *
 * The guest program (bench/devices/guest-diskbench.c, built with
 * `gcc -static -O2` and appended to a copy of the default guest's initramfs
 * as a second gzip'ed newc cpio member by test/guest/guest-tools.ts, cached
 * in .cache/guest-tools) opens the disk with O_DIRECT and runs,
 * at queue depth 1: 1 MiB sequential writes, 1 MiB sequential reads of the
 * same range, 4 KiB random reads inside it; then 4 KiB random reads with
 * --queue-depth (32) in flight through Linux AIO, fio's usual random-read
 * set-up: the case where a device with a request queue (virtio) and one with
 * a single command slot (PIIX IDE, no NCQ) differ by design. Reads are
 * checked against the offsets stamped by the writes. Timing is the guest's
 * CLOCK_MONOTONIC.
 *
 * Host CPU: utime+stime of the VMM process (Partis: the `partis run`
 * process, which hosts the VM; QEMU: the qemu process), sampled from /proc/<pid>/stat when each
 * pattern starts and ends (the guest prints a line on its serial console).
 * That total includes the vCPU's time in the guest; "VMM" columns subtract
 * guest_time (field 43), leaving the VMM's own user+kernel work.
 *
 * Equal footing: 1 vCPU, 512 MiB, the image is a fresh raw file per
 * run in --dir (default: os.tmpdir(), which is a private tmpfs inside the
 * nested test host, so neither VMM goes through 9p), opened buffered by both
 * (QEMU cache=writeback, its default; Partis opens raw files buffered).
 * Configurations are interleaved per repetition; medians over --runs.
 * PIO mode is `libata.force=pio4` on the kernel command line; the mode the
 * guest's libata reports is checked (a PIO run that came up in a DMA mode is
 * reported as such). The PIO run reads at most --pio-seq-mib MiB and
 * --pio-random-ops blocks, and writes only --pio-write-kib KiB in 16 KiB
 * requests (rates, not totals, are compared): KVM's instruction emulator
 * batches `rep insw` (reads) but hands `rep outsw` to user space one word
 * per exit, so a 1 MiB PIO write is 512 Ki exits; in the nested host that
 * is minutes, far past libata's 30 s command timeout (measured there:
 * ~0.1 ms per word for QEMU, ~0.9 ms for Partis).
 *
 * The image's first SEQ MiB are stamped by this script before each run
 * (offset + a per-run nonce at the head of every 4 KiB block, the layout the
 * guest program writes), so every read is checked against known data and
 * reads never hit a sparse hole.
 *
 * On a PVM host run it inside the nested test host (the default guest and the
 * guest program must be prepared outside first: the nested host has no
 * network and builds under TCG are slow):
 *   npx tsc -p . && node dist/bench/devices/guest-disk.js --prepare &&
 *   node dist/partis/partis.js host nested -- node dist/bench/devices/guest-disk.js [--quick] [--runs N]
 * A full run (2 runs of 5 paths, each with its warm-up pass) takes about 11
 * minutes there, --quick about 3.
 *
 * Options: --quick (smaller sizes, one run), --runs N (2), --passes N (1:
 * measured passes per boot; figures are medians over all passes, and with
 * --runs > 1 each run's two VMMs are also compared run by run),
 * --seq-mib N (64),
 * --random-ops N (2000), --pio-seq-mib N (4), --pio-random-ops N (300),
 * --pio-write-kib N (64), --random-seconds N (15: each random pattern stops
 * there; slow paths do fewer) (--quick: 16, 500, 1, 100, 16, 6),
 * --queue-depth N (32) and --queued-ops N (8000; --quick: 2000; PIO: as
 * many as its queue-depth-1 random reads) for the queued random reads,
 * --warmup-mib N (16; --quick: 4; 0: none) and --warmup-random-ops N (2000;
 * --quick: 500): the unmeasured warm-up pass each run makes first (see
 * warmupMiB below; its figures go to stderr),
 * --baseline-cli PATH (also run Partis virtio-blk from another build's
 * dist/partis/partis.js, interleaved: an A/B of two commits),
 * --image-mib N (256), --only NAME[,NAME] (partis-virtio, partis-ide-dma,
 * partis-ide-pio, qemu-virtio, qemu-ide-dma; only when named or with --all:
 * qemu-ide-pio, qemu-virtio-memfd (QEMU's RAM in a memfd, as Partis's is),
 * partis-virtio-v8st (`node --single-threaded`), partis-virtio-native and
 * partis-ide-pio-native (`--vcpu-threads native`), partis-virtio-packed and
 * qemu-virtio-packed (packed virtqueues: `--disk IMG,packed`, `packed=on`),
 * partis-virtio-vhdx and qemu-virtio-vhdx (the stamped image converted to a
 * dynamic VHDX by qemu-img; with --baseline-cli also the baseline build on
 * it), partis-virtio-native-main and
 * partis-ide-pio-native-main (`--vcpu-threads native-main`), partis-virtio-worker
 * (`--vcpu-threads worker`), partis-virtio-limited and qemu-virtio-limited
 * (rate limits: `--disk IMG,iops=300,mbps=40`, QEMU's `iops=300,bps=40 MiB`)),
 * --all, --dir D, --timeout S (300),
 * Partis's default rows run `--vcpu-threads auto`: native-main for the
 * virtio-blk guest, a worker per vCPU for the IDE guests (vcpuThreadsFor),
 * --prepare (build the guest program and initramfs, then exit),
 * Environment: PARTIS_BENCH_THREADS=1 (per-thread CPU per pattern),
 * PARTIS_STATS=1 (the VMM's own counters), PARTIS_BENCH_LOG=DIR (each run's
 * whole VMM output), PARTIS_BENCH_NODE_FLAGS="..." (node/V8 flags for the
 * Partis paths, e.g. --trace-opt to see what the JIT compiles when).
 * --guest-command NAME (print that configuration's guest shell command).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { randomInt } from "node:crypto";
import { closeSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, ftruncateSync, writeFileSync, writeSync } from "node:fs";
import { cpus as hostCpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { guestRunOption, prepareDefaultGuest } from "../../src/images/default-guest.js";
import { cpuOf, threadCpuOf } from "./process-cpu.js";
import { buildStaticTool, initrdWith } from "../../test/guest/guest-tools.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const REPO = fileURLToPath(new URL("../../../", import.meta.url));
const SOURCE = join(REPO, "bench/devices/guest-diskbench.c");
const QEMU = "/usr/bin/qemu-system-x86_64";
const MEMORY = "512M";
const BASE_APPEND = "console=ttyS0 panic=-1 quiet";
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

const args = process.argv.slice(2);
const flag = (name: string): boolean => args.includes(name);
const value = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const num = (name: string, dflt: number): number => {
  const v = value(name);
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${name} wants a positive integer, got ${v}`);
  return n;
};
const quick = flag("--quick");
const runs = num("--runs", quick ? 1 : 2);
const seqMiB = num("--seq-mib", quick ? 16 : 64);
const randomOps = num("--random-ops", quick ? 500 : 2000);
const pioSeqMiB = Math.min(seqMiB, num("--pio-seq-mib", quick ? 1 : 4));
const pioRandomOps = Math.min(randomOps, num("--pio-random-ops", quick ? 100 : 300));
/** PIO writes: total KiB, in 16 KiB requests (see the module comment). */
const pioWriteKiB = Math.min(pioSeqMiB * 1024, num("--pio-write-kib", quick ? 16 : 64));
const PIO_WRITE_REQUEST_KIB = 16;
if (pioWriteKiB % PIO_WRITE_REQUEST_KIB !== 0) throw new Error(`--pio-write-kib must be a multiple of ${PIO_WRITE_REQUEST_KIB}`);
const randomSeconds = num("--random-seconds", quick ? 6 : 15);
const queueDepth = num("--queue-depth", 32);
const queuedOps = num("--queued-ops", quick ? 2000 : 8000);
/**
 * Measured passes per boot: the guest runs the measured patterns this many
 * times in a row (after the one warm-up pass). A boot costs far more than a
 * pass in the nested host, so more passes per boot give more samples per
 * minute; the figures are medians over every pass of every run.
 */
const passes = num("--passes", 1);
const imageMiB = num("--image-mib", 256);
/**
 * A warm-up pass in the guest before the measured one (the same program, its
 * lines relabelled WARMUP): a VMM with a JIT (Partis) compiles its hot paths
 * during its first few thousand requests, a cost a long-running VM pays once.
 * Both VMMs get it; --warmup-mib 0 measures cold.
 */
const warmupMiB = (() => {
  const v = value("--warmup-mib");
  const n = v === undefined ? (quick ? 4 : 16) : Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`--warmup-mib wants a non-negative integer, got ${v}`);
  return Math.min(n, seqMiB);
})();
const WARMUP_RANDOM_OPS = num("--warmup-random-ops", quick ? 500 : 2000);
const timeoutMs = num("--timeout", 300) * 1000;
if (seqMiB > imageMiB) throw new Error(`--seq-mib ${seqMiB} is larger than --image-mib ${imageMiB}`);

type Pattern = "seqwrite" | "seqread" | "randread" | "randreadq";

interface Config {
  readonly name: string;
  readonly label: string;
  readonly vmm: "partis" | "qemu";
  /** Guest block device the tool opens. */
  readonly device: string;
  readonly seqMiB: number;
  readonly randomOps: number;
  /** Queued random reads (randreadq) at --queue-depth. */
  readonly queuedOps: number;
  /** Sequential writes: total KiB and KiB per request (default seqMiB MiB in 1 MiB requests). */
  readonly write?: { readonly totalKiB: number; readonly requestKiB: number };
  /** Expect libata to report a PIO mode. */
  readonly pio?: boolean;
  readonly extraAppend?: string;
  /** Left out unless named by --only or --all. */
  readonly optional?: boolean;
  /** The image is a dynamic VHDX (qemu-img convert of the stamped raw image) instead of the raw file. */
  readonly vhdx?: boolean;
  readonly argv: (kernel: string, initrd: string, append: string, image: string) => { command: string; argv: string[] };
}

interface PatternResult {
  mibPerS: number;
  iops: number;
  ms: number;
  bytes: number;
  ops: number;
  errors: number;
  /** VMM process CPU seconds (utime+stime) during the pattern; guest time included. */
  cpuS: number;
  /** The part of cpuS that was guest time. */
  guestS: number;
}

/** One measured pass of the guest tool: its patterns and the flush after its writes. */
interface PassResult {
  readonly patterns: Partial<Record<Pattern, PatternResult>>;
  flushMs: number | undefined;
}

/** One boot of a configuration: its measured passes (--passes), in order. */
interface RunResult {
  /** Which repetition (1-based): pairs configurations run back to back. */
  readonly run: number;
  readonly passes: readonly PassResult[];
  readonly mode: string;
  /** The guest block queue's limits (max_sectors_kb, max_segments, max_segment_size). */
  readonly queue: string;
  readonly wallMs: number;
  /** The warm-up pass's figures, for the record (cold JIT on Partis). */
  readonly warmup: readonly string[];
}

/** PARTIS_BENCH_NODE_FLAGS="--flag ...": node/V8 flags for every Partis path (experiments: --trace-opt, --no-opt, ...). */
const EXTRA_NODE_FLAGS = (process.env.PARTIS_BENCH_NODE_FLAGS ?? "").split(" ").filter((f) => f !== "");

const partisArgv =
  (iface: "virtio" | "virtio,packed" | "ide" | `virtio,${string}`, nodeFlags: readonly string[] = [], cli = CLI, runFlags: readonly string[] = []) =>
  (kernel: string, initrd: string, append: string, image: string): { command: string; argv: string[] } => ({
    command: process.execPath,
    argv: [...nodeFlags, ...EXTRA_NODE_FLAGS, cli, "run", "--kernel", kernel, "--initrd", initrd, "--append", append, "--memory", MEMORY, "--cpus", "1", "--disk", `${image},if=${iface}`, ...runFlags],
  });

/** The limits of the -limited rows. */
const LIMIT_IOPS = 300;
const LIMIT_MIBPS = 40;

const NATIVE_VCPU = ["--vcpu-threads", "native"] as const;
const NATIVE_MAIN_VCPU = ["--vcpu-threads", "native-main"] as const;
const WORKER_VCPU = ["--vcpu-threads", "worker"] as const;

const qemuCommon = (kernel: string, initrd: string, append: string): string[] => [
  "-enable-kvm", "-cpu", "host", "-m", MEMORY, "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
  "-kernel", kernel, "-initrd", initrd, "-append", append,
];

const CONFIGS: readonly Config[] = [
  { name: "partis-virtio", label: "Partis virtio-blk", vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, argv: partisArgv("virtio") },
  { name: "partis-ide-dma", label: "Partis IDE (BM-DMA)", vmm: "partis", device: "/dev/sda", seqMiB, randomOps, queuedOps, argv: partisArgv("ide") },
  {
    name: "partis-ide-pio", label: "Partis IDE (PIO)", vmm: "partis", device: "/dev/sda", seqMiB: pioSeqMiB, randomOps: pioRandomOps, queuedOps: pioRandomOps, pio: true,
    write: { totalKiB: pioWriteKiB, requestKiB: PIO_WRITE_REQUEST_KIB },
    extraAppend: "libata.force=pio4", argv: partisArgv("ide"),
  },
  {
    name: "qemu-virtio", label: "QEMU virtio-blk (q35)", vmm: "qemu", device: "/dev/vda", seqMiB, randomOps, queuedOps,
    argv: (k, i, a, img) => ({
      command: QEMU,
      argv: ["-M", "q35", ...qemuCommon(k, i, a), "-drive", `file=${img},if=none,format=raw,cache=writeback,id=d0`, "-device", "virtio-blk-pci,drive=d0"],
    }),
  },
  {
    // Packed virtqueues offered (the guest's virtio_ring takes them), against QEMU's packed=on below.
    name: "partis-virtio-packed", label: "Partis virtio-blk, packed virtqueues", vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: partisArgv("virtio,packed"),
  },
  {
    name: "qemu-virtio-packed", label: "QEMU virtio-blk (q35), packed=on", vmm: "qemu", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: (k, i, a, img) => ({
      command: QEMU,
      argv: ["-M", "q35", ...qemuCommon(k, i, a), "-drive", `file=${img},if=none,format=raw,cache=writeback,id=d0`, "-device", "virtio-blk-pci,drive=d0,packed=on"],
    }),
  },
  {
    // The same guest on a dynamic VHDX (the stamped range allocated, the rest not): the image format Hyper-V users bring.
    name: "partis-virtio-vhdx", label: "Partis virtio-blk, dynamic VHDX", vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true, vhdx: true,
    argv: partisArgv("virtio"),
  },
  {
    name: "qemu-virtio-vhdx", label: "QEMU virtio-blk (q35), dynamic VHDX", vmm: "qemu", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true, vhdx: true,
    argv: (k, i, a, img) => ({
      command: QEMU,
      argv: ["-M", "q35", ...qemuCommon(k, i, a), "-drive", `file=${img},if=none,format=vhdx,cache=writeback,id=d0`, "-device", "virtio-blk-pci,drive=d0"],
    }),
  },
  {
    // Rate limits (Hyper-V Storage QoS, Proxmox's iops/mbps): 300 operations and 40 MiB per second, against QEMU's own throttling.
    name: "partis-virtio-limited", label: `Partis virtio-blk, iops=${LIMIT_IOPS},mbps=${LIMIT_MIBPS}`, vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: partisArgv(`virtio,iops=${LIMIT_IOPS},mbps=${LIMIT_MIBPS}`),
  },
  {
    name: "qemu-virtio-limited", label: `QEMU virtio-blk (q35), iops=${LIMIT_IOPS},bps=${LIMIT_MIBPS} MiB`, vmm: "qemu", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: (k, i, a, img) => ({
      command: QEMU,
      argv: ["-M", "q35", ...qemuCommon(k, i, a), "-drive", `file=${img},if=none,format=raw,cache=writeback,id=d0,iops=${LIMIT_IOPS},bps=${LIMIT_MIBPS * 1024 * 1024}`, "-device", "virtio-blk-pci,drive=d0"],
    }),
  },
  {
    // The vCPU on a native thread, its exits handled by another (--vcpu-threads native): what an exit-bound path costs then.
    name: "partis-virtio-native", label: "Partis virtio-blk, --vcpu-threads native", vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: partisArgv("virtio", [], CLI, NATIVE_VCPU),
  },
  {
    name: "partis-ide-pio-native", label: "Partis IDE (PIO), --vcpu-threads native", vmm: "partis", device: "/dev/sda", seqMiB: pioSeqMiB, randomOps: pioRandomOps, queuedOps: pioRandomOps, pio: true,
    write: { totalKiB: pioWriteKiB, requestKiB: PIO_WRITE_REQUEST_KIB },
    extraAppend: "libata.force=pio4", optional: true, argv: partisArgv("ide", [], CLI, NATIVE_VCPU),
  },
  {
    // The same, its exits handled by the VM's main thread (--vcpu-threads native-main: no vCPU isolate).
    name: "partis-virtio-native-main", label: "Partis virtio-blk, --vcpu-threads native-main", vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: partisArgv("virtio", [], CLI, NATIVE_MAIN_VCPU),
  },
  {
    name: "partis-ide-pio-native-main", label: "Partis IDE (PIO), --vcpu-threads native-main", vmm: "partis", device: "/dev/sda", seqMiB: pioSeqMiB, randomOps: pioRandomOps, queuedOps: pioRandomOps, pio: true,
    write: { totalKiB: pioWriteKiB, requestKiB: PIO_WRITE_REQUEST_KIB },
    extraAppend: "libata.force=pio4", optional: true, argv: partisArgv("ide", [], CLI, NATIVE_MAIN_VCPU),
  },
  {
    // A Node worker per vCPU (--vcpu-threads worker; auto picks native-main for this guest).
    name: "partis-virtio-worker", label: "Partis virtio-blk, --vcpu-threads worker", vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: partisArgv("virtio", [], CLI, WORKER_VCPU),
  },
  {
    // Partis with V8's background threads idle (experiment: what does their CPU buy?).
    name: "partis-virtio-v8st", label: "Partis virtio-blk, node --single-threaded", vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: partisArgv("virtio", ["--single-threaded"]),
  },
  {
    // QEMU with its guest RAM in a memfd, as Partis's is (experiment: how much of the gap is the RAM's backing?).
    name: "qemu-virtio-memfd", label: "QEMU virtio-blk (q35, memfd RAM)", vmm: "qemu", device: "/dev/vda", seqMiB, randomOps, queuedOps, optional: true,
    argv: (k, i, a, img) => ({
      command: QEMU,
      argv: ["-M", "q35,memory-backend=ram0", "-object", `memory-backend-memfd,id=ram0,size=${MEMORY}`, ...qemuCommon(k, i, a), "-drive", `file=${img},if=none,format=raw,cache=writeback,id=d0`, "-device", "virtio-blk-pci,drive=d0"],
    }),
  },
  {
    name: "qemu-ide-dma", label: "QEMU IDE (pc, BM-DMA)", vmm: "qemu", device: "/dev/sda", seqMiB, randomOps, queuedOps,
    argv: (k, i, a, img) => ({ command: QEMU, argv: ["-M", "pc", ...qemuCommon(k, i, a), "-drive", `file=${img},if=ide,format=raw,cache=writeback`] }),
  },
  {
    name: "qemu-ide-pio", label: "QEMU IDE (pc, PIO)", vmm: "qemu", device: "/dev/sda", seqMiB: pioSeqMiB, randomOps: pioRandomOps, queuedOps: pioRandomOps, pio: true,
    write: { totalKiB: pioWriteKiB, requestKiB: PIO_WRITE_REQUEST_KIB },
    extraAppend: "libata.force=pio4", optional: true,
    argv: (k, i, a, img) => ({ command: QEMU, argv: ["-M", "pc", ...qemuCommon(k, i, a), "-drive", `file=${img},if=ide,format=raw,cache=writeback`] }),
  },
];

// ---------------------------------------------------------------- preparation

/** The warm-up pass: the same patterns, smaller (PIO: 1 MiB read, 16 KiB written), reported as WARMUP lines. */
function warmupCommand(c: Config, nonce: number): string {
  const mib = c.pio === true ? 1 : warmupMiB;
  const writeKiB = Math.min(c.write?.totalKiB ?? mib * 1024, c.pio === true ? 16 : mib * 1024);
  const ops = Math.min(c.randomOps, c.pio === true ? 50 : WARMUP_RANDOM_OPS);
  const queued = Math.min(c.queuedOps, c.pio === true ? 50 : WARMUP_RANDOM_OPS);
  return `/bin/diskbench $d ${mib} ${ops} ${nonce} ${writeKiB} ${c.write?.requestKiB ?? 1024} ${randomSeconds * 1000} ${queueDepth} ${queued} | sed 's/^DISKBENCH/WARMUP/'`;
}

/**
 * The guest's command: apply libata.* options, wait for the disk, report the
 * ATA transfer mode, run the tool, power off.
 *
 * The default guest loads its modules with busybox insmod, which (unlike
 * modprobe) does not pass `module.param=` options from the kernel command
 * line, so `libata.force=` would be ignored: when present, libata and
 * ata_piix are reloaded here with it before the disk is used.
 */
function guestCommand(c: Config, nonce: number): string {
  return [
    `f=$(sed -n 's/.*libata[.]force=\\([^ ]*\\).*/\\1/p' /proc/cmdline)`,
    `if [ -n "$f" ]; then`,
    `  rmmod ata_piix libata`,
    `  insmod /lib/modules/$(grep '/libata[.]ko' /lib/modules/load-order) force=$f && insmod /lib/modules/$(grep '/ata_piix[.]ko' /lib/modules/load-order) || echo "DISKBENCH-FAIL reloading libata with force=$f"`,
    `  echo "DISKBENCH-NOTE libata reloaded with force=$f"`,
    `fi`,
    `d=${c.device}; i=0`,
    `while [ ! -b $d ] && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done`,
    `for a in /sys/class/ata_device/*; do [ "$(cat $a/class 2>/dev/null)" = ata ] && echo "DISKBENCH-XFER \${a##*/} $(cat $a/xfer_mode)"; done`,
    `dmesg | grep -E 'ata[0-9.]+: FORCE' | sed 's/^/DISKBENCH-DMESG /'`,
    `q=/sys/block/\${d#/dev/}/queue; echo "DISKBENCH-QUEUE max_sectors_kb=$(cat $q/max_sectors_kb) max_segments=$(cat $q/max_segments) max_segment_size=$(cat $q/max_segment_size)"`,
    ...(warmupMiB > 0 ? [warmupCommand(c, nonce)] : []),
    `k=0; r=0`,
    `while [ $k -lt ${passes} ] && [ $r = 0 ]; do /bin/diskbench $d ${c.seqMiB} ${c.randomOps} ${nonce} ${c.write?.totalKiB ?? c.seqMiB * 1024} ${c.write?.requestKiB ?? 1024} ${randomSeconds * 1000} ${queueDepth} ${c.queuedOps}; r=$?; k=$((k+1)); done`,
    `echo DISKBENCH-EXIT $r`,
    `poweroff -f`,
  ].join("\n");
}

// ---------------------------------------------------------------- measurement

function childPids(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const t of readdirSync(`/proc/${pid}/task`)) {
      try {
        out.push(...readFileSync(`/proc/${pid}/task/${t}/children`, "utf8").trim().split(/\s+/).filter(Boolean).map(Number));
      } catch {}
    }
  } catch {}
  return out;
}

function descendants(pid: number): number[] {
  const out: number[] = [];
  const stack = [pid];
  while (stack.length > 0) {
    for (const c of childPids(stack.pop()!)) {
      out.push(c);
      stack.push(c);
    }
  }
  return out;
}

function threadCpuDelta(
  a: Map<number, { comm: string; total: number; guest: number }>,
  b: Map<number, { comm: string; total: number; guest: number }>,
): string {
  const rows: string[] = [];
  for (const [tid, e] of b) {
    const s = a.get(tid);
    const total = e.total - (s?.total ?? 0);
    const guest = e.guest - (s?.guest ?? 0);
    if (total >= 0.05) rows.push(`${tid}(${e.comm})=${total.toFixed(2)}s${guest > 0 ? ` guest ${guest.toFixed(2)}s` : ""}`);
  }
  return rows.join(" ");
}

/**
 * KVM's own counters of the VMM's VM (PARTIS_BENCH_THREADS=1, when
 * debugfs is mounted: /sys/kernel/debug/kvm/<pid>-<fd>/<counter>, summed
 * over the VM's vCPUs by KVM): where a vCPU thread's non-guest time goes (exits to
 * user space, halt polling), the same for both VMMs.
 */
const KVM_COUNTERS = ["exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "halt_successful_poll", "halt_attempted_poll", "halt_poll_success_ns", "halt_poll_fail_ns", "halt_wait_ns", "irq_injections", "nmi_window_exits", "signal_exits"] as const;
function kvmCountersOf(pid: number): Map<string, number> {
  const out = new Map<string, number>();
  let vms: string[] = [];
  try {
    vms = readdirSync("/sys/kernel/debug/kvm").filter((d) => d.startsWith(`${pid}-`));
  } catch {
    return out;
  }
  for (const vm of vms)
    for (const k of KVM_COUNTERS) {
      try {
        out.set(k, (out.get(k) ?? 0) + Number(readFileSync(`/sys/kernel/debug/kvm/${vm}/${k}`, "utf8").trim()));
      } catch {}
    }
  return out;
}

function kvmCounterDelta(a: Map<string, number>, b: Map<string, number>): string {
  const rows: string[] = [];
  for (const [k, v] of b) {
    const d = v - (a.get(k) ?? 0);
    if (d !== 0) rows.push(k.endsWith("_ns") ? `${k.slice(0, -3)}=${(d / 1e6).toFixed(1)}ms` : `${k}=${d}`);
  }
  return rows.join(" ");
}

function killTree(child: ChildProcess): void {
  const pids = [...descendants(child.pid!), child.pid!];
  for (const p of pids) {
    try {
      process.kill(p, "SIGKILL");
    } catch {}
  }
}

/**
 * A fresh raw image of --image-mib MiB: the first `stampMiB` MiB written,
 * each 4 KiB block starting with its offset and `nonce` (the layout the guest
 * program writes and checks), the rest sparse.
 */
function createImage(path: string, stampMiB: number, nonce: number): void {
  const chunk = Buffer.alloc(MiB);
  const fd = openSync(path, "w");
  try {
    for (let off = 0; off < stampMiB * MiB; off += MiB) {
      for (let b = 0; b < MiB; b += 4096) {
        chunk.writeBigUInt64LE(BigInt(off + b), b);
        chunk.writeBigUInt64LE(BigInt(nonce), b + 8);
      }
      writeSync(fd, chunk, 0, MiB, off);
    }
    ftruncateSync(fd, imageMiB * MiB);
  } finally {
    closeSync(fd);
  }
}

class RunFailure extends Error {
  constructor(message: string, readonly consoleTail: string) {
    super(message);
  }
}

function once(c: Config, run: number, kernel: string, initrd: string, dir: string): Promise<RunResult> {
  const nonce = randomInt(1, 2 ** 47);
  const image = c.vhdx === true ? join(dir, `${c.name}.vhdx`) : join(dir, `${c.name}.img`);
  if (c.vhdx === true) {
    const raw = join(dir, `${c.name}.raw`);
    createImage(raw, c.seqMiB, nonce);
    const conv = spawnSync("qemu-img", ["convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic", raw, image], { encoding: "utf8" });
    rmSync(raw, { force: true });
    if (conv.status !== 0) throw new Error(`qemu-img convert to VHDX failed: ${conv.stderr ?? conv.error?.message}`);
  } else createImage(image, c.seqMiB, nonce);
  const append = [BASE_APPEND, c.extraAppend, guestRunOption(guestCommand(c, nonce))].filter(Boolean).join(" ");
  const { command, argv } = c.argv(kernel, initrd, append, image);
  return new Promise<RunResult>((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(command, argv, { stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let pending = "";
    let vmmPid: number | undefined;
    const passResults: PassResult[] = [];
    // The pass a pattern line belongs to: a pattern seen twice starts the next pass.
    const passFor = (p: Pattern): PassResult => {
      const last = passResults[passResults.length - 1];
      if (last !== undefined && last.patterns[p] === undefined) return last;
      const next: PassResult = { patterns: {}, flushMs: undefined };
      passResults.push(next);
      return next;
    };
    const starts: Partial<Record<Pattern, { total: number; guest: number }>> = {};
    const threadStarts: Partial<Record<Pattern, Map<number, { comm: string; total: number; guest: number }>>> = {};
    const kvmStarts: Partial<Record<Pattern, Map<string, number>>> = {};
    const perThread = process.env.PARTIS_BENCH_THREADS === "1";
    const xfer: string[] = [];
    let queue = "";
    const warmup: string[] = [];
    let finished = false;
    const finish = (err?: RunFailure): void => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      const wallMs = Number(process.hrtime.bigint() - t0) / 1e6;
      // The guest powers itself off; give it a moment, then make sure.
      const grace = setTimeout(() => killTree(child), err ? 0 : 3000);
      const settle = (): void => {
        clearTimeout(grace);
        if (process.env.PARTIS_STATS === "1") for (const l of out.split("\n")) if (l.startsWith("partis-vm:")) console.log(`[stats] ${c.name} ${l}`);
        // PARTIS_BENCH_LOG=<dir>: the VMM's whole output (console, stats, V8 traces) per run.
        const logDir = process.env.PARTIS_BENCH_LOG;
        if (logDir !== undefined && logDir !== "") writeFileSync(`${logDir}/${c.name}-${Date.now()}.log`, out);
        rmSync(image, { force: true });
        if (err) reject(err);
        else resolve({ run, passes: passResults, mode: xfer.join("; "), queue, wallMs, warmup });
      };
      if (child.exitCode !== null || child.signalCode !== null) settle();
      else child.once("exit", settle);
    };
    const timer = setTimeout(() => {
      const failure = (): void => finish(new RunFailure(`no result after ${timeoutMs / 1000} s`, out));
      if (c.vmm !== "partis" || child.exitCode !== null || child.signalCode !== null) return failure();
      // What the stuck VM waits for goes into its output (and PARTIS_BENCH_LOG) first: `partis run`
      // writes every vCPU's registers and every device's state on SIGQUIT.
      child.kill("SIGQUIT");
      setTimeout(failure, 3000);
    }, timeoutMs);
    const vmm = (): number | undefined => {
      // Both VMMs run the VM in the process started here (`partis run` hosts its VM itself).
      if (vmmPid === undefined) vmmPid = child.pid;
      return vmmPid;
    };
    const sample = (): { total: number; guest: number } => {
      const p = vmm();
      if (p === undefined) throw new RunFailure("the VMM process is gone", out);
      return cpuOf(p);
    };
    const onLine = (line: string): void => {
      let m: RegExpExecArray | null;
      try {
        if ((m = /^DISKBENCH-START (\w+)/.exec(line))) {
          starts[m[1] as Pattern] = sample();
          if (perThread) {
            threadStarts[m[1] as Pattern] = threadCpuOf(vmm()!);
            kvmStarts[m[1] as Pattern] = kvmCountersOf(vmm()!);
          }
        }
        else if ((m = /^DISKBENCH (seqwrite|seqread|randreadq|randread) MiB\/s=\S+ IOPS=\S+ ms=([\d.]+) bytes=(\d+) ops=(\d+) errors=(\d+)/.exec(line))) {
          const p = m[1] as Pattern;
          const end = sample();
          const st = starts[p] ?? end;
          const ts = threadStarts[p];
          if (ts !== undefined) console.log(`[threads] ${c.name} ${p}: ${threadCpuDelta(ts, threadCpuOf(vmm()!))}`);
          const ks = kvmStarts[p];
          if (ks !== undefined && ks.size > 0) console.log(`[kvm] ${c.name} ${p}: ${kvmCounterDelta(ks, kvmCountersOf(vmm()!))}`);
          const ms = Number(m[2]);
          const bytes = Number(m[3]);
          const ops = Number(m[4]);
          passFor(p).patterns[p] = {
            mibPerS: bytes / MiB / (ms / 1000), iops: ops / (ms / 1000), ms, bytes, ops, errors: Number(m[5]),
            cpuS: end.total - st.total, guestS: end.guest - st.guest,
          };
        } else if ((m = /^DISKBENCH flush ms=([\d.]+)/.exec(line))) {
          // Printed after its pass's seqwrite line.
          const last = passResults[passResults.length - 1];
          if (last !== undefined) last.flushMs = Number(m[1]);
        }
        else if ((m = /^DISKBENCH-XFER (\S+) (.*)$/.exec(line))) xfer.push(`${m[1]} ${m[2]}`);
        else if ((m = /^DISKBENCH-QUEUE (.*)$/.exec(line))) queue = m[1]!.trim();
        else if ((m = /^DISKBENCH-DMESG .*?(ata[\d.]+: FORCE.*)$/.exec(line))) xfer.push(m[1]!.trim());
        else if (line.startsWith("DISKBENCH-FAIL")) finish(new RunFailure(line, out));
        else if ((m = /^DISKBENCH-EXIT (\d+)/.exec(line))) {
          if (m[1] !== "0") finish(new RunFailure(`guest tool exited with status ${m[1]}`, out));
          else finish();
        }
      } catch (e) {
        finish(e instanceof RunFailure ? e : new RunFailure(String(e), out));
      }
    };
    const onData = (d: Buffer): void => {
      const s = d.toString("latin1");
      out += s;
      if (out.length > 200_000) out = out.slice(-100_000);
      pending += s;
      let nl: number;
      while ((nl = pending.indexOf("\n")) >= 0) {
        const line = pending.slice(0, nl).replace(/\r/g, "");
        pending = pending.slice(nl + 1);
        const at = line.indexOf("DISKBENCH");
        if (at >= 0) onLine(line.slice(at));
        const w = /WARMUP (seqwrite|seqread|randreadq|randread) MiB\/s=(\S+) IOPS=(\S+)/.exec(line);
        if (w !== null) warmup.push(w[1]!.startsWith("randread") ? `${w[1]} ${Number(w[3]).toFixed(0)} IOPS` : `${w[1]} ${Number(w[2]).toFixed(1)} MiB/s`);
        if (line.includes("WARMUP-FAIL")) finish(new RunFailure(line, out));
      }
    };
    child.stdout!.on("data", onData);
    child.stderr!.on("data", (d: Buffer) => {
      out += d.toString("latin1");
    });
    child.on("exit", (code, signal) => {
      if (!finished) finish(new RunFailure(`${c.vmm} exited (${signal ?? `status ${code}`}) before the benchmark finished`, out));
    });
    child.on("error", (e) => finish(new RunFailure(e.message, out)));
  });
}

// ---------------------------------------------------------------- report

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const fmt = (x: number | undefined, digits = 1): string =>
  x === undefined || !Number.isFinite(x) ? "n/a" : x !== 0 && Math.abs(x) < 1 ? x.toPrecision(2) : x.toFixed(digits);

interface Summary {
  seqwrite?: number;
  seqread?: number;
  randIops?: number;
  randMiB?: number;
  /** Queued random reads (--queue-depth in flight): IOPS and VMM CPU µs per read. */
  queuedIops?: number;
  queuedCpuUs?: number;
  flushMs?: number;
  /** VMM CPU s per GiB moved (total, and without guest time), per sequential pattern. */
  writeCpu?: number;
  writeVmmCpu?: number;
  readCpu?: number;
  readVmmCpu?: number;
  /** VMM CPU µs per random read (total, and without guest time). */
  randCpuUs?: number;
  randVmmCpuUs?: number;
  errors: number;
  mode: string;
  queue: string;
}

function summarize(runs: RunResult[]): Summary {
  const rs = runs.flatMap((r) => r.passes);
  const pick = (p: Pattern, f: (x: PatternResult) => number): number | undefined => {
    const xs = rs.map((r) => r.patterns[p]).filter((x): x is PatternResult => x !== undefined).map(f);
    return xs.length ? median(xs) : undefined;
  };
  const perGiB = (cpu: number, x: PatternResult): number => cpu / (x.bytes / GiB);
  const flush = rs.map((r) => r.flushMs).filter((x): x is number => x !== undefined);
  return {
    seqwrite: pick("seqwrite", (x) => x.mibPerS),
    seqread: pick("seqread", (x) => x.mibPerS),
    randIops: pick("randread", (x) => x.iops),
    randMiB: pick("randread", (x) => x.mibPerS),
    queuedIops: pick("randreadq", (x) => x.iops),
    queuedCpuUs: pick("randreadq", (x) => (x.cpuS / x.ops) * 1e6),
    ...(flush.length ? { flushMs: median(flush) } : {}),
    writeCpu: pick("seqwrite", (x) => perGiB(x.cpuS, x)),
    writeVmmCpu: pick("seqwrite", (x) => perGiB(x.cpuS - x.guestS, x)),
    readCpu: pick("seqread", (x) => perGiB(x.cpuS, x)),
    readVmmCpu: pick("seqread", (x) => perGiB(x.cpuS - x.guestS, x)),
    randCpuUs: pick("randread", (x) => (x.cpuS / x.ops) * 1e6),
    randVmmCpuUs: pick("randread", (x) => ((x.cpuS - x.guestS) / x.ops) * 1e6),
    errors: rs.reduce((n, r) => n + Object.values(r.patterns).reduce((m, p) => m + (p?.errors ?? 0), 0), 0),
    mode: [...new Set(runs.map((r) => r.mode))].join(" | "),
    queue: [...new Set(runs.map((r) => r.queue))].join(" | "),
  };
}

function qemuVersion(): string {
  const r = spawnSync(QEMU, ["--version"], { encoding: "utf8" });
  return r.status === 0 ? r.stdout.split("\n")[0]!.trim() : "qemu version unknown";
}

async function main(): Promise<void> {
  const show = value("--guest-command");
  if (show !== undefined) {
    // Debugging aid: the guest shell command of one configuration.
    const c = CONFIGS.find((x) => x.name === show);
    if (c === undefined) throw new Error(`--guest-command ${show}: none of ${CONFIGS.map((x) => x.name).join(", ")}`);
    process.stdout.write(guestCommand(c, 1) + "\n");
    return;
  }
  const guest = await prepareDefaultGuest({ log: (l) => process.stderr.write(`guest-disk: ${l}\n`) });
  const initrd = initrdWith(guest.initrd, [{ name: "diskbench", path: buildStaticTool(SOURCE, "diskbench") }]);
  if (flag("--prepare")) {
    process.stderr.write(`guest-disk: prepared ${initrd}\n`);
    return;
  }
  if (!existsSync(QEMU)) throw new Error("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)");
  const only = value("--only")?.split(",");
  const selected = only ? CONFIGS.filter((c) => only.includes(c.name)) : CONFIGS.filter((c) => flag("--all") || c.optional !== true);
  // --baseline-cli: another build's CLI (e.g. a copy of the previous commit's dist/) on the virtio path, interleaved with this one.
  const baseline = value("--baseline-cli");
  const configs: Config[] =
    baseline === undefined
      ? selected
      : [
          ...selected,
          { name: "partis-virtio-baseline", label: `Partis virtio-blk, baseline build (${baseline})`, vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, argv: partisArgv("virtio", [], baseline) },
          ...(selected.some((c) => c.name === "partis-virtio-vhdx")
            ? [{ name: "partis-virtio-vhdx-baseline", label: `Partis virtio-blk, dynamic VHDX, baseline build (${baseline})`, vmm: "partis", device: "/dev/vda", seqMiB, randomOps, queuedOps, vhdx: true, argv: partisArgv("virtio", [], baseline) } satisfies Config]
            : []),
        ];
  if (configs.length === 0) throw new Error(`--only ${value("--only")}: none of ${CONFIGS.map((c) => c.name).join(", ")}`);
  const baseDir = value("--dir") ?? tmpdir();
  mkdirSync(baseDir, { recursive: true });
  const dir = mkdtempSync(join(baseDir, "partis-guest-disk-"));
  const results: Record<string, RunResult[]> = {};
  const failures: Record<string, { run: number; message: string; tail: string }[]> = {};
  try {
    for (let i = 0; i < runs; i++) {
      for (const c of configs) {
        try {
          const r = await once(c, i + 1, guest.kernel, initrd, dir);
          (results[c.name] ??= []).push(r);
          const perPass = r.passes
            .map((x) => `${fmt(x.patterns.seqwrite?.mibPerS)}/${fmt(x.patterns.seqread?.mibPerS)}/${fmt(x.patterns.randread?.iops, 0)}/${fmt(x.patterns.randreadq?.iops, 0)}`)
            .join(", ");
          process.stderr.write(
            `${c.name} run ${i + 1}: seqwrite/seqread MiB/s, randread/randreadq IOPS: ${perPass}` +
              ` (${(r.wallMs / 1000).toFixed(1)} s; ${r.mode || "no ATA device"}; ${r.queue})` +
              (r.warmup.length > 0 ? `; warm-up pass: ${r.warmup.join(", ")}` : "") + "\n",
          );
        } catch (e) {
          const message = e instanceof Error ? e.message : String(e);
          const tail = e instanceof RunFailure ? e.consoleTail.slice(-3000) : "";
          (failures[c.name] ??= []).push({ run: i + 1, message, tail });
          process.stderr.write(`${c.name} run ${i + 1}: FAILED (${message})\n`);
        }
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }

  const sums: Record<string, Summary> = {};
  for (const c of configs) if (results[c.name]) sums[c.name] = summarize(results[c.name]!);
  const qemuV = qemuVersion();
  console.log(`In-guest disk benchmark (${runs} run${runs > 1 ? "s" : ""} of ${passes} measured pass${passes > 1 ? "es" : ""} each; medians over all passes): O_DIRECT, queue depth 1 except the queued random reads (depth ${queueDepth}, Linux AIO), 1 vCPU, ${MEMORY}; image ${imageMiB} MiB raw, fresh per run in ${baseDir} (the range read stamped by the host, the rest sparse).`);
  console.log(
    (warmupMiB > 0
      ? `Each run first makes a warm-up pass in the same guest (${warmupMiB} MiB each way, ${WARMUP_RANDOM_OPS} random reads; PIO: 1 MiB read, 16 KiB written, 50 random reads), not measured; its figures are on stderr. `
      : "No warm-up pass (--warmup-mib 0): Partis's JIT compiles its hot paths inside the measured patterns. ") +
    `Sequential: ${seqMiB} MiB each way in 1 MiB requests (PIO: ${pioSeqMiB} MiB read, ${pioWriteKiB} KiB written in ${PIO_WRITE_REQUEST_KIB} KiB requests); random: up to ${randomOps} 4 KiB reads (PIO: ${pioRandomOps}) or ${randomSeconds} s, in the first ${seqMiB} MiB (PIO: ${pioSeqMiB} MiB); queued: up to ${queuedOps} reads (PIO: ${pioRandomOps}) or ${randomSeconds} s.`,
  );
  console.log("CPU = utime+stime of the VMM process (Partis: partis run; QEMU: qemu) while the pattern ran, guest time included; in parentheses without guest time.");
  console.log(`Host: ${hostCpus().length} CPUs (${hostCpus()[0]?.model ?? "?"}), load ${loadavg().map((x) => x.toFixed(1)).join(" / ")}, Node ${process.version}, ${qemuV}.`);
  console.log("");
  console.log(`| path | seq write MiB/s | seq read MiB/s | 4K rand read IOPS (MiB/s) | 4K rand read QD${queueDepth} IOPS | flush ms | CPU s/GiB write | CPU s/GiB read | CPU µs/rand read | CPU µs/rand read QD${queueDepth} | errors | ATA mode |`);
  console.log("|---|---|---|---|---|---|---|---|---|---|---|---|");
  for (const c of configs) {
    const s = sums[c.name];
    const failed = failures[c.name] ? ` (failed: run ${failures[c.name]!.map((f) => f.run).join(", ")})` : "";
    if (s === undefined) {
      console.log(`| ${c.label} | all runs failed${failed} | | | | | | | | | | |`);
      continue;
    }
    let mode = s.mode === "" ? "—" : s.mode;
    if (c.pio && !/PIO/.test(s.mode)) mode += " **(PIO NOT IN EFFECT)**";
    console.log(
      `| ${c.label}${failed} | ${fmt(s.seqwrite)} | ${fmt(s.seqread)} | ${fmt(s.randIops, 0)} (${fmt(s.randMiB, 2)}) | ${fmt(s.queuedIops, 0)} | ${fmt(s.flushMs)} | ${fmt(s.writeCpu, 1)} (${fmt(s.writeVmmCpu, 1)}) | ${fmt(s.readCpu, 1)} (${fmt(s.readVmmCpu, 1)}) | ${fmt(s.randCpuUs, 0)} (${fmt(s.randVmmCpuUs, 0)}) | ${fmt(s.queuedCpuUs, 0)} | ${s.errors} | ${mode} |`,
    );
  }
  const ratio = (a: string, b: string, f: (s: Summary) => number | undefined): string => {
    const x = sums[a] ? f(sums[a]!) : undefined;
    const y = sums[b] ? f(sums[b]!) : undefined;
    if (x === undefined || y === undefined || !(y > 0)) return "n/a";
    const r = x / y;
    return `${r !== 0 && r < 0.1 ? r.toPrecision(2) : r >= 100 ? r.toFixed(0) : r.toFixed(2)}×`;
  };
  const pairs: [string, string, string, string][] = [
    ["partis-virtio", "partis-ide-dma", "Partis virtio-blk ÷ Partis IDE DMA", "goal ≥ 20×"],
    ["partis-virtio", "partis-ide-pio", "Partis virtio-blk ÷ Partis IDE PIO", ""],
    ["partis-ide-dma", "partis-ide-pio", "Partis IDE DMA ÷ Partis IDE PIO", ""],
    ["partis-virtio", "qemu-virtio", "Partis virtio-blk ÷ QEMU virtio-blk", "goal ≥ 1.0×"],
    ["partis-ide-dma", "qemu-ide-dma", "Partis IDE DMA ÷ QEMU IDE DMA", ""],
    ["partis-ide-pio", "qemu-ide-pio", "Partis IDE PIO ÷ QEMU IDE PIO", ""],
    ["qemu-virtio", "qemu-ide-dma", "QEMU virtio-blk ÷ QEMU IDE DMA", "for scale"],
    ["partis-virtio-packed", "partis-virtio", "Partis virtio-blk packed ÷ split", ""],
    ["partis-virtio-packed", "qemu-virtio-packed", "Partis ÷ QEMU virtio-blk, both packed", ""],
    ["qemu-virtio-packed", "qemu-virtio", "QEMU virtio-blk packed ÷ split", ""],
    ["partis-virtio-vhdx", "qemu-virtio-vhdx", "Partis ÷ QEMU virtio-blk, both on dynamic VHDX", ""],
    ["partis-virtio-vhdx", "partis-virtio", "Partis virtio-blk VHDX ÷ raw", ""],
    ["partis-virtio-limited", "qemu-virtio-limited", "Partis ÷ QEMU virtio-blk, both limited", ""],
    ["qemu-virtio-vhdx", "qemu-virtio", "QEMU virtio-blk VHDX ÷ raw", ""],
    ["partis-virtio", "partis-virtio-baseline", "Partis virtio-blk, this build ÷ baseline", ""],
    ["partis-virtio-vhdx", "partis-virtio-vhdx-baseline", "Partis virtio-blk VHDX, this build ÷ baseline", ""],
  ];
  console.log("");
  console.log(`| ratio | seq write | seq read | 4K rand read | 4K rand read QD${queueDepth} | CPU per GiB read (lower is better) | CPU per rand read | note |`);
  console.log("|---|---|---|---|---|---|---|---|");
  for (const [a, b, label, note] of pairs) {
    if (!configs.some((c) => c.name === a) || !configs.some((c) => c.name === b)) continue;
    console.log(`| ${label} | ${ratio(a, b, (s) => s.seqwrite)} | ${ratio(a, b, (s) => s.seqread)} | ${ratio(a, b, (s) => s.randIops)} | ${ratio(a, b, (s) => s.queuedIops)} | ${ratio(a, b, (s) => s.readCpu)} | ${ratio(a, b, (s) => s.randCpuUs)} | ${note} |`);
  }
  // Run by run: configurations run back to back within a run, so pairing them by run cancels drift in the
  // machine's speed; the spread of the per-run ratios says how far to trust the ratio of medians above.
  const runMedian = (r: RunResult, f: (x: PassResult) => number | undefined): number | undefined => {
    const xs = r.passes.map(f).filter((x): x is number => x !== undefined);
    return xs.length ? median(xs) : undefined;
  };
  const pairedRows: string[] = [];
  for (const [a, b, label] of pairs) {
    const ra = results[a];
    const rb = results[b];
    if (ra === undefined || rb === undefined) continue;
    const cell = (f: (x: PassResult) => number | undefined): string => {
      const ratios: number[] = [];
      for (const x of ra) {
        // The same run index: `once` records runs in order, and a failed run leaves no entry, so match by run number.
        const y = rb.find((o) => o.run === x.run);
        if (y === undefined) continue;
        const u = runMedian(x, f);
        const v = runMedian(y, f);
        if (u !== undefined && v !== undefined && v > 0) ratios.push(u / v);
      }
      if (ratios.length === 0) return "n/a";
      const sorted = [...ratios].sort((p, q) => p - q);
      return `${median(ratios).toFixed(2)}× (${sorted[0]!.toFixed(2)}–${sorted[sorted.length - 1]!.toFixed(2)}, ${ratios.length} runs)`;
    };
    pairedRows.push(
      `| ${label} | ${cell((x) => x.patterns.seqwrite?.mibPerS)} | ${cell((x) => x.patterns.seqread?.mibPerS)} | ${cell((x) => x.patterns.randread?.iops)} | ${cell((x) => x.patterns.randreadq?.iops)} |`,
    );
  }
  if (pairedRows.length > 0 && runs > 1) {
    console.log("");
    console.log("Run by run (each run's median over its passes, the two configurations of one run paired): median ratio (lowest–highest)");
    console.log("");
    console.log(`| ratio | seq write | seq read | 4K rand read | 4K rand read QD${queueDepth} |`);
    console.log("|---|---|---|---|---|");
    for (const row of pairedRows) console.log(row);
  }
  console.log("");
  console.log("Guest block queue limits (/sys/block/DEV/queue):");
  for (const c of configs) if (sums[c.name]) console.log(`- ${c.label}: ${sums[c.name]!.queue || "n/a"}`);
  console.log("");
  console.log(`Command: node dist/partis/partis.js host nested -- node dist/bench/devices/guest-disk.js ${args.filter((a) => a !== "--prepare").join(" ")}`.trimEnd());
  for (const [name, fs] of Object.entries(failures)) {
    for (const f of fs) {
      console.log("");
      console.log(`Failure: ${name} run ${f.run}: ${f.message}`);
      if (f.tail) console.log("```\n" + f.tail.replace(/\r/g, "").split("\n").slice(-40).join("\n") + "\n```");
    }
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
