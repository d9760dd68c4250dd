/**
 * mergeDisk: fold a differencing disk into its parent (Merge-VHD,
 * `qemu-img commit`), or flatten its whole chain into a new image.
 *
 * Into the parent, the merge is in place and restartable:
 *  - The child file is only read until the very end (when it is deleted).
 *  - For every range the child holds, the merge writes into the parent what
 *    the chain child→parent reads there. The child shadows exactly those
 *    ranges, so the chain keeps reading the same bytes whatever subset of
 *    writes has reached the parent, and repeating a write changes nothing.
 *  - Every write goes through the parent's driver, whose own ordering
 *    (VHD: data before BAT; VHDX: log) keeps the parent structurally valid
 *    after a crash at any point.
 * So a cancelled, failed or killed merge leaves both files valid, the chain
 * reading exactly as before, and running the merge again completes it. (The
 * parent on its own then holds a mix of old and merged data, as with any
 * merge: other children of that parent are invalidated once a merge starts.)
 *
 * One identity wrinkle: the first data write of a session gives a VHDX
 * parent a new DataWriteGuid, which the child records as its parent linkage.
 * The merge therefore re-links the child (setParent, forced) once the parent
 * is closed: after completion, cancel or failure. Against a kill, a sidecar
 * marker `.<child>.partis-merge` naming the parent is written (and fsynced)
 * before the first write and removed last; a rerun that finds it re-links
 * the child to that parent and carries on. (VHD parents keep their unique
 * id, so the re-link changes nothing there.)
 *
 * DEVNOTE: the chain view is read through a second, read-only handle on the
 * parent whose cached metadata goes stale as the writable handle allocates.
 * That is harmless: blocks never move once allocated, and a range the stale
 * handle sees as unallocated reads as zeros / the grandparent, which is what
 * the writable handle left there, because it only wrote the ranges already
 * read.
 */
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { DiskError, type BlockDevice, type DiskFormat } from "../block-device.js";
import { copyIntoNewImage, type ConvertResult } from "./convert.js";
import { describeImage, driverFor, openAs, openImage } from "./formats.js";
import {
  DEFAULT_CHUNK_SIZE,
  DiskOperationCancelled,
  fsyncDirectory,
  fsyncFile,
  throwIfCancelled,
  yieldToEventLoop,
  type DiskOperationOptions,
} from "./operation.js";

export type MergeTarget =
  | { readonly into: "parent" }
  | { readonly into: "new"; readonly path: string; readonly format: DiskFormat; readonly type: "fixed" | "dynamic"; readonly blockSize?: number };

export interface MergeResult {
  /** The image now holding the merged data. */
  readonly path: string;
  /** Bytes of virtual disk copied. */
  readonly mergedBytes: number;
  /** Whether the child file was deleted (merge into parent). */
  readonly childRemoved: boolean;
}

export async function mergeDisk(childPath: string, target: MergeTarget, options: DiskOperationOptions = {}): Promise<MergeResult> {
  const desc = describeImage(childPath);
  if (desc.type !== "differencing")
    throw new DiskError("DISK_NOT_DIFFERENCING", `merge needs a differencing disk, this is ${desc.type}`, childPath);
  if (target.into === "new") {
    const src = openImage(childPath, { readOnly: true });
    try {
      const r: ConvertResult = await copyIntoNewImage(src, target.path, { ...options, format: target.format, type: target.type, ...(target.blockSize !== undefined ? { blockSize: target.blockSize } : {}) }, "merge");
      return { path: r.path, mergedBytes: r.dataBytes, childRemoved: false };
    } finally {
      src.close();
    }
  }
  return mergeIntoParent(childPath, options);
}

/** Sidecar that marks a merge in progress (see the module comment). */
function mergeMarker(childPath: string): string {
  return join(dirname(childPath), `.${basename(childPath)}.partis-merge`);
}

async function mergeIntoParent(childPath: string, options: DiskOperationOptions): Promise<MergeResult> {
  throwIfCancelled(options, childPath, "merge");
  const marker = mergeMarker(childPath);
  const desc = describeImage(childPath);
  if (desc.parentPath === undefined) throw new DiskError("DISK_PARENT_MISSING", "differencing disk names no parent", childPath);
  const parentPath = resolve(desc.parentPath);
  const relink = (): void => driverFor(desc.format).setParent(childPath, parentPath, { force: true });
  // Resuming an interrupted merge: the parent changed identity under the child (VHDX DataWriteGuid); re-link first.
  if (existsSync(marker)) {
    const recorded = readMarker(marker);
    if (recorded !== parentPath) throw new DiskError("DISK_MERGE_MARKER", `an interrupted merge into ${recorded} is pending; finish it with that parent, or delete ${marker}`, childPath);
    relink();
  }
  const parentDesc = describeImage(parentPath);
  writeMarker(marker, parentPath);
  if (parentDesc.virtualSize < desc.virtualSize) driverFor(parentDesc.format).resize(parentPath, desc.virtualSize);

  const chain = openImage(childPath, { readOnly: true });
  let parent: BlockDevice | undefined;
  let touched = false;
  let merged = 0;
  try {
    parent = openAs(parentPath, parentDesc.format);
    const chunk = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    const buf = new Uint8Array(chunk);
    const size = chain.size;
    for (let pos = 0; pos < size; pos += chunk) {
      if (options.signal?.aborted) break;
      const n = Math.min(chunk, size - pos);
      for (const e of chain.allocation(pos, n)) {
        if (e.state === "unallocated") continue;
        const view = buf.subarray(0, e.length);
        chain.read(e.offset, view);
        touched = true;
        parent.write(e.offset, view);
        merged += e.length;
      }
      options.progress?.(pos + n, size);
      await yieldToEventLoop();
    }
    parent.flush();
  } finally {
    // Close the writable parent before anything reads it again (a VHDX keeps its log live while open).
    try {
      parent?.close();
    } finally {
      chain.close();
    }
    if (touched) relink();
  }
  if (options.signal?.aborted) {
    rmSync(marker, { force: true });
    throw new DiskOperationCancelled(childPath, "merge");
  }
  rmSync(childPath);
  fsyncDirectory(dirname(childPath));
  rmSync(marker, { force: true });
  return { path: parentPath, mergedBytes: merged, childRemoved: true };
}

function writeMarker(marker: string, parentPath: string): void {
  writeFileSync(marker, JSON.stringify({ kind: "partis-merge", version: 1, parentPath }) + "\n");
  fsyncFile(marker);
  fsyncDirectory(dirname(marker));
}

function readMarker(marker: string): string {
  try {
    const m = JSON.parse(readFileSync(marker, "utf8")) as { kind?: unknown; parentPath?: unknown };
    if (m.kind === "partis-merge" && typeof m.parentPath === "string") return m.parentPath;
  } catch {
    // fall through
  }
  throw new DiskError("DISK_MERGE_MARKER", "unreadable merge marker; delete it after checking the chain", marker);
}
