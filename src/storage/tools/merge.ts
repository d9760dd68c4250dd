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
 * DEVNOTE: the chain view is read through a second, read-only handle on the
 * parent whose cached metadata goes stale as the writable handle allocates.
 * That is harmless: blocks never move once allocated, and a range the stale
 * handle sees as unallocated reads as zeros / the grandparent, which is what
 * the writable handle left there, because it only wrote the ranges already
 * read.
 */
import { rmSync, statSync } from "node:fs";
import { dirname } from "node:path";
import { DiskError, type BlockDevice, type DiskFormat } from "../block-device.js";
import { copyIntoNewImage, type ConvertResult } from "./convert.js";
import { describeImage, driverFor, openAs, openImage } from "./formats.js";
import {
  DEFAULT_CHUNK_SIZE,
  DiskOperationCancelled,
  fsyncDirectory,
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

async function mergeIntoParent(childPath: string, options: DiskOperationOptions): Promise<MergeResult> {
  throwIfCancelled(options, childPath, "merge");
  const desc = describeImage(childPath);
  const parentPath = desc.parentPath;
  if (parentPath === undefined) throw new DiskError("DISK_PARENT_MISSING", "differencing disk names no parent", childPath);
  const parentDesc = describeImage(parentPath);
  if (parentDesc.virtualSize < desc.virtualSize) driverFor(parentDesc.format).resize(parentPath, desc.virtualSize);

  const chain = openImage(childPath, { readOnly: true });
  let parent: BlockDevice | undefined;
  let touched = false;
  const relink = (): void => {
    // Writing to a VHDX parent changes its DataWriteGuid; point the child at the parent as it is now.
    if (touched) driverFor(desc.format).setParent(childPath, parentPath, { force: true });
  };
  try {
    parent = openAs(parentPath, parentDesc.format);
    const chunk = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    const buf = new Uint8Array(chunk);
    let merged = 0;
    const size = chain.size;
    for (let pos = 0; pos < size; pos += chunk) {
      throwIfCancelled(options, childPath, "merge");
      const n = Math.min(chunk, size - pos);
      for (const e of chain.allocation(pos, n)) {
        if (e.state === "unallocated") continue;
        const view = buf.subarray(0, e.length);
        chain.read(e.offset, view);
        parent.write(e.offset, view);
        merged += e.length;
        if (!touched) {
          touched = true;
          parent.flush();
          relink();
        }
      }
      options.progress?.(pos + n, size);
      await yieldToEventLoop();
    }
    parent.flush();
    parent.close();
    parent = undefined;
    chain.close();
    if (options.signal?.aborted) {
      relink();
      throw new DiskOperationCancelled(childPath, "merge");
    }
    relink();
    rmSync(childPath);
    fsyncDirectory(dirname(childPath));
    return { path: parentPath, mergedBytes: merged, childRemoved: true };
  } catch (e) {
    try {
      parent?.flush();
      parent?.close();
    } catch {
      // already failing
    }
    try {
      chain.close();
    } catch {
      // closed already
    }
    if (statExists(childPath)) {
      try {
        relink();
      } catch {
        // reported by the original error; `set-parent --force` repairs it
      }
    }
    throw e;
  }
}

function statExists(path: string): boolean {
  try {
    statSync(path);
    return true;
  } catch {
    return false;
  }
}
