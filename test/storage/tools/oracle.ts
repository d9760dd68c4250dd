/**
 * qemu-img / qemu-io as the independent oracle for the disk tool tests,
 * plus small helpers shared by the storage tool tests.
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, mkdtempSync, openSync, readFileSync, readlinkSync, readSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export type QemuFormat = "raw" | "vpc" | "vhdx";

export function qemuFormat(format: "raw" | "vhd" | "vhdx"): QemuFormat {
  return format === "vhd" ? "vpc" : format;
}

export function run(cmd: string, args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 64 * 1024 * 1024 });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** `qemu-img compare`; returns "" when identical, else qemu's explanation. */
export function qemuCompare(a: string, fa: QemuFormat, b: string, fb: QemuFormat): string {
  const r = run("qemu-img", ["compare", "-f", fa, "-F", fb, a, b]);
  return r.status === 0 ? "" : `status ${r.status}: ${r.stdout}${r.stderr}`.trim();
}

export function qemuCheck(path: string, f: QemuFormat): { status: number; output: string } {
  const r = run("qemu-img", ["check", "-f", f, path]);
  return { status: r.status, output: (r.stdout + r.stderr).trim() };
}

export function qemuCreate(path: string, f: QemuFormat, size: number, opts: string[] = []): void {
  const r = run("qemu-img", ["create", "-q", "-f", f, ...(opts.length ? ["-o", opts.join(",")] : []), path, String(size)]);
  if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr}`);
}

/** Run qemu-io commands (e.g. "write -P 0x5a 0 64k") on an image. */
export function qemuIo(path: string, f: QemuFormat, commands: string[]): void {
  const args = ["-f", f];
  for (const c of commands) args.push("-c", c);
  args.push(path);
  const r = run("qemu-io", args);
  if (r.status !== 0 || /error|failed/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io failed: ${r.stdout}${r.stderr}`);
}

export function qemuInfo(path: string, f: QemuFormat): { "virtual-size": number; "actual-size": number } {
  const r = run("qemu-img", ["info", "--output=json", "-f", f, path]);
  if (r.status !== 0) throw new Error(`qemu-img info failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as { "virtual-size": number; "actual-size": number };
}

export function scratchDir(label: string): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(process.env.PARTIS_TEST_TMP ?? tmpdir(), `partis-${label}-`));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export function sha256File(path: string): string {
  const h = createHash("sha256");
  const fd = openSync(path, "r");
  try {
    const buf = Buffer.alloc(4 * 1024 * 1024);
    for (let pos = 0; ; ) {
      const n = readSync(fd, buf, 0, buf.length, pos);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
      pos += n;
    }
  } finally {
    closeSync(fd);
  }
  return h.digest("hex");
}

export function leftoverTemporaries(dir: string): string[] {
  return readdirSync(dir).filter((n) => n.includes(".partis-tmp-"));
}

/** Deterministic bytes from a seed (xorshift32), for patterns and the crash workload. */
/** Deterministic PRNG (mulberry32): numbers in [0, 1). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function seededBytes(seed: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed ^ 0x9e3779b9) >>> 0 || 1;
  const words = new Uint32Array(out.buffer, 0, length >>> 2);
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    words[i] = x;
  }
  for (let i = words.length * 4; i < length; i++) out[i] = (seed + i) & 0xff;
  return out;
}

/** An in-memory model of the virtual disk, flushed to a raw file for qemu-img compare. */
export class DiskModel {
  readonly bytes: Uint8Array;
  constructor(size: number) {
    this.bytes = new Uint8Array(size);
  }
  write(offset: number, data: Uint8Array): void {
    this.bytes.set(data, offset);
  }
  saveRaw(path: string): void {
    writeFileSync(path, this.bytes);
  }
}

/** One write of the crash workload, a pure function of (run seed, index). */
export interface PlannedWrite {
  readonly index: number;
  readonly offset: number;
  readonly length: number;
  readonly dataSeed: number;
}

function mix(a: number, b: number): number {
  let h = (Math.imul(a ^ 0x85ebca6b, 0xc2b2ae35) ^ Math.imul(b + 0x27d4eb2f, 0x165667b1)) >>> 0;
  h ^= h >>> 15;
  h = Math.imul(h, 0x2c1b3c6d) >>> 0;
  h ^= h >>> 12;
  return h >>> 0;
}

/**
 * Write `index` of run `seed` on a disk of `size` bytes: mostly 4 KiB-aligned,
 * some sector-aligned and some unaligned, 512 B to 192 KiB, clustered in
 * a few hot areas so blocks get rewritten as well as allocated.
 */
export function plannedWrite(seed: number, index: number, size: number): PlannedWrite {
  const r1 = mix(seed, index * 4 + 1);
  const r2 = mix(seed, index * 4 + 2);
  const r3 = mix(seed, index * 4 + 3);
  const kind = r1 % 8;
  const length = kind === 0 ? 1 + (r2 % 9000) : kind < 3 ? 512 * (1 + (r2 % 64)) : 4096 * (1 + (r2 % 48));
  const hot = r3 % 4 !== 0;
  const span = hot ? Math.min(size, 8 * 1024 * 1024) : size;
  const base = hot ? ((r3 >>> 8) % 4) * Math.floor(size / 4) : 0;
  let offset = base + (kind === 0 ? r3 % span : (kind < 3 ? 512 : 4096) * ((r3 >>> 4) % Math.floor(span / (kind < 3 ? 512 : 4096))));
  offset = Math.min(offset, size - length);
  return { index, offset, length, dataSeed: mix(seed, index) };
}

/**
 * The open flags (O_DIRECT, O_DSYNC, ...) of every descriptor process `pid`
 * ("self": this one) holds on `file`, from /proc/PID/fd and fdinfo.
 * Descriptors that close while being read are left out.
 */
export function openFlagsOn(pid: number | "self", file: string): number[] {
  const out: number[] = [];
  let fds: string[];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return out;
  }
  for (const fd of fds) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`) !== file) continue;
      const m = /^flags:\s+([0-7]+)$/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, "utf8"));
      if (m !== null) out.push(parseInt(m[1]!, 8));
    } catch {
      // closed meanwhile
    }
  }
  return out;
}
