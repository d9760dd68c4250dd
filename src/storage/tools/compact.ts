/**
 * compactDisk: drop blocks that do not need to be stored (Optimize-VHD).
 *
 * A dynamic disk drops its all-zero blocks; a differencing disk drops blocks
 * that read the same as its parent does there. The image is rewritten into a
 * temporary sibling with the same format, type, block size, sector sizes and
 * parent, fsynced and renamed over the original, so a cancel or crash leaves
 * the original untouched.
 *
 * DEVNOTE: the rewritten file is a new image with its own unique id (the
 * driver contract has no way to carry ids across); disks that name this one
 * as parent must be re-pointed with setParentDisk(..., {force: true}).
 */
import { DiskError, type BlockDevice } from "../block-device.js";
import { createImage, describeImage, openAs, openImage } from "./formats.js";
import {
  commitTemporary,
  fileSize,
  isZeroRange,
  removeQuietly,
  temporarySibling,
  throwIfCancelled,
  yieldToEventLoop,
  type DiskOperationOptions,
} from "./operation.js";

export interface CompactResult {
  readonly path: string;
  readonly fileSizeBefore: number;
  readonly fileSizeAfter: number;
  /** fileSizeBefore - fileSizeAfter (never negative). */
  readonly reclaimedBytes: number;
  /** Blocks that held data in this layer before, and how many were dropped. */
  readonly blocksBefore: number;
  readonly blocksDropped: number;
}

export async function compactDisk(path: string, options: DiskOperationOptions = {}): Promise<CompactResult> {
  const desc = describeImage(path);
  if (desc.format === "raw" || (desc.type !== "dynamic" && desc.type !== "differencing"))
    throw new DiskError("DISK_NOT_COMPACTABLE", `compact works on dynamic and differencing VHD/VHDX, this is ${desc.format} ${desc.type}`, path);
  const blockSize = desc.blockSize ?? 2 * 1024 * 1024;
  const before = fileSize(path);
  const src = openImage(path, { readOnly: true });
  const tmp = temporarySibling(path);
  let dst: BlockDevice | undefined;
  try {
    createImage(tmp, desc.format, {
      type: desc.type,
      size: desc.virtualSize,
      blockSize,
      logicalSectorSize: desc.logicalSectorSize === 4096 ? 4096 : 512,
      physicalSectorSize: desc.physicalSectorSize === 4096 ? 4096 : 512,
      ...(desc.parentPath !== undefined ? { parentPath: desc.parentPath } : {}),
    });
    dst = openAs(tmp, desc.format);
    const data = new Uint8Array(blockSize);
    const under = new Uint8Array(blockSize);
    let blocksBefore = 0;
    let dropped = 0;
    // Yield about every 4 MiB of block I/O.
    const blocksPerYield = Math.max(1, Math.floor((4 * 1024 * 1024) / blockSize));
    let sinceYield = 0;
    for (let pos = 0; pos < src.size; pos += blockSize) {
      throwIfCancelled(options, path, "compact");
      const n = Math.min(blockSize, src.size - pos);
      const extents = src.allocation(pos, n);
      if (extents.some((e) => e.state !== "unallocated")) {
        blocksBefore++;
        const view = data.subarray(0, n);
        src.read(pos, view);
        let needed: boolean;
        if (src.parent === undefined) needed = !isZeroRange(view);
        else {
          const parentView = under.subarray(0, n);
          src.parent.read(pos, parentView);
          needed = Buffer.compare(view, parentView) !== 0;
        }
        if (needed) {
          // Keep the layer's exact extent set: copy only what this layer holds.
          for (const e of extents) if (e.state !== "unallocated") dst.write(e.offset, view.subarray(e.offset - pos, e.offset - pos + e.length));
        } else dropped++;
      }
      options.progress?.(pos + n, src.size);
      if (++sinceYield >= blocksPerYield) {
        sinceYield = 0;
        await yieldToEventLoop();
      }
    }
    dst.flush();
    dst.close();
    dst = undefined;
    src.close();
    throwIfCancelled(options, path, "compact");
    commitTemporary(tmp, path);
    const after = fileSize(path);
    return { path, fileSizeBefore: before, fileSizeAfter: after, reclaimedBytes: Math.max(0, before - after), blocksBefore, blocksDropped: dropped };
  } catch (e) {
    try {
      dst?.close();
    } catch {
      // already failing
    }
    try {
      src.close();
    } catch {
      // closed already
    }
    removeQuietly(tmp);
    throw e;
  }
}
