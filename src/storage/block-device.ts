/**
 * The one block-device interface every disk back end implements (raw file,
 * pass-through host block device, VHD, VHDX, and layered chains), and that
 * device models (virtio-blk, IDE) and the disk tools consume.
 *
 * The interface is synchronous (pread/pwrite semantics): device back ends run
 * on their own threads, and synchronous code keeps write ordering (and so
 * crash safety) easy to reason about. Offsets and lengths are bytes, numbers
 * (exact to 2^53 = 8 PiB, beyond the 64 TiB VHDX maximum).
 */
import { PartisError } from "../errors.js";

/** A disk problem with the file and, where known, the offset involved. */
export class DiskError extends PartisError {
  constructor(code: string, message: string, readonly path: string, context: Record<string, string | number | bigint | boolean | undefined> = {}) {
    super(code, `${path}: ${message}`, { path, ...context });
  }
}

export type DiskFormat = "raw" | "vhd" | "vhdx";
export type DiskType = "fixed" | "dynamic" | "differencing" | "raw" | "passthrough";

/** How a range of the virtual disk is backed (for info, merge, compact, backup). */
export type AllocationState =
  /** Data lives in this layer. */
  | "allocated"
  /** Not present in this layer: reads fall through to the parent (differencing) or return zeros. */
  | "unallocated"
  /** Known to read as zeros without touching storage (VHDX PAYLOAD_BLOCK_ZERO, discarded). */
  | "zero";

export interface AllocationExtent {
  readonly offset: number;
  readonly length: number;
  readonly state: AllocationState;
}

/**
 * A queue of asynchronous file requests, as the storage layer uses one (an
 * io_uring: src/hypervisor/io-uring.ts). Each call prepares one request and
 * returns false, having prepared nothing, when the queue is full; the owner
 * submits the batch and later hands back each completion by its token.
 */
export interface HostIoQueue {
  prepareVectored(write: boolean, fd: number, offset: number, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): boolean;
  prepareFsync(fd: number, dataOnly: boolean, token: number): boolean;
}

/** A HostIoQueue its owner drives (src/hypervisor/io-uring.ts's IoUring): what virtio-blk and the IDE's bus-master engine queue disk requests on. */
export interface BlockRequestRing extends HostIoQueue {
  readonly entries: number;
  /** Hand the prepared requests to the kernel. */
  submit(): void;
  /** Completions that have arrived, each as (token, bytes or -errno). */
  reap(handler: (token: number, result: number) => void): number;
  /** Clear the completion event the integrator watches (before reap). */
  takeEvent(): void;
  /** Submit, then wait for every request in flight, handing each completion over. */
  drain(handler: (token: number, result: number) => void): void;
}

/** Bytes in the first `count` host spans (readHost/writeHost/queueHost's lengths). */
export function spanTotal(lengths: Uint32Array, count: number): number {
  let total = 0;
  for (let i = 0; i < count; i++) total += lengths[i]!;
  return total;
}

export interface BlockDevice {
  /** Path of the file or device (for messages). */
  readonly path: string;
  readonly format: DiskFormat;
  readonly type: DiskType;
  /** Virtual size in bytes (a multiple of logicalSectorSize). */
  readonly size: number;
  readonly logicalSectorSize: number;
  readonly physicalSectorSize: number;
  readonly readOnly: boolean;
  /** Remarks on how the disk runs, e.g. why O_DIRECT was asked for and is not in use (raw, pass-through). */
  readonly notes?: readonly string[];
  /** Parent in a differencing chain, if any (opened read-only). */
  readonly parent: BlockDevice | undefined;

