/**
 * In-guest AF_VSOCK stream throughput: the default guest (Debian 6.1 kernel,
 * its vmw_vsock_virtio_transport) with the static `vsock` tool
 * (test/guest/tools/vsock.c) sends --mib MiB to a host sink (upload), then
 * receives --mib MiB from a host source (download), side by side with QEMU
 * on the same kernel, initramfs and guest command.
 *
 * Configurations:
 *  - `partis`: `--vsock SOCK` (Partis's userspace device; the host services
 *    listen on the UNIX sockets SOCK_5000 and SOCK_5001);
 *  - `qemu`: `-device vhost-vsock-pci` (the host kernel's vhost_vsock: the
 *    packets never leave the kernel; the host services listen on AF_VSOCK).
 *    QEMU has no userspace vsock device, so this compares Partis's userspace
 *    path with the kernel's.
 * The host services are the static tool for both (`vsock listen-unix PATH`
 * and `vsock listen PORT`): a sink, and a source of the payload file.
 *  - `partis-baseline` (--baseline-cli PATH: another build's dist/partis/partis.js).
 *
 * Both directions are timed by the guest (/proc/uptime, 10 ms steps) around
 * the tool, so the guest's per-byte work is the same for both VMMs; the VMM
 * process's CPU per MiB (utime+stime over the whole VM run, which is mostly
 * the transfers) is printed too: for QEMU it leaves out vhost's kernel
 * thread, which does the copying there.
 *
 * PARTIS_BENCH_THREADS=1: the VMM's CPU over the transfers by thread name, and
 * (Partis) PARTIS_STATS=1's exit and device counters, printed on stderr.
 *
 * Needs /dev/vhost-vsock for the qemu row (the nested test host loads
 * vhost_vsock). On a PVM host run it inside the nested test host (timings
 * there are TCG-scaled: compare only side by side):
 *   npx tsc -p . && node scripts/bundle.mjs &&
 *   node dist/partis/partis.js host nested -- node dist/bench/devices/guest-vsock.js [--mib 16] [--runs 2] [--only partis,qemu] [--baseline-cli PATH]
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { guestRunOption, prepareDefaultGuest } from "../../src/images/default-guest.js";
import { buildGuestTool, initrdWithTools } from "../../test/guest/guest-tools.js";
import { median, option } from "./host-bench-setup.js";
import { cpuOf, threadCpuOf } from "./process-cpu.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const QEMU = "/usr/bin/qemu-system-x86_64";
const MiB = 1024 * 1024;
const TRANSFER_MIB = Number(option("--mib", "16"));
const ONLY = option("--only", "");
const RUNS = Number(option("--runs", "2"));
const TIMEOUT_MS = Number(option("--timeout", "300")) * 1000;
const CID = 3;
const BASELINE = option("--baseline-cli", "");

interface HostSide {
  /** VMM arguments for the device. */
  readonly args: string[];
  /** Stop the host services. */
  close(): void;
}

interface Config {
  readonly name: string;
  readonly host: (work: string, payload: string) => Promise<HostSide>;
  readonly argv: (kernel: string, initrd: string, append: string, device: string[]) => { command: string; argv: string[] };
}

/**
 * The host's services, the static tool for both VMMs: a sink on port 5000
 * and a source of the payload file on port 5001, listening as `how(port)`
 * says (AF_VSOCK, or the UNIX socket Partis's device connects to).
 */
async function toolServices(payload: string, how: (port: number) => string): Promise<ChildProcess[]> {
  const tool = buildGuestTool("vsock");
  const children: ChildProcess[] = [
    spawn("sh", ["-c", `exec ${tool} ${how(5000)} < /dev/null > /dev/null`], { stdio: ["ignore", "ignore", "pipe"] }),
    spawn("sh", ["-c", `exec ${tool} ${how(5001)} < ${payload} > /dev/null`], { stdio: ["ignore", "ignore", "pipe"] }),
  ];
  // Listening once each has said so.
  await Promise.all(
    children.map(
      (c) =>
        new Promise<void>((resolve, reject) => {
          let err = "";
          c.stderr!.on("data", (d: Buffer) => {
            err += d.toString();
            if (err.includes("VSOCK-LISTENING")) resolve();
          });
          c.once("exit", () => reject(new Error(`host vsock listener ended: ${err}`)));
        }),
    ),
  );
  return children;
}

