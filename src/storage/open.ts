/**
 * The front door of storage: detect a disk's format by content and open,
 * create or describe it through the right driver.
 *
 * Detection (never by file extension): a host block device is pass-through
 * (type "passthrough", format "raw"); otherwise the first and last 64 KiB
 * are offered to the drivers in order VHDX ("vhdxfile" at offset 0), VHD
 * ("conectix" footer at the end, or its copy at offset 0), then raw, which
 * accepts anything.
 *
 * DEVNOTE: the driver list is built on each call, not at module load: the
 * VHD and VHDX drivers import this module to open parents, and a top-level
 * reference would hit their bindings before those modules have run.
 */
import * as fs from "node:fs";
import { DiskError, type BlockDevice, type DiskFormat, type OpenOptions } from "./block-device.js";
import type { CreateSpec, DiskDescription, DiskFormatDriver } from "./format-driver.js";
import { describePassthrough, isHostBlockDevice, openPassthrough } from "./passthrough.js";
import { rawDriver } from "./raw.js";
import { vhdDriver } from "./vhd/index.js";
import { vhdxDriver } from "./vhdx/index.js";

const PROBE_BYTES = 64 * 1024;

/** Drivers in probing order (raw last: it accepts anything). */
function drivers(): readonly DiskFormatDriver[] {
  return [vhdxDriver, vhdDriver, rawDriver];
}

export function driverFor(format: DiskFormat): DiskFormatDriver {
  const d = drivers().find((x) => x.format === format);
  if (d === undefined) throw new DiskError("UNKNOWN_FORMAT", `no driver for format ${String(format)}`, "");
  return d;
}

function readProbeWindows(path: string): { head: Uint8Array; tail: Uint8Array; size: number } {
  let fd: number;
  try {
    fd = fs.openSync(path, "r");
  } catch (e) {
    throw new DiskError("DISK_OPEN_FAILED", `cannot open: ${(e as Error).message}`, path);
  }
  try {
    const size = fs.fstatSync(fd).size;
    const head = new Uint8Array(Math.min(PROBE_BYTES, size));
    fs.readSync(fd, head, 0, head.length, 0);
    const tailLen = Math.min(PROBE_BYTES, size);
    const tail = new Uint8Array(tailLen);
    fs.readSync(fd, tail, 0, tailLen, size - tailLen);
    return { head, tail, size };
  } finally {
    fs.closeSync(fd);
  }
}

/** The format of the disk at `path`, by content ("raw" for host block devices). */
export function probeFormat(path: string): DiskFormat {
  if (isHostBlockDevice(path)) return "raw";
  const { head, tail, size } = readProbeWindows(path);
  for (const d of drivers()) if (d.probe(head, tail, size)) return d.format;
  return "raw";
}

/** Open any disk: block device, VHDX, VHD (with its parent chain) or raw. */
export function openDisk(path: string, options: OpenOptions = {}): BlockDevice {
  if (isHostBlockDevice(path)) return openPassthrough(path, options);
  return driverFor(probeFormat(path)).open(path, options);
}

export function createDisk(path: string, format: DiskFormat, spec: CreateSpec): void {
  driverFor(format).create(path, spec);
}

export function describeDisk(path: string): DiskDescription {
  if (isHostBlockDevice(path)) return describePassthrough(path);
  return driverFor(probeFormat(path)).describe(path);
}
