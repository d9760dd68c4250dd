/**
 * The VHD format driver: probe, open, create (fixed, dynamic, differencing
 * with W2ru + W2ku parent locators), describe, check (with repair), resize
 * and setParent. Every metadata update writes new structures first, syncs,
 * then switches the pointer to them (header, then footers), syncing between,
 * so an interrupted operation leaves the old or the new state readable.
 */
import * as fs from "node:fs";
import * as nodePath from "node:path";
import { DiskError, type BlockDevice, type OpenOptions } from "../block-device.js";
import { resolveParentPath, verifyParent } from "../chain.js";
import type { CheckFinding, CreateSpec, DiskDescription, DiskFormatDriver } from "../format-driver.js";
import { describeDisk } from "../open.js";
import { preadFully, pwriteFully } from "../raw.js";
import { VhdDisk } from "./disk.js";
import { loadLayout, readAt, type VhdLayout } from "./layout.js";
import {
  BAT_UNALLOCATED,
  CREATOR_APP,
  CREATOR_HOST_OS,
  CREATOR_VERSION,
  DEFAULT_BLOCK_SIZE,
  DISK_TYPE_DIFFERENCING,
  DISK_TYPE_DYNAMIC,
  DISK_TYPE_FIXED,
  DYNAMIC_HEADER_SIZE,
  FEATURES_RESERVED,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  FORMAT_VERSION,
  MAX_VHD_SIZE,
  PLATFORM_NONE,
  PLATFORM_W2KU,
  PLATFORM_W2RU,
  SECTOR,
  alignUp,
  bitIsSet,
  chsGeometry,
  encodeDynamicHeader,
  encodeFooter,
  encodeUtf16,
  formatUniqueId,
  newUniqueId,
  parseUniqueId,
  vhdTimestamp,
  type DynamicHeader,
  type ParentLocatorEntry,
  type VhdFooter,
} from "./spec.js";

const HEADER_OFFSET = FOOTER_SIZE;
const TABLE_OFFSET = HEADER_OFFSET + DYNAMIC_HEADER_SIZE;

function openFd(path: string, write: boolean): number {
  try {
    return fs.openSync(path, write ? "r+" : "r");
  } catch (e) {
    throw new DiskError("DISK_OPEN_FAILED", `cannot open: ${(e as Error).message}`, path);
  }
}