  /** Read buf.length bytes at offset. Unallocated ranges read as parent data or zeros. */
  read(offset: number, buf: Uint8Array): void;
  /** Write buf at offset (allocating as needed). Offsets/lengths need not be sector-aligned. */
  write(offset: number, buf: Uint8Array): void;
  /** Make every completed write durable (metadata included), in the documented order. */
  flush(): void;
  /** Hint that a range is no longer needed; reads may then return zeros. */
  discard(offset: number, length: number): void;
  /**
   * Optional: make [offset, offset+length) read as zeros without writing
   * zeros (raw files: a punched hole when `deallocate` is allowed, else
   * fallocate ZERO_RANGE). False, having done nothing, when the back end
   * cannot; the caller then writes zeros.
   */
  writeZeroes?(offset: number, length: number, deallocate: boolean): boolean;
  /** Allocation of [offset, offset+length) in this layer only, as ordered, merged extents. */
  allocation(offset: number, length: number): AllocationExtent[];
  /** Flush and close; closes the parent chain too. */
  close(): void;
  /**
   * Optional scatter/gather forms of read and write: the `count` first
   * segments, back to back from `offset`, in one system call where the back end
   * can (raw files: preadv/pwritev). Returns false, having done nothing, when
   * it cannot take these segments (they are not host-mapped memory, or the
   * file is open with O_DIRECT); the caller then uses read/write per segment.
   */
  readVectored?(offset: number, segments: readonly Uint8Array[], count: number): boolean;
  writeVectored?(offset: number, segments: readonly Uint8Array[], count: number): boolean;
  /**
   * The same over host spans given as numbers (guest RAM from
   * GuestMemory.hostAddresses: no view per segment). Returns false when the back
   * end cannot take them, or the transfer came out short; the caller then
   * redoes the whole request another way (reads and writes are idempotent).
   */
  readHost?(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean;
  writeHost?(offset: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean;
  /**
   * Optional: what readHost/writeHost would do, without ever waiting for the
   * disk: "done" when it could be done at once (the page cache took it),
   * "queued" when it went on `queue` instead (the completion, bytes moved or
   * -errno, comes back to the queue's owner with `token`). The range and
   * read-only checks happen here (DiskError, nothing done). False, having
   * done nothing, when this disk cannot (O_DIRECT bounce buffers, spans not
   * host-mapped, a file system that cannot try without waiting) or the queue
   * is full: the caller then does it synchronously.
   */
  queueHost?(queue: HostIoQueue, write: boolean, offset: number, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): "done" | "queued" | false;
  /** Optional: queue what flush() would do (false: do it synchronously). */
  queueFlush?(queue: HostIoQueue, token: number): boolean;
}

/**
 * How a disk uses the host's page cache, named as QEMU and Proxmox name it:
 * - writeback (default): through the page cache; a guest flush is an fsync;
 * - none: O_DIRECT, bypassing the page cache (Hyper-V's unbuffered I/O); a
 *   guest flush still reaches the device's write cache with an fsync;
 * - writethrough: through the page cache, every write synchronous (O_DSYNC);
 * - directsync: O_DIRECT and O_DSYNC;
 * - unsafe: through the page cache, guest flushes ignored (scratch VMs: a
 *   host crash can lose what the guest believed stable).
 * Every format takes every mode; a differencing disk's parents are opened
 * with O_DIRECT when it is. A VHD's or VHDX's own metadata I/O goes through
 * an aligned bounce buffer under O_DIRECT, its payload straight.
 */
export type CacheMode = "writeback" | "none" | "writethrough" | "directsync" | "unsafe";
export const CACHE_MODES: readonly CacheMode[] = ["writeback", "none", "writethrough", "directsync", "unsafe"];

/** The open options a cache mode stands for. */
export function cacheOpenOptions(mode: CacheMode): Pick<OpenOptions, "direct" | "writeThrough" | "ignoreFlush"> {
  return {
    direct: mode === "none" || mode === "directsync",
    writeThrough: mode === "writethrough" || mode === "directsync",
    ignoreFlush: mode === "unsafe",
  };
}

export interface OpenOptions {
  readOnly?: boolean;
  /** Use O_DIRECT where the host allows it (every format; a differencing disk's parents too). */
  direct?: boolean;
  /** Open with O_DSYNC: every write is stable when it completes. */
  writeThrough?: boolean;
  /** Guest flushes do nothing (cache=unsafe): no fsync; VHD and VHDX still publish metadata in order. */
  ignoreFlush?: boolean;
  /** Do not open parents (inspection tools). */
  noParent?: boolean;
}
