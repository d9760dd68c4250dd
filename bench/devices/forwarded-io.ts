/**
 * The cost of the emulated-device path on this host, without a real guest:
 *  1. the device mailbox alone: a vCPU-side requester and a device-thread
 *     server (the test echo thread) exchanging N requests;
 *  2. whole exits: a tiny hand-written guest doing N `in al, dx` on a port of
 *     the platform board (serviced on the vCPU thread), an unclaimed port, the
 *     IDE Error register (forwarded to the device thread) and IDE Alternate
 *     Status (published in the port read shadow, so answered on the vCPU
 *     thread). The difference to the board port is the forwarding cost (each run includes the VM's
 *     start-up, measured by a 0-iteration run and subtracted).
 *
 *   npx tsc -p . && node dist/bench/devices/forwarded-io.js [--n 20000]
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir, cpus, loadavg } from "node:os";
import { join } from "node:path";
import { Worker } from "node:worker_threads";
import { fileURLToPath } from "node:url";
import { DeviceMailbox, MAILBOX_OP } from "../../src/worker/device-mailbox.js";
import { makeBzImage } from "../../test/fixtures/bzimage.js";

const args = process.argv.slice(2);
const N = Number(args[args.indexOf("--n") + 1] ?? 20000) || 20000;
const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const ECHO = new URL("../../test/worker/mailbox-echo-thread.js", import.meta.url);

async function mailbox(): Promise<{ us: number; cpuUs: number }> {
  const box = DeviceMailbox.create(2);
  const w = new Worker(ECHO, { workerData: box.handoff() });
  await new Promise((r) => w.once("message", r));
  const req = box.requester(0);
  for (let i = 0; i < 1000; i++) req.call(MAILBOX_OP.pioRead, 0x1f7, 1, 1); // warm-up
  const t0 = process.hrtime.bigint();
  const c0 = process.cpuUsage();
  for (let i = 0; i < N; i++) req.call(MAILBOX_OP.pioRead, 0x1f7, 1, 1);
  const us = Number(process.hrtime.bigint() - t0) / 1e3 / N;
  const c = process.cpuUsage(c0);
  await w.terminate();
  box.close();
  return { us, cpuUs: (c.user + c.system) / N };
}

/** mov ecx, n; mov dx, port; L: in al, dx; dec ecx; jnz L; then ACPI S5 and halt. */
function inLoop(port: number, n: number): Uint8Array {
  const count = Buffer.alloc(4);
  count.writeUInt32LE(n);
  const loop = n === 0 ? [] : [0xb9, ...count, 0x66, 0xba, port & 0xff, port >> 8, 0xec, 0xff, 0xc9, 0x75, 0xfb];
  return Uint8Array.from([...loop, 0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0xf4, 0xeb, 0xfd]);
}

function runMs(dir: string, port: number, n: number, extra: string[]): number {
  const k = join(dir, `k-${port}-${n}`);
  writeFileSync(k, makeBzImage(inLoop(port, n)));
  const t0 = process.hrtime.bigint();
  const r = spawnSync(process.execPath, [CLI, "run", "--kernel", k, "--memory", "64M", ...extra], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`run failed (${r.status}): ${r.stderr}`);
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

const m = await mailbox();
const dir = mkdtempSync(join(tmpdir(), "partis-fwd-bench-"));
const disk = join(dir, "d.raw");
writeFileSync(disk, Buffer.alloc(1 << 20));
const rows: string[] = [];
for (const [name, port, extra] of [
  ["platform board port 0x61 (vCPU thread)", 0x61, []],
  ["unclaimed port 0x80", 0x80, []],
  // Error has no side effect but is not published: every read is a mailbox round trip.
  ["IDE Error 0x1F1 (forwarded to the device thread)", 0x1f1, ["--disk", `${disk},if=ide`]],
  // Alternate Status is published in the port read shadow: answered on the vCPU thread.
  ["IDE Alternate Status 0x3F6 (port read shadow, vCPU thread)", 0x3f6, ["--disk", `${disk},if=ide`]],
] as const) {
  const base = Math.min(runMs(dir, port, 0, [...extra]), runMs(dir, port, 0, [...extra]));
  const full = Math.min(runMs(dir, port, N, [...extra]), runMs(dir, port, N, [...extra]));
  rows.push(`| ${name} | ${(((full - base) * 1000) / N).toFixed(1)} |`);
}
rmSync(dir, { recursive: true, force: true });
console.log(`forwarded I/O, ${cpus()[0]?.model ?? "?"} x${cpus().length}, load ${loadavg()[0]!.toFixed(2)}, node ${process.version}, N=${N}\n`);
console.log(`| path | µs per access |\n|---|---:|\n| mailbox round trip alone (CPU ${m.cpuUs.toFixed(1)} µs) | ${m.us.toFixed(1)} |`);
for (const r of rows) console.log(r);
