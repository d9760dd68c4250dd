/**
 * The VHDX format driver (MS-VHDX v1): probe, open, create, describe, check,
 * resize and setParent. Modules: crc32c, guid, host-file, header,
 * region-table, metadata, bat, log (VhdxLog reader/writer), image (parsing
 * and header updates), vhdx-disk (the BlockDevice), create, check, reshape
 * (resize, setParent), parent (locators).
 */
import type { BlockDevice, OpenOptions } from "../block-device.js";
import { resolveParentPath } from "../chain.js";
import type { CheckFinding, CreateSpec, DiskDescription, DiskFormatDriver } from "../format-driver.js";
import { checkVhdx } from "./check.js";
import { createVhdx } from "./create.js";
import { guidToString } from "./guid.js";
import { isFileIdentifier } from "./header.js";
import { MiB } from "./host-file.js";
import { locatorValue, MAX_VIRTUAL_SIZE } from "./metadata.js";
import { chainLocators, recordedLocators } from "./parent.js";
import { resizeVhdx, setParentVhdx } from "./reshape.js";
import { VhdxDisk } from "./vhdx-disk.js";

export { VhdxDisk } from "./vhdx-disk.js";
export { crc32c } from "./crc32c.js";
export { MAX_VIRTUAL_SIZE } from "./metadata.js";

function describeVhdx(path: string): DiskDescription {
  const disk = VhdxDisk.open(path, { readOnly: true, noParent: true });
  try {
    const img = disk.image;
    const m = img.metadata;
    let allocatedBytes = 0;
    for (const e of disk.allocation(0, disk.size)) if (e.state === "allocated") allocatedBytes += e.length;
    let parentPath: string | undefined;
    if (m.hasParent) {
      try {
        parentPath = resolveParentPath(path, chainLocators(m.parentLocator));
      } catch {
        parentPath = undefined;
      }
    }
    return {
      path,
      format: "vhdx",
      type: disk.type,
      virtualSize: disk.size,
      fileSize: img.file.statSize(),
      blockSize: m.blockSize,
      logicalSectorSize: m.logicalSectorSize,
      physicalSectorSize: m.physicalSectorSize,
      allocatedBytes,
      uniqueId: guidToString(m.virtualDiskId),
      parentId: m.hasParent ? locatorValue(m.parentLocator, "parent_linkage") : undefined,
      parentPath,
      parentLocators: m.hasParent ? recordedLocators(m.parentLocator) : undefined,
      logReplayNeeded: img.logReplayNeeded,
    };
  } finally {
    disk.close();
  }
}

export const vhdxDriver: DiskFormatDriver = {
  format: "vhdx",
  maxSize: MAX_VIRTUAL_SIZE,
  probe: (head: Uint8Array, _tail: Uint8Array, fileSize: number): boolean => fileSize >= MiB && isFileIdentifier(head),
  open: (path: string, options?: OpenOptions): BlockDevice => VhdxDisk.open(path, options),
  create: (path: string, spec: CreateSpec): void => createVhdx(path, spec),
  describe: describeVhdx,
  check: (path: string, options?: { repair?: boolean }): CheckFinding[] => checkVhdx(path, options),
  resize: (path: string, newSize: number): void => resizeVhdx(path, newSize),
  setParent: (path: string, parentPath: string, options?: { force?: boolean }): void => setParentVhdx(path, parentPath, options),
};