/** Partis: `--vsock SOCK`; the services listen on SOCK_5000 and SOCK_5001. */
async function partisHost(work: string, payload: string): Promise<HostSide> {
  const sock = join(work, "v.sock");
  const children = await toolServices(payload, (port) => `listen-unix ${sock}_${port}`);
  return { args: ["--vsock", `${sock},cid=${CID}`], close: () => children.forEach((c) => c.kill()) };
}

/** QEMU: vhost-vsock; the services are AF_VSOCK listeners. */
async function qemuHost(_work: string, payload: string): Promise<HostSide> {
  if (!existsSync("/dev/vhost-vsock")) throw new Error("/dev/vhost-vsock is missing (modprobe vhost_vsock; the nested test host loads it)");
  const children = await toolServices(payload, (port) => `listen ${port}`);
  return { args: ["-device", `vhost-vsock-pci,guest-cid=${CID}`], close: () => children.forEach((c) => c.kill()) };
}

const partisRun = (cli: string) => (kernel: string, initrd: string, append: string, device: string[]) => ({
  command: process.execPath,
  argv: [cli, "run", "--kernel", kernel, "--initrd", initrd, "--append", append, "--memory", "512M", "--cpus", "1", ...device],
});

const ALL_CONFIGS: Config[] = [
  { name: "partis", host: partisHost, argv: partisRun(CLI) },
  ...(BASELINE !== "" ? [{ name: "partis-baseline", host: partisHost, argv: partisRun(BASELINE) }] : []),
  {
    name: "qemu",
    host: qemuHost,
    argv: (kernel, initrd, append, device) => ({
      command: QEMU,
      argv: ["-enable-kvm", "-cpu", "host", "-m", "512M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-M", "q35", "-kernel", kernel, "-initrd", initrd, "-append", append, ...device],
    }),
  },
];
const CONFIGS = ALL_CONFIGS.filter((c) => ONLY === "" || ONLY.split(",").includes(c.name));
for (const name of ONLY === "" ? [] : ONLY.split(",")) {
  if (!CONFIGS.some((c) => c.name === name)) {
    console.error(`--only ${name}: no such configuration (partis, qemu; partis-baseline needs --baseline-cli)`);
    process.exit(2);
  }
}

function guestScript(): string {
  const blocks = (TRANSFER_MIB * MiB) / 65536;
  return [
    `for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0013 ] && echo VSOCKBENCH-DRIVER=$(basename $(readlink $d/driver)); done`,
    "echo VSOCKBENCH-START; sleep 1",
    "t0=$(cut -d' ' -f1 /proc/uptime)",
    `dd if=/dev/zero bs=65536 count=${blocks} 2>/dev/null | vsock connect 2 5000 > /dev/null`,
    "t1=$(cut -d' ' -f1 /proc/uptime)",
    "n=$(vsock connect 2 5001 < /dev/null | wc -c)",
    "t2=$(cut -d' ' -f1 /proc/uptime)",
    "echo VSOCKBENCH bytes=$n t0=$t0 t1=$t1 t2=$t2",
    "poweroff -f",
  ].join("\n");
}

interface RunResult {
  upMiBs: number;
  downMiBs: number;
  cpuPerMiB: number;
  vmmCpuPerMiB: number;
}

