/**
 * The one place the tools reach the format layer (src/storage/open.ts and
 * src/storage/chain.ts), so the tools depend on a small, named surface.
 */
import { existsSync, statSync } from "node:fs";
import { DiskError, type BlockDevice, type DiskFormat, type OpenOptions } from "../block-device.js";
import type { CreateSpec, DiskDescription, DiskFormatDriver } from "../format-driver.js";
import { createDisk, describeDisk, driverFor, openDisk, probeFormat } from "../open.js";
import { describeChain } from "../chain.js";

/** Fail with a DiskError naming the file when it is missing or not a file/device. */
export function requireImage(path: string): void {
  if (!existsSync(path)) throw new DiskError("DISK_NOT_FOUND", "no such file", path);
  const st = statSync(path);
  if (!st.isFile() && !st.isBlockDevice()) throw new DiskError("DISK_NOT_A_FILE", "not a regular file or block device", path);
}

export function formatOf(path: string): DiskFormat {
  requireImage(path);
  return probeFormat(path);
}

export function driverOf(path: string): DiskFormatDriver {
  return driverFor(formatOf(path));
}

export function openImage(path: string, options: OpenOptions = {}): BlockDevice {
  requireImage(path);
  return openDisk(path, options);
}

/** Create with an explicit format (temporary files have no telling extension). */
export function createImage(path: string, format: DiskFormat, spec: CreateSpec): void {
  createDisk(path, format, spec);
}

/** Open a file of a known format directly through its driver. */
export function openAs(path: string, format: DiskFormat, options: OpenOptions = {}): BlockDevice {
  return driverFor(format).open(path, options);
}

export function describeImage(path: string): DiskDescription {
  requireImage(path);
  return describeDisk(path);
}

/** The chain from `path` (first) to its base (last). */
export function describeImageChain(path: string): DiskDescription[] {
  requireImage(path);
  return [...describeChain(path)];
}

export { driverFor };
