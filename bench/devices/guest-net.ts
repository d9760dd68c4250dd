/**
 * In-guest TCP throughput through a TAP: the default guest (Debian 6.1 kernel,
 * busybox) sends --mib MiB to a TCP sink in this process (upload), then
 * receives --mib MiB from a source in it (download), over a virtio NIC on a
 * host TAP, side by side with QEMU on the same kernel, initramfs and guest
 * command.
 *
 * Configurations: `partis` (this build: checksum and TCP segmentation
 * offloads on a TAP), `partis-baseline` (--baseline-cli PATH: another build's
 * dist/partis/partis.js, e.g. one from before the offloads), `qemu`
 * (virtio-net-pci on `-netdev tap,vhost=off`: QEMU's own userspace
 * virtio-net, with the TAP's vnet-header offloads, its default), and the
 * emulated NIC of both, the seed's gap for networking: `partis-ne2k`
 * (`model=ne2k`, the RTL8029 NE2000 PCI) and `qemu-ne2k` (`ne2k_pci`), which
 * move --ne2k-mib MiB (default 2: a register access per 2 bytes of a frame
 * makes them slow; with --baseline-cli also `partis-ne2k-baseline`).
 * --only NAME,NAME picks configurations. Runs are
 * interleaved, --runs of them (2); medians.
 *
 * Upload MiB/s: measured here, from the first byte received to the guest's
 * end of stream. Download MiB/s: measured by the guest (/proc/uptime, 10 ms
 * steps) around `nc`; the source writes and closes. Both directions use
 * busybox `nc`, so the guest's per-byte work is the same for every VMM.
 * Also printed: the virtio feature bits the guest negotiated (0 CSUM,
 * 11 HOST_TSO4), the TAP's frames per MiB seen by the host on upload, and
 * the VMM process's CPU per MiB uploaded (utime+stime between the first
 * byte and the end of stream; in parentheses without its guest time: the
 * VMM's own work).
 *
 * Needs root and /dev/net/tun. On a PVM host run it inside the nested test
 * host (timings there are TCG-scaled: compare only side by side):
 *   npx tsc -p . && node scripts/bundle.mjs &&
 *   node dist/partis/partis.js host nested -- node dist/bench/devices/guest-net.js [--mib 32] [--runs 2] [--baseline-cli PATH]
 */
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { cpus } from "node:os";
import { fileURLToPath } from "node:url";
import { guestRunOption, prepareDefaultGuest } from "../../src/images/default-guest.js";
import { median, option } from "./host-bench-setup.js";
import { cpuOf } from "./process-cpu.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const QEMU = "/usr/bin/qemu-system-x86_64";
const MiB = 1024 * 1024;
const TRANSFER_MIB = Number(option("--mib", "32"));
const NE2K_MIB = Number(option("--ne2k-mib", "2"));
const ONLY = option("--only", "");
const RUNS = Number(option("--runs", "2"));
const BASELINE = option("--baseline-cli", "");
const TAP = "pnbench0";
const HOST_IP = "10.77.0.1";
const GUEST_IP = "10.77.0.2";
const TIMEOUT_MS = Number(option("--timeout", "300")) * 1000;
const MAC = "52:54:00:77:00:02";

interface Config {
  readonly name: string;
  /** MiB moved each way. */
  readonly mib: number;
  readonly argv: (kernel: string, initrd: string, append: string) => { command: string; argv: string[] };
}

const partis = (cli: string, model: "virtio" | "ne2k") => (kernel: string, initrd: string, append: string) => ({
  command: process.execPath,
  argv: [cli, "run", "--kernel", kernel, "--initrd", initrd, "--append", append, "--memory", "512M", "--cpus", "1", "--nic", `tap:${TAP},model=${model},mac=${MAC}`],
});

const qemu = (device: string) => (kernel: string, initrd: string, append: string) => ({
  command: QEMU,
  argv: [
    "-enable-kvm", "-cpu", "host", "-m", "512M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-M", "q35",
    "-kernel", kernel, "-initrd", initrd, "-append", append,
    "-netdev", `tap,id=n0,ifname=${TAP},script=no,downscript=no,vhost=off`, "-device", `${device},netdev=n0,mac=${MAC}`,
  ],
});