async function once(c: Config, kernel: string, initrd: string, work: string, payloadFile: string): Promise<RunResult> {
  const host = await c.host(work, payloadFile);
  const append = `console=ttyS0 panic=-1 quiet ${guestRunOption(guestScript())}`;
  const { command, argv } = c.argv(kernel, initrd, append, host.args);
  const threads = process.env.PARTIS_BENCH_THREADS === "1";
  const child = spawn(command, argv, { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, ...(threads ? { PARTIS_STATS: "1" } : {}) } });
  child.stdin!.end();
  let out = "";
  let cpu0: { total: number; guest: number } | undefined;
  let cpu = { total: 0, guest: 0 };
  let threads0 = new Map<number, { comm: string; total: number }>();
  child.stdout!.on("data", (d: Buffer) => {
    out += d.toString("utf8");
    // The VMM's CPU around the transfers: from the guest's start line to its result line.
    if (cpu0 === undefined && out.includes("VSOCKBENCH-START") && child.pid !== undefined) {
      cpu0 = cpuOf(child.pid);
      if (threads) threads0 = threadCpuOf(child.pid);
    }
    if (out.includes("VSOCKBENCH bytes=") && cpu.total === 0 && cpu0 !== undefined && child.pid !== undefined) {
      const c1 = cpuOf(child.pid);
      cpu = { total: c1.total - cpu0.total, guest: c1.guest - cpu0.guest };
      if (process.env.PARTIS_BENCH_THREADS === "1") {
        // Which threads the VM's CPU went to (summed by name): vCPU, device thread, main, vhost...
        const byName = new Map<string, number>();
        for (const [tid, t] of threadCpuOf(child.pid)) byName.set(t.comm, (byName.get(t.comm) ?? 0) + t.total - (threads0.get(tid)?.total ?? 0));
        process.stderr.write(`${c.name} threads: ${[...byName].map(([n, s]) => `${n} ${s.toFixed(2)} s`).join(", ")}\n`);
      }
    }
  });
  child.stderr!.on("data", (d: Buffer) => (out += d.toString("utf8")));
  const timer = setTimeout(() => child.kill("SIGKILL"), TIMEOUT_MS);
  try {
    await new Promise<void>((resolve) => child.once("exit", () => resolve()));
  } finally {
    clearTimeout(timer);
    host.close();
  }
  if (threads) for (const line of out.split("\n").filter((l) => l.startsWith("partis-vm:"))) process.stderr.write(`${c.name}: ${line.slice(0, 1500)}\n`);
  const m = /VSOCKBENCH bytes=(\d+) t0=([\d.]+) t1=([\d.]+) t2=([\d.]+)/.exec(out);
  if (m === null || Number(m[1]) !== TRANSFER_MIB * MiB) throw new Error(`${c.name}: no complete transfer (download ${m?.[1] ?? 0} bytes); output tail:\n${out.slice(-2000)}`);
  const up = Math.max(0.01, Number(m[3]) - Number(m[2]));
  const down = Math.max(0.01, Number(m[4]) - Number(m[3]));
  return { upMiBs: TRANSFER_MIB / up, downMiBs: TRANSFER_MIB / down, cpuPerMiB: cpu.total / (2 * TRANSFER_MIB), vmmCpuPerMiB: (cpu.total - cpu.guest) / (2 * TRANSFER_MIB) };
}


async function main(): Promise<void> {
  const guest = await prepareDefaultGuest({ log: (l) => process.stderr.write(`guest-vsock: ${l}\n`) });
  const initrd = await initrdWithTools(["vsock"]);
  const work = mkdtempSync(join(tmpdir(), "partis-vsock-bench-"));
  const payloadFile = join(work, "payload");
  writeFileSync(payloadFile, Buffer.alloc(TRANSFER_MIB * MiB, 0x5a));
  const results: Record<string, RunResult[]> = {};
  try {
    for (let run = 1; run <= RUNS; run++) {
      for (const c of CONFIGS) {
        try {
          const r = await once(c, guest.kernel, initrd, work, payloadFile);
          (results[c.name] ??= []).push(r);
          process.stderr.write(`${c.name} run ${run}: upload ${r.upMiBs.toFixed(1)} MiB/s, download ${r.downMiBs.toFixed(1)} MiB/s, CPU ${(r.cpuPerMiB * 1000).toFixed(0)} (${(r.vmmCpuPerMiB * 1000).toFixed(0)}) ms/MiB\n`);
        } catch (e) {
          process.stderr.write(`${c.name} run ${run} failed: ${(e as Error).message}\n`);
        }
      }
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  console.log(`In-guest AF_VSOCK streams (${TRANSFER_MIB} MiB each way, the static vsock tool, ${RUNS} interleaved runs, medians); host: ${cpus().length} CPUs (${cpus()[0]?.model ?? "cpu"}), Node ${process.version}.`);
  console.log("");
  console.log("| path | upload MiB/s | download MiB/s | VMM CPU ms per MiB moved (without guest time) |");
  console.log("|---|---|---|---|");
  for (const c of CONFIGS) {
    const rs = results[c.name];
    if (rs === undefined || rs.length === 0) {
      console.log(`| ${c.name} | failed | failed | |`);
      continue;
    }
    console.log(`| ${c.name} | ${median(rs.map((r) => r.upMiBs)).toFixed(1)} | ${median(rs.map((r) => r.downMiBs)).toFixed(1)} | ${(median(rs.map((r) => r.cpuPerMiB)) * 1000).toFixed(0)} (${(median(rs.map((r) => r.vmmCpuPerMiB)) * 1000).toFixed(0)}) |`);
  }
  console.log("");
  console.log(`Command: node dist/partis/partis.js host nested -- node dist/bench/devices/guest-vsock.js ${process.argv.slice(2).join(" ")}`.trimEnd());
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
