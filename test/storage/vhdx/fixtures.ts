/** Shared helpers for the VHDX tests: temp folders, qemu availability, a seeded generator. */
import { execFileSync, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as nodePath from "node:path";
import { after } from "node:test";

export const MiB = 1024 * 1024;

export function tempDir(name: string): string {
  const dir = fs.mkdtempSync(nodePath.join(os.tmpdir(), `partis-vhdx-${name}-`));
  after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

export function hasTool(tool: string): boolean {
  return spawnSync(tool, ["--version"], { stdio: "ignore" }).status === 0;
}

export const QEMU = hasTool("qemu-img") && hasTool("qemu-io");

export function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

/** Deterministic xorshift32 generator. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x / 0x100000000;
  };
}
