/**
 * resize() and setParent(): offline edits of the BAT, region table and
 * metadata region, all through the log (MS-VHDX 2.2.3: region table updates
 * go through the log). A BAT that must grow past its region is relocated:
 * the new BAT is written to fresh space at the end of the file (unreferenced
 * until the region table changes), then the region table copies and the
 * metadata go through the log, region table first, so a crash between the
 * two leaves a larger BAT with the old size, never the reverse.
 */
import { DiskError } from "../block-device.js";
import { verifyParent } from "../chain.js";
import { openDisk } from "../open.js";
import { BatGeometry, BatTable, PAYLOAD_BLOCK_FULLY_PRESENT } from "./bat.js";
import { guidEquals, guidFromString } from "./guid.js";
import { LOG_SECTOR, type SectorUpdate } from "./log.js";
import { encodeMetadata, locatorValue, type VhdxMetadata } from "./metadata.js";
import { buildParentLocator } from "./parent.js";
import { encodeRegionTable, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE } from "./region-table.js";
import { parentIdentity, validateVirtualSize } from "./create.js";
import { VhdxDisk } from "./vhdx-disk.js";

/** Sectors of `next` that differ from `current`, as updates at `base`. */
function changedSectors(base: number, current: Buffer, next: Buffer): SectorUpdate[] {
  const out: SectorUpdate[] = [];
  for (let o = 0; o < next.length; o += LOG_SECTOR) {
    const a = current.subarray(o, o + LOG_SECTOR);
    const b = next.subarray(o, o + LOG_SECTOR);
    if (!a.equals(b)) out.push({ offset: base + o, data: Buffer.from(b) });
  }
  return out;
}

function metadataUpdates(disk: VhdxDisk, next: VhdxMetadata): SectorUpdate[] {
  const img = disk.image;
  const r = img.regions.metadata;
  const current = img.file.readBuffer(r.fileOffset, r.length);
  return changedSectors(r.fileOffset, current, encodeMetadata(disk.path, next, r.length));
}

export function resizeVhdx(path: string, newSize: number): void {
  const disk = VhdxDisk.open(path, { noParent: true });
  try {
    const img = disk.image;
    const m = img.metadata;
    validateVirtualSize(path, newSize, m.logicalSectorSize);
    if (newSize === m.virtualSize) return;
    if (newSize < m.virtualSize) {
      const busy = disk.allocation(newSize, m.virtualSize - newSize).find((e) => e.state === "allocated");
      if (busy) {
        throw new DiskError("VHDX_SHRINK_ALLOCATED", `cannot shrink to ${newSize} bytes: data is allocated at virtual offset ${busy.offset} (${busy.length} bytes) in the part that would be cut off`, path, { offset: busy.offset });
      }
    }
    const oldGeo = img.geometry;
    const geo = new BatGeometry(newSize, m.blockSize, m.logicalSectorSize, m.hasParent);
    disk.beginChange(true);
    // The new BAT image: old entries kept, everything past min(old, new) zeroed.
    const keep = Math.min(oldGeo.entryCount, geo.entryCount) * 8;
    const newBat = Buffer.alloc(Math.ceil((geo.entryCount * 8) / LOG_SECTOR) * LOG_SECTOR);
    img.bat.bytes.copy(newBat, 0, 0, keep);
    const tmp = new BatTable(newBat);
    if (m.leaveBlocksAllocated && !m.hasParent) {
      for (let b = oldGeo.payloadBlocks; b < geo.payloadBlocks; b++) tmp.set(geo.payloadIndex(b), PAYLOAD_BLOCK_FULLY_PRESENT, disk.allocate(m.blockSize));
    }
    const bat = img.regions.bat;
    if (geo.entryCount * 8 <= bat.length) {
      // In place: the changed BAT sectors (old region bytes past the old entries may be anything).
      const current = img.file.readBuffer(bat.fileOffset, newBat.length);
      const oldTail = Buffer.alloc(Math.max(0, img.bat.bytes.length - newBat.length));
      disk.logAndApply(changedSectors(bat.fileOffset, current, newBat));
      if (oldTail.length > 0) disk.logAndApply(changedSectors(bat.fileOffset + newBat.length, img.bat.bytes.subarray(newBat.length), oldTail));
    } else {
      const length = geo.regionBytes();
      const offset = disk.allocate(length);
      img.file.write(offset, newBat);
      const table = encodeRegionTable(img.regions.entries.map((e) => (e === bat ? { ...e, fileOffset: offset, length } : e)));
      const updates: SectorUpdate[] = [];
      for (const base of REGION_TABLE_OFFSETS) for (let o = 0; o < REGION_TABLE_SIZE; o += LOG_SECTOR) updates.push({ offset: base + o, data: Buffer.from(table.subarray(o, o + LOG_SECTOR)) });
      disk.logAndApply(updates);
    }
    disk.logAndApply(metadataUpdates(disk, { ...m, virtualSize: newSize }));
  } finally {
    disk.close();
  }
}

export function setParentVhdx(path: string, parentPath: string, options: { force?: boolean } = {}): void {
  const disk = VhdxDisk.open(path, { noParent: true });
  try {
    const m = disk.image.metadata;
    if (!m.hasParent) throw new DiskError("VHDX_NOT_DIFFERENCING", "not a differencing disk; it has no parent to change", path);
    const parent = openDisk(parentPath, { readOnly: true });
    let identity: string;
    try {
      if (parent.logicalSectorSize !== m.logicalSectorSize) {
        throw new DiskError("VHDX_PARENT_SECTOR_SIZE", `logical sector size ${m.logicalSectorSize} differs from parent ${parentPath} (${parent.logicalSectorSize})`, path);
      }
      identity = parentIdentity(parentPath, parent);
    } finally {
      parent.close();
    }
    if (!options.force) {
      const ids = [locatorValue(m.parentLocator, "parent_linkage"), locatorValue(m.parentLocator, "parent_linkage2")];
      const actual = guidFromString(identity)!;
      const ok = ids.some((id) => { const g = id === undefined ? undefined : guidFromString(id); return g !== undefined && guidEquals(g, actual); });
      if (!ok) verifyParent(path, parentPath, { expectedId: ids[0] ?? "(none)", actualId: identity });
    }
    disk.beginChange(options.force === true);
    disk.logAndApply(metadataUpdates(disk, { ...m, parentLocator: buildParentLocator(path, parentPath, identity) }));
  } finally {
    disk.close();
  }
}
