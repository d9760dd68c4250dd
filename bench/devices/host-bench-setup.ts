/**
 * What the host-side device benchmarks (no guest) share: their command-line
 * options, and guest RAM that is a memfd mapping as in the worker, so disk
 * back ends take the host-address (one preadv/pwritev, io_uring) paths.
 */
import { join } from "node:path";
import { ChunkedGuestMemory } from "../../src/machine/guest-memory.js";
import { libc } from "../../src/hypervisor/index.js";
import type { BlockDevice } from "../../src/storage/block-device.js";
import { createDisk, openDisk } from "../../src/storage/open.js";

/** `--name value` from the command line, else `dflt`. */
export function option(name: string, dflt: string): string {
  const args = process.argv.slice(2);
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] !== undefined ? args[i + 1]! : dflt;
}

/** The median of `xs` (the mean of the middle two for an even count). */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Whether `--name` is on the command line. */
export function flag(name: string): boolean {
  return process.argv.slice(2).includes(name);
}

/** Image kinds the host-side benchmarks serve from (--format). */
export const BENCH_IMAGE_FORMATS = ["raw", "vhd", "vhdx", "vhdx-child"] as const;
export type BenchImageFormat = (typeof BENCH_IMAGE_FORMATS)[number];

/** --format, checked. */
export function imageFormatOption(): BenchImageFormat {
  const f = option("--format", "raw");
  if (!(BENCH_IMAGE_FORMATS as readonly string[]).includes(f)) throw new Error(`--format must be one of ${BENCH_IMAGE_FORMATS.join(", ")}`);
  return f as BenchImageFormat;
}

/** Cache modes a raw bench image can be opened with (--cache). */
export const BENCH_CACHE_MODES = ["writeback", "none", "writethrough", "directsync", "unsafe"] as const;
export type BenchCacheMode = (typeof BENCH_CACHE_MODES)[number];

/** --cache, checked. */
export function cacheModeOption(): BenchCacheMode {
  const c = option("--cache", "writeback");
  if (!(BENCH_CACHE_MODES as readonly string[]).includes(c)) throw new Error(`--cache must be one of ${BENCH_CACHE_MODES.join(", ")}`);
  return c as BenchCacheMode;
}

/**
 * The open options of a cache mode, spelled out (not cacheOpenOptions) so
 * that this file also builds against a baseline tree from before cache
 * modes: there `direct` is all that is understood (O_DIRECT through its
 * bounce buffer).
 */
function cacheOptions(mode: BenchCacheMode): { direct: boolean; writeThrough: boolean; ignoreFlush: boolean } {
  return { direct: mode === "none" || mode === "directsync", writeThrough: mode === "writethrough" || mode === "directsync", ignoreFlush: mode === "unsafe" };
}

/**
 * An image of `bytes` in `dir` whose every byte has been written (0x5a), so
 * reads find data, not holes: a fixed raw file, a dynamic VHD or VHDX (every
 * block allocated, in order), or "vhdx-child": an empty differencing VHDX
 * over such a VHDX (a fresh checkpoint: reads fall through to the parent,
 * writes allocate in the child).
 */
export function filledImage(dir: string, bytes: number, format: BenchImageFormat = "raw", cache: BenchCacheMode = "writeback"): BlockDevice {
  const base = format === "vhdx-child" ? "vhdx" : format;
  const path = join(dir, `disk.${base}`);
  createDisk(path, base, { type: base === "raw" ? "fixed" : "dynamic", size: bytes });
  const disk = openDisk(path);
  const fill = new Uint8Array(1024 * 1024).fill(0x5a);
  for (let o = 0; o < bytes; o += fill.length) disk.write(o, fill.subarray(0, Math.min(fill.length, bytes - o)));
  if (format !== "vhdx-child") {
    if (cache === "writeback") return disk;
    disk.close();
    return openDisk(path, cacheOptions(cache));
  }
  disk.close();
  const child = join(dir, "child.vhdx");
  createDisk(child, "vhdx", { type: "differencing", parentPath: path });
  return openDisk(child, cacheOptions(cache));
}

/** `bytes` of guest RAM at guest-physical 0, one memfd mapping (host-mapped: hostAddresses works). */
export function memfdGuestRam(bytes: number, name = "bench-guest-ram"): ChunkedGuestMemory {
  return new ChunkedGuestMemory(
    [{ gpa: 0, length: bytes, fileOffset: 0 }],
    (off, len) => {
      const fd = libc.memfdCreate(name);
      libc.ftruncate(fd, bytes);
      return libc.mapSharedFile(fd, off, len);
    },
    undefined,
    (v) => Number(libc.addressOfView(v)),
  );
}