const CONFIGS: Config[] = [
  { name: "partis", mib: TRANSFER_MIB, argv: partis(CLI, "virtio") },
  ...(BASELINE !== "" ? [{ name: "partis-baseline", mib: TRANSFER_MIB, argv: partis(BASELINE, "virtio") }] : []),
  { name: "qemu", mib: TRANSFER_MIB, argv: qemu("virtio-net-pci") },
  { name: "partis-ne2k", mib: NE2K_MIB, argv: partis(CLI, "ne2k") },
  ...(BASELINE !== "" ? [{ name: "partis-ne2k-baseline", mib: NE2K_MIB, argv: partis(BASELINE, "ne2k") }] : []),
  { name: "qemu-ne2k", mib: NE2K_MIB, argv: qemu("ne2k_pci") },
].filter((c) => ONLY === "" || ONLY.split(",").includes(c.name));
for (const name of ONLY === "" ? [] : ONLY.split(",")) {
  if (!CONFIGS.some((c) => c.name === name)) {
    console.error(`--only ${name}: no such configuration here (partis, qemu, partis-ne2k, qemu-ne2k; partis-baseline and partis-ne2k-baseline need --baseline-cli)`);
    process.exit(2);
  }
}

function guestScript(mib: number): string {
  const blocks = (mib * MiB) / 65536;
  return [
    "i=$(for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = \"" + MAC + "\" ] && basename $d; done)",
    `ip addr add ${GUEST_IP}/24 dev $i; ip link set $i up`,
    `for k in $(seq 1 120); do ping -c 1 -W 1 ${HOST_IP} >/dev/null 2>&1 && break; done`,
    "echo NETBENCH-FEATURES=$(cat /sys/class/net/$i/device/features 2>/dev/null)",
    `dd if=/dev/zero bs=65536 count=${blocks} 2>/dev/null | nc ${HOST_IP} 5000 >/dev/null`,
    "t0=$(cut -d' ' -f1 /proc/uptime)",
    `n=$(nc ${HOST_IP} 5001 </dev/null | wc -c)`,
    "t1=$(cut -d' ' -f1 /proc/uptime)",
    "echo NETBENCH-DOWN bytes=$n t0=$t0 t1=$t1",
    "poweroff -f",
  ].join("\n");
}

interface RunResult {
  upMiBs: number;
  downMiBs: number;
  features: string;
  /** TAP frames (host rx) per MiB during the upload. */
  framesPerMiB: number;
  /** VMM CPU seconds per MiB uploaded, and the same without guest time. */
  cpuPerMiB: number;
  vmmCpuPerMiB: number;
}

function tapStat(name: string): number {
  return Number(readFileSync(`/sys/class/net/${TAP}/statistics/${name}`, "utf8"));
}

/** The host's end: 5000 counts the upload (timed here), 5001 sends the configuration's MiB and closes. */
interface Upload {
  seconds: number;
  bytes: number;
  frames: number;
  cpu: number;
  guest: number;
}

function hostServers(mib: number, vmm: () => number | undefined): { servers: Server[]; upload: Promise<Upload> } {
  const payload = Buffer.alloc(mib * MiB, 0x5a);
  let resolveUpload: (v: Upload) => void = () => undefined;
  const upload = new Promise<Upload>((r) => (resolveUpload = r));
  const cpu = (): { total: number; guest: number } => {
    const pid = vmm();
    return pid === undefined ? { total: 0, guest: 0 } : cpuOf(pid);
  };
  const up = createServer((sock) => {
    let t0: bigint | undefined;
    let frames0 = 0;
    let cpu0 = { total: 0, guest: 0 };
    let bytes = 0;
    sock.on("data", (d: Buffer) => {
      if (t0 === undefined) {
        t0 = process.hrtime.bigint();
        frames0 = tapStat("rx_packets");
        cpu0 = cpu();
      }
      bytes += d.length;
    });
    sock.on("end", () => {
      const seconds = t0 === undefined ? 0 : Number(process.hrtime.bigint() - t0) / 1e9;
      const c1 = cpu();
      resolveUpload({ seconds, bytes, frames: tapStat("rx_packets") - frames0, cpu: c1.total - cpu0.total, guest: c1.guest - cpu0.guest });
      sock.end();
    });
    sock.on("error", () => undefined);
  });
  const down = createServer((sock) => {
    sock.on("error", () => undefined);
    sock.end(payload);
  });
  up.listen(5000, "0.0.0.0");
  down.listen(5001, "0.0.0.0");
  return { servers: [up, down], upload };
}

/** Address the TAP once the VMM has created it. */
function configureTap(child: ChildProcess): void {
  if (child.exitCode !== null) return;
  if (!existsSync(`/sys/class/net/${TAP}`)) {
    setTimeout(() => configureTap(child), 100);
    return;
  }
  try {
    execFileSync("ip", ["addr", "add", `${HOST_IP}/24`, "dev", TAP]);
    execFileSync("ip", ["link", "set", TAP, "up"]);
  } catch {
    setTimeout(() => configureTap(child), 100);
  }
}

