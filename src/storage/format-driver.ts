/**
 * What each on-disk format (raw, VHD, VHDX) provides to the rest of storage:
 * probing, open, create, describe, check, resize and re-parenting. Generic
 * tools (convert, merge, compact, info over a chain) are built on these and
 * on the BlockDevice interface, in src/storage/tools/.
 *
 * Everything here is synchronous; long generic operations live in the tools
 * and yield between chunks so they can show progress and be cancelled.
 */
import type { BlockDevice, DiskFormat, DiskType, OpenOptions } from "./block-device.js";

export interface CreateSpec {
  readonly type: "fixed" | "dynamic" | "differencing";
  /** Virtual size in bytes; for differencing, defaults to the parent's. */
  readonly size?: number;
  /** Block size in bytes (VHD default 2 MiB, VHDX default 32 MiB). */
  readonly blockSize?: number;
  /** Parent image for differencing disks. */
  readonly parentPath?: string;
  readonly logicalSectorSize?: 512 | 4096;
  readonly physicalSectorSize?: 512 | 4096;
}

export interface CheckFinding {
  readonly severity: "error" | "warning" | "repaired";
  /** File offset the finding is about, where there is one. */
  readonly offset?: number;
  readonly message: string;
}

export interface DiskDescription {
  readonly path: string;
  readonly format: DiskFormat;
  readonly type: DiskType;
  readonly virtualSize: number;
  /** Bytes the file occupies (apparent size). */
  readonly fileSize: number;
  readonly blockSize?: number;
  readonly logicalSectorSize: number;
  readonly physicalSectorSize: number;
  /** Bytes of the virtual disk allocated in this layer. */
  readonly allocatedBytes: number;
  readonly uniqueId?: string;
  readonly parentId?: string;
  /** Parent path as resolved (absolute), and the raw locator entries found. */
  readonly parentPath?: string;
  readonly parentLocators?: readonly { readonly kind: string; readonly path: string }[];
  /** VHDX: the log needed replay when opened. */
  readonly logReplayNeeded?: boolean;
}

export interface DiskFormatDriver {
  readonly format: DiskFormat;
  /** Largest virtual size this format allows, in bytes. */
  readonly maxSize: number;
  /** Whether the first and last 64 KiB of a file (and its size) look like this format. */
  probe(head: Uint8Array, tail: Uint8Array, fileSize: number): boolean;
  open(path: string, options?: OpenOptions): BlockDevice;
  create(path: string, spec: CreateSpec): void;
  describe(path: string): DiskDescription;
  /** Structural check; with repair, fixes what is safe and reports it as "repaired". */
  check(path: string, options?: { repair?: boolean }): CheckFinding[];
  /** Grow, or shrink when the tail is unallocated (else a DiskError). */
  resize(path: string, newSize: number): void;
  /** Point a differencing disk at a new parent (its identity must match, unless force). */
  setParent(path: string, parentPath: string, options?: { force?: boolean }): void;
}
