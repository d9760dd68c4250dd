/**
 * Creating VHDX files. Layout: header section 0-1 MiB, log 1-2 MiB (1 MiB,
 * as QEMU and Hyper-V use), metadata region 2-3 MiB, BAT from 3 MiB (rounded
 * up to 1 MiB, so it can grow in place a little), then payload. (QEMU 7.2
 * puts the BAT at 2 MiB and metadata at 3 MiB, and marks both regions
 * not required; readers must not depend on either.) A
 * fixed disk gets every block FULLY_PRESENT at consecutive offsets after the
 * BAT, with the space reserved by extending the file (sparse on Linux).
 *
 * Order: everything but the headers is written first, then both headers,
 * then one fdatasync, so a file cut short by a crash has no valid header
 * and is refused rather than half-used.
 */
import { DiskError, type BlockDevice } from "../block-device.js";
import type { CreateSpec } from "../format-driver.js";
import { describeDisk, openDisk } from "../open.js";
import { BatGeometry, BatTable, PAYLOAD_BLOCK_FULLY_PRESENT } from "./bat.js";
import { guidFromString, newGuid, ZERO_GUID } from "./guid.js";
import { encodeFileIdentifier, encodeHeader, HEADER_OFFSETS } from "./header.js";
import { HostFile, MiB } from "./host-file.js";
import { encodeMetadata, MAX_VIRTUAL_SIZE, validBlockSize, type ParentLocator } from "./metadata.js";
import { buildParentLocator, linkageString } from "./parent.js";
import { BAT_REGION_GUID, encodeRegionTable, METADATA_REGION_GUID, REGION_TABLE_OFFSETS } from "./region-table.js";
import { VhdxDisk } from "./vhdx-disk.js";

export const CREATOR = "Partis VHDX driver";
export const LOG_OFFSET = MiB;
export const LOG_LENGTH = MiB;
const METADATA_OFFSET = 2 * MiB;
const METADATA_LENGTH = MiB;
const BAT_OFFSET = 3 * MiB;
const DEFAULT_BLOCK_SIZE = 32 * MiB;
/** Differencing disks default to 2 MiB blocks (as Hyper-V does): less copying per first write. */
const DEFAULT_DIFF_BLOCK_SIZE = 2 * MiB;

/** The identity a child records for `parent` (VHDX: its DataWriteGuid; VHD: its unique ID). */
export function parentIdentity(parentPath: string, parent: BlockDevice): string {
  if (parent instanceof VhdxDisk) return linkageString(parent.dataWriteGuid);
  const id = describeDisk(parentPath).uniqueId;
  const g = id === undefined ? undefined : guidFromString(id);
  if (!g) throw new DiskError("VHDX_PARENT_NO_IDENTITY", `parent ${parentPath} has no unique identity to link to`, parentPath);
  return linkageString(g);
}

export function validateVirtualSize(path: string, size: number, logicalSectorSize: number): void {
  if (!Number.isSafeInteger(size) || size <= 0) throw new DiskError("VHDX_BAD_SIZE", `virtual size ${size} is not a positive integer`, path);
  if (size > MAX_VIRTUAL_SIZE) throw new DiskError("VHDX_TOO_LARGE", `virtual size ${size} exceeds the VHDX maximum of 64 TiB (${MAX_VIRTUAL_SIZE} bytes)`, path);
  if (size % logicalSectorSize !== 0) throw new DiskError("VHDX_BAD_SIZE", `virtual size ${size} is not a multiple of the logical sector size ${logicalSectorSize}`, path);
}

