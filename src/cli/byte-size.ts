/**
 * Byte sizes as users type them: "512M", "4G", "1.5G", "2T", "64MiB", "1048576B".
 * Units are binary (K = 1024). A bare number means `bareUnit` (MiB for guest
 * memory, like QEMU's -m; bytes for disks).
 */
import { UsageError } from "../errors.js";

const UNITS: Record<string, number> = { B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

export function parseByteSize(text: string, what: string, bareUnit: "B" | "M" = "B"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([BKMGTP]?)(?:i?B)?\s*$/i.exec(text);
  if (m === null) throw new UsageError(`${what}: "${text}" is not a size (examples: 512M, 4G, 1.5G)`);
  const unit = m[2] === "" ? bareUnit : m[2]!.toUpperCase();
  const value = Number(m[1]) * UNITS[unit]!;
  if (!Number.isFinite(value) || !Number.isSafeInteger(Math.round(value)))
    throw new UsageError(`${what}: "${text}" is too large`);
  const bytes = Math.round(value);
  if (bytes !== value) throw new UsageError(`${what}: "${text}" is not a whole number of bytes`);
  return bytes;
}

export function formatByteSize(bytes: number): string {
  for (const [u, n] of [["T", 2 ** 40], ["G", 2 ** 30], ["M", 2 ** 20], ["K", 2 ** 10]] as const) {
    if (bytes >= n) {
      const v = bytes / n;
      return `${Number.isInteger(v) ? v : v.toFixed(1)} ${u}iB`;
    }
  }
  return `${bytes} B`;
}