function withFd<T>(path: string, write: boolean, fn: (fd: number) => T): T {
  const fd = openFd(path, write);
  try {
    return fn(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function requireVirtualSize(path: string, size: number | undefined): number {
  if (size === undefined || !Number.isSafeInteger(size) || size <= 0) {
    throw new DiskError("BAD_SIZE", `a VHD needs a positive size in bytes (got ${size})`, path);
  }
  if (size % SECTOR !== 0) throw new DiskError("BAD_SIZE", `size ${size} is not a multiple of ${SECTOR} bytes`, path, { size });
  if (size > MAX_VHD_SIZE) {
    throw new DiskError("VHD_TOO_LARGE", `size ${size} exceeds the VHD maximum of 2040 GiB (${MAX_VHD_SIZE} bytes); use VHDX for larger disks`, path, { size });
  }
  return size;
}

function footerFor(size: number, diskType: number, uniqueId: Uint8Array, original?: VhdFooter): Omit<VhdFooter, "checksum" | "cookie"> {
  return {
    features: original?.features ?? FEATURES_RESERVED,
    formatVersion: FORMAT_VERSION,
    dataOffset: diskType === DISK_TYPE_FIXED ? -1 : original?.dataOffset ?? HEADER_OFFSET,
    timestamp: original?.timestamp ?? vhdTimestamp(),
    creatorApp: original?.creatorApp ?? CREATOR_APP,
    creatorVersion: original?.creatorVersion ?? CREATOR_VERSION,
    creatorHostOs: original?.creatorHostOs ?? CREATOR_HOST_OS,
    originalSize: original?.originalSize ?? size,
    currentSize: size,
    geometry: chsGeometry(size),
    diskType,
    uniqueId,
    savedState: 0,
  };
}

/** Windows-style relative path ("./x" -> ".\x") as W2ru locators hold. */
function windowsRelative(from: string, to: string): string {
  const rel = nodePath.relative(from, to).split(nodePath.sep).join("\\");
  return rel.startsWith("..") ? rel : `.\\${rel}`;
}

interface PlannedLocator {
  readonly entry: ParentLocatorEntry;
  readonly data: Uint8Array;
}

/** W2ru then W2ku locator data for `parentAbs`, laid out from `at`. */
function planLocators(childPath: string, parentAbs: string, at: number): { locators: PlannedLocator[]; end: number } {
  const childDir = nodePath.dirname(nodePath.resolve(childPath));
  const items: [number, string][] = [
    [PLATFORM_W2RU, windowsRelative(childDir, parentAbs)],
    [PLATFORM_W2KU, parentAbs],
  ];
  const locators: PlannedLocator[] = [];
  let pos = alignUp(at, SECTOR);
  for (const [code, text] of items) {
    const data = encodeUtf16(text, "le");
    const space = alignUp(Math.max(data.length, 1), SECTOR);
    // DEVNOTE: data space in 512-byte sectors, as the spec says (readers here accept bytes too).
    locators.push({ entry: { platformCode: code, platformDataSpace: space / SECTOR, platformDataLength: data.length, platformDataOffset: pos }, data });
    pos += space;
  }
  return { locators, end: pos };
}

function parentIdentity(childPath: string, parentAbs: string): { id: Uint8Array; size: number; timestamp: number } {
  const d = describeDisk(parentAbs);
  const id = d.uniqueId === undefined ? undefined : parseUniqueId(d.uniqueId);
  if (id === undefined) {
    throw new DiskError("PARENT_NO_IDENTITY", `parent ${parentAbs} (${d.format}) has no unique ID a VHD can record`, childPath, { parentPath: parentAbs });
  }
  return { id, size: d.virtualSize, timestamp: vhdTimestamp(fs.statSync(parentAbs).mtimeMs) };
}

function paddedLocators(list: readonly ParentLocatorEntry[]): ParentLocatorEntry[] {
  const out = [...list];
  while (out.length < 8) out.push({ platformCode: PLATFORM_NONE, platformDataSpace: 0, platformDataLength: 0, platformDataOffset: 0 });
  return out;
}

function createVhd(path: string, spec: CreateSpec): void {
  if (spec.logicalSectorSize !== undefined && spec.logicalSectorSize !== SECTOR) {
    throw new DiskError("UNSUPPORTED", `VHD has ${SECTOR}-byte logical sectors only (use VHDX for 4K)`, path);
  }
  const diskType = spec.type === "fixed" ? DISK_TYPE_FIXED : spec.type === "dynamic" ? DISK_TYPE_DYNAMIC : DISK_TYPE_DIFFERENCING;
  let parent: { abs: string; id: Uint8Array; size: number; timestamp: number } | undefined;
  if (diskType === DISK_TYPE_DIFFERENCING) {
    if (spec.parentPath === undefined) throw new DiskError("BAD_SPEC", "a differencing disk needs a parent path", path);
    const abs = nodePath.resolve(spec.parentPath);
    if (!fs.existsSync(abs)) throw new DiskError("PARENT_NOT_FOUND", `parent ${abs} does not exist`, path);
    if (abs === nodePath.resolve(path)) throw new DiskError("BAD_SPEC", "a disk cannot be its own parent", path);
    parent = { abs, ...parentIdentity(path, abs) };
  }
  const size = requireVirtualSize(path, spec.size ?? parent?.size);
  const blockSize = spec.blockSize ?? DEFAULT_BLOCK_SIZE;
  if (diskType !== DISK_TYPE_FIXED && (blockSize < 4096 || blockSize > 256 * 1024 * 1024 || (blockSize & (blockSize - 1)) !== 0)) {
    throw new DiskError("BAD_SPEC", `block size ${blockSize} must be a power of two from 4 KiB to 256 MiB`, path);
  }
  const footer = encodeFooter(footerFor(size, diskType, newUniqueId()));
  let fd: number;
  try {
    fd = fs.openSync(path, "wx");
  } catch (e) {
    throw new DiskError("DISK_CREATE_FAILED", `cannot create: ${(e as Error).message}`, path);
  }
  try {
    if (diskType === DISK_TYPE_FIXED) {
      fs.ftruncateSync(fd, size + FOOTER_SIZE);
      pwriteFully(fd, footer, size);
    } else {
      const entries = Math.ceil(size / blockSize);
      const batBytes = alignUp(entries * 4, SECTOR);
      let end = TABLE_OFFSET + batBytes;
      let planned: PlannedLocator[] = [];
      if (parent !== undefined) {
        const p = planLocators(path, parent.abs, end);
        planned = p.locators;
        end = p.end;
      }
      const header = encodeDynamicHeader({
        tableOffset: TABLE_OFFSET,
        maxTableEntries: entries,
        blockSize,
        parentUniqueId: parent?.id ?? new Uint8Array(16),
        parentTimestamp: parent?.timestamp ?? 0,
        parentUnicodeName: parent === undefined ? "" : parent.abs.slice(0, 255),
        parentLocators: paddedLocators(planned.map((l) => l.entry)),
      });
      pwriteFully(fd, footer, 0);
      pwriteFully(fd, header, HEADER_OFFSET);
      const bat = new Uint8Array(batBytes).fill(0xff);
      for (let pos = 0; pos < batBytes; pos += 1 << 20) {
        pwriteFully(fd, bat.subarray(pos, Math.min(batBytes, pos + (1 << 20))), TABLE_OFFSET + pos);
      }
      for (const l of planned) pwriteFully(fd, l.data, l.entry.platformDataOffset);
      pwriteFully(fd, footer, alignUp(end, SECTOR));
    }
    fs.fsyncSync(fd);
  } catch (e) {
    fs.closeSync(fd);
    fs.rmSync(path, { force: true });
    throw e;
  }
  fs.closeSync(fd);
}

function diskTypeName(t: number): "fixed" | "dynamic" | "differencing" {
  return t === DISK_TYPE_FIXED ? "fixed" : t === DISK_TYPE_DYNAMIC ? "dynamic" : "differencing";
}

function popcount(b: Uint8Array): number {
  let n = 0;
  for (let i = 0; i < b.length; i++) {
    let v = b[i]!;
    while (v !== 0) {
      v &= v - 1;
      n++;
    }
  }
  return n;
}

function allocatedBytes(fd: number, layout: VhdLayout): number {
  if (layout.header === undefined) return layout.footer.currentSize;
  const bs = layout.header.blockSize;
  const sectorsPerBlock = bs / SECTOR;
  let total = 0;
  for (let i = 0; i < layout.bat.length; i++) {
    const e = layout.bat[i]!;
    if (e === BAT_UNALLOCATED) continue;
    const bm = readAt(fd, e * SECTOR, layout.bitmapSize);
    // Only the bits that map sectors of the block count (not the padding).
    total += Math.min(popcount(bm.subarray(0, Math.ceil(sectorsPerBlock / 8))), sectorsPerBlock) * SECTOR;
  }
  return Math.min(total, layout.footer.currentSize);
}

function describeVhd(path: string): DiskDescription {
  return withFd(path, false, (fd) => {
    const layout = loadLayout(path, fd);
    const f = layout.footer;
    let parentPath: string | undefined;
    if (f.diskType === DISK_TYPE_DIFFERENCING) {
      try {
        parentPath = resolveParentPath(path, layout.locators);
      } catch {
        parentPath = undefined;
      }
    }
    return {
      path,
      format: "vhd",
      type: diskTypeName(f.diskType),
      virtualSize: f.currentSize,
      fileSize: layout.fileSize,
      ...(layout.header !== undefined ? { blockSize: layout.header.blockSize } : {}),
      logicalSectorSize: SECTOR,
      physicalSectorSize: SECTOR,
      allocatedBytes: allocatedBytes(fd, layout),
      uniqueId: formatUniqueId(f.uniqueId),
      ...(f.diskType === DISK_TYPE_DIFFERENCING
        ? { parentId: formatUniqueId(layout.header!.parentUniqueId), parentPath, parentLocators: layout.locators }
        : {}),
    };
  });
}

/** Byte offset where each metadata structure after offset 0 starts (for overlap checks). */
function metadataRanges(layout: VhdLayout): { start: number; end: number; what: string }[] {
  const h = layout.header!;
  const ranges = [
    { start: 0, end: FOOTER_SIZE, what: "footer copy" },
    { start: layout.footer.dataOffset, end: layout.footer.dataOffset + DYNAMIC_HEADER_SIZE, what: "dynamic header" },
    { start: h.tableOffset, end: h.tableOffset + h.maxTableEntries * 4, what: "BAT" },
  ];
  for (const l of layout.locatorEntries) ranges.push({ start: l.start, end: l.end, what: `parent locator ${l.index} data` });
  return ranges;
}

function checkVhd(path: string, options: { repair?: boolean } = {}): CheckFinding[] {
  const repair = options.repair === true;
  const findings: CheckFinding[] = [];
  const fd = openFd(path, repair);
  try {
    let layout: VhdLayout;
    try {
      layout = loadLayout(path, fd);
    } catch (e) {
      if (e instanceof DiskError) {
        const off = e.context["offset"];
        return [{ severity: "error", ...(typeof off === "number" ? { offset: off } : {}), message: e.message }];
      }
      throw e;
    }
    const f = layout.footer;
    const footerBytes = encodeFooter(f);
    const endAt = layout.fileSize - FOOTER_SIZE;

    if (f.diskType === DISK_TYPE_FIXED) {
      if (layout.fileSize !== f.currentSize + FOOTER_SIZE) {
        findings.push({ severity: "warning", offset: f.currentSize, message: `file is ${layout.fileSize} bytes; a fixed disk of ${f.currentSize} bytes should be ${f.currentSize + FOOTER_SIZE}` });
      }
      return findings;
    }

    const h = layout.header!;
    const bs = h.blockSize;
    // Footers.
    if (layout.endFooter.state !== "ok") {
      const at = alignUp(layout.usedEnd, SECTOR);
      if (repair) {
        pwriteFully(fd, footerBytes, at);
        fs.fdatasyncSync(fd);
        if (fs.fstatSync(fd).size > at + FOOTER_SIZE) fs.ftruncateSync(fd, at + FOOTER_SIZE);
        fs.fsyncSync(fd);
        findings.push({ severity: "repaired", offset: at, message: `footer at the end of the file was ${layout.endFooter.state} (${layout.endFooter.reason}); rewritten from the copy at offset 0 at offset ${at}` });
      } else {
        findings.push({ severity: "error", offset: endAt, message: `footer at offset ${endAt} (end of file) is ${layout.endFooter.state}: ${layout.endFooter.reason}` });
      }
    } else if (endAt > layout.usedEnd) {
      const at = alignUp(layout.usedEnd, SECTOR);
      if (repair && at < endAt) {
        pwriteFully(fd, footerBytes, at);
        fs.fdatasyncSync(fd);
        fs.ftruncateSync(fd, at + FOOTER_SIZE);
        fs.fsyncSync(fd);
        findings.push({ severity: "repaired", offset: at, message: `${endAt - at} unreferenced bytes before the end footer (an interrupted allocation) trimmed` });
      } else if (at < endAt) {
        findings.push({ severity: "warning", offset: at, message: `${endAt - at} bytes between the last referenced structure (ends at ${layout.usedEnd}) and the end footer are unreferenced (an interrupted allocation); --repair trims them` });
      }
    }
    const copy = readAt(fd, 0, FOOTER_SIZE);
    if (Buffer.compare(copy, footerBytes) !== 0 && layout.endFooter.state === "ok") {
      const bad = Buffer.from(copy.subarray(0, 8)).toString("latin1") !== FOOTER_COOKIE ? "missing" : "different or corrupt";
      if (repair) {
        pwriteFully(fd, footerBytes, 0);
        fs.fdatasyncSync(fd);
        findings.push({ severity: "repaired", offset: 0, message: `footer copy at offset 0 was ${bad}; rewritten from the end footer` });
      } else {
        findings.push({ severity: "error", offset: 0, message: `footer copy at offset 0 is ${bad} (other tools, QEMU included, read this copy first)` });
      }
    }
    // BAT.
    const needed = Math.ceil(f.currentSize / bs);
    if (h.maxTableEntries < needed) {
      findings.push({ severity: "error", offset: f.dataOffset, message: `dynamic header: ${h.maxTableEntries} BAT entries, ${needed} needed for the virtual size` });
    }
    const meta = metadataRanges(layout);
    const blocks: { index: number; start: number; end: number }[] = [];
    for (let i = 0; i < layout.bat.length; i++) {
      const e = layout.bat[i]!;
      if (e === BAT_UNALLOCATED) continue;
      const start = e * SECTOR;
      const end = start + layout.bitmapSize + bs;
      const batAt = h.tableOffset + i * 4;
      if (i >= needed) findings.push({ severity: "warning", offset: batAt, message: `BAT entry ${i} is allocated but lies past the virtual size` });
      if (end > layout.fileSize) {
        findings.push({ severity: "error", offset: batAt, message: `BAT entry ${i}: block at ${start}..${end} extends past the end of the file (${layout.fileSize})` });
      }
      for (const m of meta) {
        if (start < m.end && m.start < end) findings.push({ severity: "error", offset: batAt, message: `BAT entry ${i}: block at ${start}..${end} overlaps the ${m.what} (${m.start}..${m.end})` });
      }
      if (layout.endFooter.state === "ok" && start < layout.fileSize && end > endAt) {
        findings.push({ severity: "error", offset: batAt, message: `BAT entry ${i}: block at ${start}..${end} overlaps the end footer at ${endAt}` });
      }
      blocks.push({ index: i, start, end });
    }
    blocks.sort((a, b) => a.start - b.start);
    for (let k = 1; k < blocks.length; k++) {
      const a = blocks[k - 1]!;
      const b = blocks[k]!;
      if (b.start < a.end) {
        findings.push({ severity: "error", offset: h.tableOffset + b.index * 4, message: `BAT entries ${a.index} and ${b.index} overlap (${a.start}..${a.end} and ${b.start}..${b.end})` });
      }
    }
    // Bitmaps: sectors past the virtual size should not be marked present.
    const last = Math.floor((f.currentSize - 1) / bs);
    const lastEntry = layout.bat[last];
    if (lastEntry !== undefined && lastEntry !== BAT_UNALLOCATED && (last + 1) * bs > f.currentSize && lastEntry * SECTOR + layout.bitmapSize <= layout.fileSize) {
      const bm = readAt(fd, lastEntry * SECTOR, layout.bitmapSize);
      const firstBeyond = (f.currentSize - last * bs) / SECTOR;
      let beyond = 0;
      for (let s = firstBeyond; s < bs / SECTOR; s++) if (bitIsSet(bm, s)) beyond++;
      if (beyond > 0 && f.diskType === DISK_TYPE_DIFFERENCING) {
        findings.push({ severity: "warning", offset: lastEntry * SECTOR, message: `sector bitmap of block ${last} marks ${beyond} sectors past the virtual size` });
      }
    }
    // Parent locators (a differencing disk's are validated by loadLayout; a
    // dynamic disk's are ignored) and the parent link.
    if (f.diskType !== DISK_TYPE_DIFFERENCING) {
      h.parentLocators.forEach((e, i) => {
        if (e.platformCode !== PLATFORM_NONE) {
          findings.push({ severity: "warning", offset: f.dataOffset + 576 + i * 24, message: `parent locator ${i} is set on a disk that has no parent; it is ignored` });
        }
      });
    }
    if (f.diskType === DISK_TYPE_DIFFERENCING) {
      try {
        const parentPath = resolveParentPath(path, layout.locators);
        const pd = describeDisk(parentPath);
        const stamps = [vhdTimestamp(fs.statSync(parentPath).mtimeMs)];
        for (const w of verifyParent(path, parentPath, {
          expectedId: formatUniqueId(h.parentUniqueId),
          actualId: pd.uniqueId,
          expectedTimestamp: h.parentTimestamp,
          actualTimestamps: stamps.concat(pd.format === "vhd" ? [parentFooterTimestamp(parentPath)] : []),
        })) {
          findings.push({ severity: "warning", message: w });
        }
        if (pd.virtualSize !== f.currentSize) {
          findings.push({ severity: "warning", message: `parent ${parentPath} is ${pd.virtualSize} bytes, this disk ${f.currentSize}` });
        }
      } catch (e) {
        if (!(e instanceof DiskError)) throw e;
        findings.push({ severity: "error", message: e.message });
      }
    }
    return findings;
  } finally {
    fs.closeSync(fd);
  }
}

function parentFooterTimestamp(parentPath: string): number {
  return withFd(parentPath, false, (fd) => loadLayout(parentPath, fd).footer.timestamp);
}

function isZero(buf: Uint8Array): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return false;
  return true;
}

function writeFootersBoth(fd: number, footer: Uint8Array, endOffset: number, dynamic: boolean): void {
  pwriteFully(fd, footer, endOffset);
  fs.fdatasyncSync(fd);
  if (dynamic) {
    pwriteFully(fd, footer, 0);
    fs.fdatasyncSync(fd);
  }
}

function headerWith(h: DynamicHeader, changes: Partial<DynamicHeader>): Uint8Array {
  return encodeDynamicHeader({ ...h, ...changes });
}

function resizeVhd(path: string, newSize: number): void {
  requireVirtualSize(path, newSize);
  withFd(path, true, (fd) => {
    const layout = loadLayout(path, fd);
    const f = layout.footer;
    const oldSize = f.currentSize;
    if (newSize === oldSize) return;
    const newFooter = encodeFooter(footerFor(newSize, f.diskType, f.uniqueId, f));

    if (f.diskType === DISK_TYPE_FIXED) {
      if (newSize < oldSize) {
        const buf = new Uint8Array(1 << 20);
        for (let pos = newSize; pos < oldSize; pos += buf.length) {
          const part = buf.subarray(0, Math.min(buf.length, oldSize - pos));
          preadFully(fd, part, pos);
          if (!isZero(part)) throw new DiskError("SHRINK_WOULD_LOSE_DATA", `cannot shrink to ${newSize}: data at or after offset ${pos}`, path, { offset: pos });
        }
        pwriteFully(fd, newFooter, newSize);
        fs.fdatasyncSync(fd);
        fs.ftruncateSync(fd, newSize + FOOTER_SIZE);
        fs.fsyncSync(fd);
        return;
      }
      // Grow: new footer first (the file grows sparsely), then clear the old one,
      // which is now inside the disk and must read as zeros.
      pwriteFully(fd, newFooter, newSize);
      fs.fdatasyncSync(fd);
      const oldEnd = Math.min(layout.fileSize, newSize);
      if (oldEnd > oldSize) pwriteFully(fd, new Uint8Array(oldEnd - oldSize), oldSize);
      if (layout.fileSize > newSize + FOOTER_SIZE) fs.ftruncateSync(fd, newSize + FOOTER_SIZE);
      fs.fsyncSync(fd);
      return;
    }

    const h = layout.header!;
    const bs = h.blockSize;
    const needed = Math.ceil(newSize / bs);
    let endOffset = layout.endOffset;
    if (newSize < oldSize) {
      for (let i = needed; i < layout.bat.length; i++) {
        if (i * bs < oldSize && layout.bat[i] !== BAT_UNALLOCATED) {
          throw new DiskError("SHRINK_WOULD_LOSE_DATA", `cannot shrink to ${newSize}: block ${i} (from offset ${i * bs}) is allocated`, path, { offset: i * bs });
        }
      }
      const lastBlock = needed - 1;
      const e = layout.bat[lastBlock]!;
      if (e !== BAT_UNALLOCATED && needed * bs > newSize) {
        const bm = readAt(fd, e * SECTOR, layout.bitmapSize);
        const oldEndInBlock = Math.min(bs, oldSize - lastBlock * bs) / SECTOR;
        for (let s = (newSize - lastBlock * bs) / SECTOR; s < oldEndInBlock; s++) {
          if (bitIsSet(bm, s)) {
            throw new DiskError("SHRINK_WOULD_LOSE_DATA", `cannot shrink to ${newSize}: sector at offset ${lastBlock * bs + s * SECTOR} is allocated`, path, { offset: lastBlock * bs + s * SECTOR });
          }
        }
      }
      writeFootersBoth(fd, newFooter, endOffset, true);
      return;
    }

    if (needed > h.maxTableEntries) {
      const old = h.maxTableEntries;
      // Room after the BAT: up to the first structure that follows it.
      let limit = endOffset;
      for (const e of layout.bat) if (e !== BAT_UNALLOCATED && e * SECTOR > h.tableOffset) limit = Math.min(limit, e * SECTOR);
      for (const l of layout.locatorEntries) if (l.start > h.tableOffset) limit = Math.min(limit, l.start);
      if (f.dataOffset > h.tableOffset) limit = Math.min(limit, f.dataOffset);
      const newBatEnd = h.tableOffset + needed * 4;
      const batEnd = alignUp(newBatEnd, SECTOR);
      if (batEnd <= limit || limit === endOffset) {
        // In place. When only the end footer follows the BAT, the footer moves
        // behind the grown BAT first.
        if (batEnd > endOffset) {
          pwriteFully(fd, encodeFooter(f), batEnd);
          fs.fdatasyncSync(fd);
          endOffset = batEnd;
        }
        pwriteFully(fd, new Uint8Array(batEnd - (h.tableOffset + old * 4)).fill(0xff), h.tableOffset + old * 4);
        fs.fdatasyncSync(fd);
        pwriteFully(fd, headerWith(h, { maxTableEntries: needed }), f.dataOffset);
        fs.fdatasyncSync(fd);
        writeFootersBoth(fd, newFooter, endOffset, true);
        return;
      }
      // Relocate the BAT to the end of the file.
      const newTable = alignUp(endOffset, SECTOR);
      const batBytes = alignUp(needed * 4, SECTOR);
      const table = new Uint8Array(batBytes).fill(0xff);
      const view = new DataView(table.buffer);
      for (let i = 0; i < old; i++) view.setUint32(i * 4, layout.bat[i]!, false);
      pwriteFully(fd, encodeFooter(f), newTable + batBytes);
      pwriteFully(fd, table, newTable);
      fs.fdatasyncSync(fd);
      pwriteFully(fd, headerWith(h, { tableOffset: newTable, maxTableEntries: needed }), f.dataOffset);
      fs.fdatasyncSync(fd);
      writeFootersBoth(fd, newFooter, newTable + batBytes, true);
      return;
    }
    writeFootersBoth(fd, newFooter, endOffset, true);
  });
}

function setParentVhd(path: string, parentPath: string, options: { force?: boolean } = {}): void {
  withFd(path, true, (fd) => {
    const layout = loadLayout(path, fd);
    if (layout.footer.diskType !== DISK_TYPE_DIFFERENCING) throw new DiskError("NOT_DIFFERENCING", "only a differencing disk has a parent", path);
    const h = layout.header!;
    const parentAbs = nodePath.resolve(parentPath);
    if (parentAbs === nodePath.resolve(path)) throw new DiskError("BAD_SPEC", "a disk cannot be its own parent", path);
    const p = parentIdentity(path, parentAbs);
    if (options.force !== true) {
      verifyParent(path, parentAbs, { expectedId: formatUniqueId(h.parentUniqueId), actualId: formatUniqueId(p.id) });
    }
    // New locator data goes where the end footer is; the footer moves behind it first.
    const at = layout.endOffset;
    const planned = planLocators(path, parentAbs, at);
    const newEnd = alignUp(planned.end, SECTOR);
    pwriteFully(fd, encodeFooter(layout.footer), newEnd);
    for (const l of planned.locators) pwriteFully(fd, l.data, l.entry.platformDataOffset);
    fs.fdatasyncSync(fd);
    const header = headerWith(h, {
      parentUniqueId: p.id,
      parentTimestamp: p.timestamp,
      parentUnicodeName: parentAbs.slice(0, 255),
      parentLocators: paddedLocators(planned.locators.map((l) => l.entry)),
    });
    pwriteFully(fd, header, layout.footer.dataOffset);
    fs.fsyncSync(fd);
  });
}

export const vhdDriver: DiskFormatDriver = {
  format: "vhd",
  maxSize: MAX_VHD_SIZE,

  probe(head: Uint8Array, tail: Uint8Array, fileSize: number): boolean {
    if (fileSize < FOOTER_SIZE) return false;
    const cookie = (b: Uint8Array): string => Buffer.from(b.subarray(0, 8)).toString("latin1");
    return (tail.length >= FOOTER_SIZE && cookie(tail.subarray(tail.length - FOOTER_SIZE)) === FOOTER_COOKIE) || (head.length >= 8 && cookie(head) === FOOTER_COOKIE);
  },

  open(path: string, options?: OpenOptions): BlockDevice {
    return VhdDisk.open(path, options);
  },

  create: createVhd,
  describe: describeVhd,
  check: checkVhd,
  resize: resizeVhd,
  setParent: setParentVhd,
};