export function createVhdx(path: string, spec: CreateSpec): void {
  let size = spec.size;
  let logical = spec.logicalSectorSize;
  let locator: ParentLocator | undefined;
  if (spec.type === "differencing") {
    if (!spec.parentPath) throw new DiskError("VHDX_NO_PARENT", "a differencing disk needs a parent", path);
    const parent = openDisk(spec.parentPath, { readOnly: true });
    try {
      size ??= parent.size;
      logical ??= parent.logicalSectorSize as 512 | 4096;
      if (logical !== parent.logicalSectorSize) throw new DiskError("VHDX_PARENT_SECTOR_SIZE", `logical sector size ${logical} differs from parent ${spec.parentPath} (${parent.logicalSectorSize})`, path);
      locator = buildParentLocator(path, spec.parentPath, parentIdentity(spec.parentPath, parent));
    } finally {
      parent.close();
    }
  }
  logical ??= 512;
  const physical = spec.physicalSectorSize ?? 4096;
  if (size === undefined) throw new DiskError("VHDX_BAD_SIZE", "a virtual size is required", path);
  validateVirtualSize(path, size, logical);
  const blockSize = spec.blockSize ?? (spec.type === "differencing" ? DEFAULT_DIFF_BLOCK_SIZE : DEFAULT_BLOCK_SIZE);
  if (!validBlockSize(blockSize)) throw new DiskError("VHDX_BAD_BLOCK_SIZE", `block size ${blockSize} is not a power of two between 1 MiB and 256 MiB`, path);
  const fixed = spec.type === "fixed";
  const geo = new BatGeometry(size, blockSize, logical, spec.type === "differencing");
  const batLength = geo.regionBytes();
  if (batLength > 0xffffffff - MiB) throw new DiskError("VHDX_BAD_BLOCK_SIZE", "BAT would exceed 4 GiB; choose a larger block size", path);
  const payloadStart = BAT_OFFSET + batLength;

  const file = HostFile.create(path);
  try {
    file.write(0, encodeFileIdentifier(CREATOR));
    const regions = encodeRegionTable([
      { guid: BAT_REGION_GUID, fileOffset: BAT_OFFSET, length: batLength, required: true },
      { guid: METADATA_REGION_GUID, fileOffset: METADATA_OFFSET, length: METADATA_LENGTH, required: true },
    ]);
    file.write(REGION_TABLE_OFFSETS[0], regions);
    file.write(REGION_TABLE_OFFSETS[1], regions);
    const metadata = encodeMetadata(path, {
      blockSize,
      leaveBlocksAllocated: fixed,
      hasParent: spec.type === "differencing",
      virtualSize: size,
      virtualDiskId: newGuid(),
      logicalSectorSize: logical,
      physicalSectorSize: physical,
      parentLocator: locator,
      opaque: [],
    }, METADATA_LENGTH);
    file.write(METADATA_OFFSET, metadata);
    let fileSize = payloadStart;
    if (fixed) {
      // Write the BAT in 1 MiB pieces (a 64 TiB fixed disk has a large one).
      const perPiece = MiB / 8;
      for (let first = 0; first < geo.entryCount; first += perPiece) {
        const n = Math.min(perPiece, geo.entryCount - first);
        const piece = new BatTable(Buffer.alloc(n * 8));
        for (let i = 0; i < n; i++) {
          const idx = first + i;
          if (idx % (geo.chunkRatio + 1) === geo.chunkRatio) continue;
          const block = idx - Math.floor(idx / (geo.chunkRatio + 1));
          piece.set(i, PAYLOAD_BLOCK_FULLY_PRESENT, payloadStart + block * blockSize);
        }
        file.write(BAT_OFFSET + first * 8, piece.bytes);
      }
      fileSize = payloadStart + geo.payloadBlocks * blockSize;
    }
    file.truncate(fileSize);
    const header = { fileWriteGuid: newGuid(), dataWriteGuid: newGuid(), logGuid: ZERO_GUID, logVersion: 0, version: 1, logLength: LOG_LENGTH, logOffset: LOG_OFFSET };
    file.write(HEADER_OFFSETS[0], encodeHeader({ ...header, sequenceNumber: 1n }));
    file.write(HEADER_OFFSETS[1], encodeHeader({ ...header, sequenceNumber: 2n }));
    file.sync();
  } finally {
    file.close();
  }
}
