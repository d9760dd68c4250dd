/**
 * What every long disk tool shares: options for progress and cancellation,
 * chunked iteration that yields to the event loop, temporary sibling files
 * that are fsynced and renamed into place (or deleted on failure), and the
 * error a cancelled operation throws.
 *
 * DEVNOTE: the block-device interface is synchronous; the tools stay
 * responsive (progress, Ctrl-C) by doing one chunk (4 MiB) of synchronous
 * I/O, then awaiting setImmediate before the next one.
 */
import { closeSync, fsyncSync, openSync, renameSync, rmSync, statSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { basename, dirname, join } from "node:path";
import { DiskError, type BlockDevice } from "../block-device.js";

/** Options every long-running tool accepts. */
export interface DiskOperationOptions {
  /** Called after each chunk with bytes done and total (both over the virtual size). */
  progress?: (doneBytes: number, totalBytes: number) => void;
  /** Aborting cancels at the next chunk boundary; nothing is left half-written. */
  signal?: AbortSignal;
  /** Bytes of I/O between yields (default 4 MiB). */
  chunkSize?: number;
}

export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024;

/** Thrown when a tool stops because its AbortSignal fired. Nothing was changed. */
export class DiskOperationCancelled extends DiskError {
  constructor(path: string, operation: string) {
    super("DISK_OPERATION_CANCELLED", `${operation} cancelled, nothing changed`, path, { operation });
  }
}

export function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export function throwIfCancelled(options: DiskOperationOptions, path: string, operation: string): void {
  if (options.signal?.aborted) throw new DiskOperationCancelled(path, operation);
}

/** A temporary file name beside `path` (same directory, so rename is atomic). */
export function temporarySibling(path: string): string {
  return join(dirname(path), `.${basename(path)}.partis-tmp-${process.pid}-${randomBytes(4).toString("hex")}`);
}

export function fsyncFile(path: string): void {
  const fd = openSync(path, "r+");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export function fsyncDirectory(dir: string): void {
  const fd = openSync(dir, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** fsync `tmp`, rename it over `finalPath` atomically, fsync the directory. */
export function commitTemporary(tmp: string, finalPath: string): void {
  fsyncFile(tmp);
  renameSync(tmp, finalPath);
  fsyncDirectory(dirname(finalPath));
}

export function removeQuietly(path: string): void {
  try {
    rmSync(path, { force: true });
  } catch {
    // best effort: the caller is already reporting a failure
  }
}

export function fileSize(path: string): number {
  return statSync(path).size;
}

const ZERO = Buffer.alloc(DEFAULT_CHUNK_SIZE);

/** Whether buf[start, end) is all zero bytes (memcmp against a zero page). */
export function isZeroRange(buf: Uint8Array, start = 0, end = buf.length): boolean {
  let pos = start;
  while (pos < end) {
    const n = Math.min(end - pos, ZERO.length);
    if (Buffer.compare(buf.subarray(pos, pos + n), ZERO.subarray(0, n)) !== 0) return false;
    pos += n;
  }
  return true;
}

/** Ranges of [offset, offset+length) that hold data in some layer of the chain. */
export function chainDataRanges(dev: BlockDevice, offset: number, length: number): { offset: number; length: number }[] {
  const marks: { offset: number; length: number }[] = [];
  for (let layer: BlockDevice | undefined = dev; layer !== undefined; layer = layer.parent) {
    for (const e of layer.allocation(offset, length)) if (e.state === "allocated") marks.push({ offset: e.offset, length: e.length });
  }
  marks.sort((a, b) => a.offset - b.offset);
  const merged: { offset: number; length: number }[] = [];
  for (const m of marks) {
    const last = merged[merged.length - 1];
    if (last !== undefined && m.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, m.offset + m.length - last.offset);
    } else merged.push({ ...m });
  }
  return merged;
}

/**
 * Write buf (the contents of [offset, offset+buf.length)) to dst, skipping
 * all-zero runs of `grain` bytes: the target is fresh, so zeros are already there.
 * Returns the bytes actually written.
 */
export function writeNonZero(dst: BlockDevice, offset: number, buf: Uint8Array, grain = 4096): number {
  let written = 0;
  let runStart = -1;
  for (let pos = 0; pos < buf.length; pos += grain) {
    const end = Math.min(pos + grain, buf.length);
    const zero = isZeroRange(buf, pos, end);
    if (!zero && runStart < 0) runStart = pos;
    if (zero && runStart >= 0) {
      dst.write(offset + runStart, buf.subarray(runStart, pos));
      written += pos - runStart;
      runStart = -1;
    }
  }
  if (runStart >= 0) {
    dst.write(offset + runStart, buf.subarray(runStart));
    written += buf.length - runStart;
  }
  return written;
}
