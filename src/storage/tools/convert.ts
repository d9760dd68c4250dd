/**
 * convertDisk: copy what a disk (or a whole differencing chain) reads into a
 * new image of any format and type: the result is flattened (Convert-VHD,
 * `qemu-img convert`).
 *
 * Only ranges holding data in some layer are read, and all-zero 4 KiB runs
 * are never written (a fresh target already reads zeros), so dynamic targets
 * stay sparse. The target is built in a temporary file beside the
 * destination, fsynced and renamed into place; on failure or cancel the
 * temporary file is deleted and nothing else was touched.
 */
import { existsSync } from "node:fs";
import { DiskError, type BlockDevice, type DiskFormat } from "../block-device.js";
import { createImage, openAs, openImage } from "./formats.js";
import {
  DEFAULT_CHUNK_SIZE,
  chainDataRanges,
  commitTemporary,
  fileSize,
  removeQuietly,
  temporarySibling,
  throwIfCancelled,
  writeNonZero,
  yieldToEventLoop,
  type DiskOperationOptions,
} from "./operation.js";

export interface ConvertOptions extends DiskOperationOptions {
  readonly format: DiskFormat;
  readonly type: "fixed" | "dynamic";
  readonly blockSize?: number;
  /** Replace an existing destination (default: refuse). */
  readonly overwrite?: boolean;
}

export interface ConvertResult {
  readonly path: string;
  readonly virtualSize: number;
  /** Bytes of data written to the target (zeros skipped). */
  readonly dataBytes: number;
  readonly fileSize: number;
}

export async function convertDisk(srcPath: string, dstPath: string, options: ConvertOptions): Promise<ConvertResult> {
  if (existsSync(dstPath) && options.overwrite !== true)
    throw new DiskError("DISK_EXISTS", "destination already exists", dstPath);
  const src = openImage(srcPath, { readOnly: true });
  try {
    return await copyIntoNewImage(src, dstPath, options, "convert");
  } finally {
    src.close();
  }
}

/**
 * Copy the chain view of `src` into a new image at dstPath (through a
 * temporary sibling). Shared by convert and merge-into-new.
 */
export async function copyIntoNewImage(src: BlockDevice, dstPath: string, options: ConvertOptions, operation: string): Promise<ConvertResult> {
  throwIfCancelled(options, dstPath, operation);
  const tmp = temporarySibling(dstPath);
  let dst: BlockDevice | undefined;
  try {
    createImage(tmp, options.format, {
      type: options.type,
      size: src.size,
      ...(options.blockSize !== undefined ? { blockSize: options.blockSize } : {}),
      logicalSectorSize: src.logicalSectorSize === 4096 ? 4096 : 512,
      physicalSectorSize: src.physicalSectorSize === 4096 ? 4096 : 512,
    });
    dst = openAs(tmp, options.format);
    if (dst.size < src.size) throw new DiskError("DISK_SIZE_MISMATCH", `target has ${dst.size} bytes, source ${src.size}`, dstPath);
    const dataBytes = await copyChainView(src, dst, 0, src.size, options, dstPath, operation);
    dst.flush();
    dst.close();
    dst = undefined;
    throwIfCancelled(options, dstPath, operation);
    commitTemporary(tmp, dstPath);
    return { path: dstPath, virtualSize: src.size, dataBytes, fileSize: fileSize(dstPath) };
  } catch (e) {
    try {
      dst?.close();
    } catch {
      // already failing
    }
    removeQuietly(tmp);
    throw e;
  }
}

/**
 * Copy what src reads over [offset, offset+length) into dst, chunk by chunk,
 * reading only ranges with data somewhere in the chain and writing only
 * non-zero runs. Returns bytes written.
 */
export async function copyChainView(
  src: BlockDevice,
  dst: BlockDevice,
  offset: number,
  length: number,
  options: DiskOperationOptions,
  path: string,
  operation: string,
): Promise<number> {
  const chunk = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
  const buf = new Uint8Array(chunk);
  const end = offset + length;
  let written = 0;
  for (let pos = offset; pos < end; pos += chunk) {
    throwIfCancelled(options, path, operation);
    const n = Math.min(chunk, end - pos);
    for (const r of chainDataRanges(src, pos, n)) {
      const view = buf.subarray(0, r.length);
      src.read(r.offset, view);
      written += writeNonZero(dst, r.offset, view);
    }
    options.progress?.(pos + n - offset, length);
    await yieldToEventLoop();
  }
  return written;
}