async function once(c: Config, kernel: string, initrd: string): Promise<RunResult> {
  let pid: number | undefined;
  const { servers, upload } = hostServers(c.mib, () => pid);
  const append = `console=ttyS0 panic=-1 quiet ${guestRunOption(guestScript(c.mib))}`;
  const { command, argv } = c.argv(kernel, initrd, append);
  // Both VMMs run the VM in the process started here.
  const child = spawn(command, argv, { stdio: ["pipe", "pipe", "pipe"] });
  pid = child.pid;
  child.stdin!.end();
  let out = "";
  child.stdout!.on("data", (d: Buffer) => (out += d.toString("utf8")));
  child.stderr!.on("data", (d: Buffer) => (out += d.toString("utf8")));
  configureTap(child);
  const timer = setTimeout(() => child.kill("SIGKILL"), TIMEOUT_MS);
  try {
    await new Promise<void>((resolve) => child.once("exit", () => resolve()));
  } finally {
    clearTimeout(timer);
    for (const s of servers) s.close();
  }
  const down = /NETBENCH-DOWN bytes=(\d+) t0=([\d.]+) t1=([\d.]+)/.exec(out);
  const features = /NETBENCH-FEATURES=([01]*)/.exec(out)?.[1] ?? "";
  const up = await Promise.race([upload, new Promise<undefined>((r) => setTimeout(() => r(undefined), 10))]);
  if (down === null || up === undefined || Number(down[1]) !== c.mib * MiB || up.bytes !== c.mib * MiB) {
    throw new Error(`${c.name}: no complete transfer (upload ${up?.bytes ?? 0} bytes, download ${down?.[1] ?? 0}); output tail:\n${out.slice(-2000)}`);
  }
  const downSeconds = Math.max(0.01, Number(down[3]) - Number(down[2]));
  return {
    upMiBs: c.mib / up.seconds,
    downMiBs: c.mib / downSeconds,
    features,
    framesPerMiB: up.frames / c.mib,
    cpuPerMiB: up.cpu / c.mib,
    vmmCpuPerMiB: (up.cpu - up.guest) / c.mib,
  };
}


async function main(): Promise<void> {
  if (!existsSync("/dev/net/tun")) throw new Error("/dev/net/tun is missing (modprobe tun)");
  const guest = await prepareDefaultGuest({ log: (l) => process.stderr.write(`guest-net: ${l}\n`) });
  const results: Record<string, RunResult[]> = {};
  for (let run = 1; run <= RUNS; run++) {
    for (const c of CONFIGS) {
      try {
        const r = await once(c, guest.kernel, guest.initrd);
        (results[c.name] ??= []).push(r);
        const digits = c.mib < 8 ? 3 : 1;
        process.stderr.write(`${c.name} run ${run}: upload ${r.upMiBs.toFixed(digits)} MiB/s, download ${r.downMiBs.toFixed(digits)} MiB/s, ${r.framesPerMiB.toFixed(0)} frames/MiB up, CPU ${(r.cpuPerMiB * 1000).toFixed(0)} (${(r.vmmCpuPerMiB * 1000).toFixed(0)}) ms/MiB up, features ${r.features.slice(0, 16)}\n`);
      } catch (e) {
        process.stderr.write(`${c.name} run ${run} failed: ${(e as Error).message}\n`);
      }
    }
  }
  console.log(`In-guest TCP through a TAP (${TRANSFER_MIB} MiB each way over virtio-net, ${NE2K_MIB} MiB over the NE2000, busybox nc, ${RUNS} interleaved runs, medians); host: ${cpus().length} CPUs (${cpus()[0]?.model ?? "cpu"}), Node ${process.version}.`);
  console.log("");
  console.log("| path | upload MiB/s | download MiB/s | host frames per MiB uploaded | VMM CPU ms per MiB uploaded (without guest time) | CSUM / HOST_TSO4 / GUEST_TSO4 negotiated |");
  console.log("|---|---|---|---|---|---|");
  for (const c of CONFIGS) {
    const rs = results[c.name];
    if (rs === undefined || rs.length === 0) {
      console.log(`| ${c.name} | failed | failed | | | |`);
      continue;
    }
    const f = rs[0]!.features;
    const digits = c.mib < 8 ? 3 : 1;
    console.log(
      `| ${c.name} | ${median(rs.map((r) => r.upMiBs)).toFixed(digits)} | ${median(rs.map((r) => r.downMiBs)).toFixed(digits)} | ${median(rs.map((r) => r.framesPerMiB)).toFixed(0)} | ${(median(rs.map((r) => r.cpuPerMiB)) * 1000).toFixed(0)} (${(median(rs.map((r) => r.vmmCpuPerMiB)) * 1000).toFixed(0)}) | ${f === "" ? "(no virtio)" : `${f.charAt(0)} / ${f.charAt(11)} / ${f.charAt(7)}`} |`,
    );
  }
  console.log("");
  console.log(`Command: node dist/partis/partis.js host nested -- node dist/bench/devices/guest-net.js ${process.argv.slice(2).join(" ")}`.trimEnd());
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
