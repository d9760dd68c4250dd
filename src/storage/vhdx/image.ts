/**
 * A parsed VHDX file: identifier, current header, region table, metadata and
 * BAT, every field validated before use (hostile files get a DiskError naming
 * the file and the problem). Also the header update protocol (MS-VHDX
 * 2.2.2.1) and log handling at open:
 *
 * - read-write open of an image whose LogGuid is set: header update (new
 *   FileWriteGuid) → replay the active sequence → flush → header update with
 *   LogGuid zero. A crash in between leaves LogGuid set, so replay reruns.
 * - read-only open of such an image: the active sequence is replayed in
 *   memory (ReplayOverlay) and the file is not touched. DEVNOTE: QEMU 7.2
 *   refuses this case ("opened read-only, but contains a log that needs to be
 *   replayed"); we prefer to let inspection tools and read-only parents work.
 */
import { DiskError } from "../block-device.js";
import { BatGeometry, BatTable, batProblems, type FileSpan } from "./bat.js";
import { guidIsZero, newGuid, ZERO_GUID, type Guid } from "./guid.js";
import { chooseCurrentHeader, encodeHeader, HEADER_OFFSETS, HEADER_SIZE, isFileIdentifier, validateLogFields, type VhdxHeader } from "./header.js";
import { HostFile, MiB, ReplayOverlay, type HostFileCache } from "./host-file.js";
import { readPendingLog, replayOntoFile, sequenceWrites } from "./log.js";
import { decodeMetadata, type VhdxMetadata } from "./metadata.js";
import { decodeRegionTable, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, type RegionTable } from "./region-table.js";

/** Largest metadata region read (Hyper-V and QEMU use 1 MiB). */
const MAX_METADATA_REGION = 64 * MiB;

export interface HeaderChanges {
  fileWriteGuid?: Guid;
  dataWriteGuid?: Guid;
  logGuid?: Guid;
}

export class VhdxImage {
  private slot: 0 | 1;
  private current: VhdxHeader;
  /** The log needed replay when this image was opened. */
  readonly logReplayNeeded: boolean;
  regions!: RegionTable;
  metadata!: VhdxMetadata;
  geometry!: BatGeometry;
  bat!: BatTable;

  private constructor(readonly path: string, readonly file: HostFile, slot: 0 | 1, header: VhdxHeader, logReplayNeeded: boolean) {
    this.slot = slot;
    this.current = header;
    this.logReplayNeeded = logReplayNeeded;
  }

  get header(): VhdxHeader {
    return this.current;
  }

  /** BAT problems found by a lenient open (check); a normal open refuses the first. */
  batIssues: { index: number; message: string }[] = [];

  static open(path: string, readOnly: boolean, lenient = false, cache: HostFileCache = {}): VhdxImage {
    const file = HostFile.open(path, readOnly, cache);
    try {
      return VhdxImage.load(path, file, readOnly, lenient);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  private static load(path: string, file: HostFile, readOnly: boolean, lenient: boolean): VhdxImage {
    const size = file.statSize();
    if (size < MiB) throw new DiskError("VHDX_BAD_FILE", `file is ${size} bytes, smaller than the 1 MiB VHDX header section`, path);
    if (!isFileIdentifier(file.readBuffer(0, 8))) throw new DiskError("VHDX_BAD_FILE", "not a VHDX file (no \"vhdxfile\" identifier)", path);
    const pair = chooseCurrentHeader(path, [file.readBuffer(HEADER_OFFSETS[0], HEADER_SIZE), file.readBuffer(HEADER_OFFSETS[1], HEADER_SIZE)]);
    const header = pair.headers[pair.current] as VhdxHeader;
    validateLogFields(path, header);
    if (header.logLength > 0 && header.logOffset + header.logLength > size) {
      throw new DiskError("VHDX_BAD_HEADER", `log (offset ${header.logOffset}, length ${header.logLength}) extends past the end of the file (${size} bytes)`, path);
    }
    // A LogGuid with no entry carrying it names an empty log: nothing to replay; a read-write open clears it.
    const named = !guidIsZero(header.logGuid);
    const active = named ? readPendingLog(path, file, header) : undefined;
    const img = new VhdxImage(path, file, pair.current, header, active !== undefined);
    if (named && active === undefined && !readOnly) img.updateHeader({ fileWriteGuid: newGuid(), logGuid: ZERO_GUID });
    if (active !== undefined) {
      if (readOnly) {
        file.overlay = new ReplayOverlay(sequenceWrites(active), active.head.lastFileOffset);
      } else {
        // FileWriteGuid changes before the first modification (the replay itself).
        img.updateHeader({ fileWriteGuid: newGuid() });
        replayOntoFile(file, active);
        img.updateHeader({ logGuid: ZERO_GUID });
      }
    }
    img.loadStructures(lenient);
    return img;
  }

  /** Region table, metadata and BAT (after any replay). */
  private loadStructures(lenient: boolean): void {
    const { path, file } = this;
    const size = file.size();
    let regions: RegionTable | undefined;
    let firstError: DiskError | undefined;
    for (const [i, off] of REGION_TABLE_OFFSETS.entries()) {
      try {
        regions = decodeRegionTable(path, file.readBuffer(off, REGION_TABLE_SIZE), `region table ${i + 1}`);
        break;
      } catch (e) {
        if (!(e instanceof DiskError)) throw e;
        if (e.code === "VHDX_UNKNOWN_REQUIRED_REGION") throw e;
        firstError ??= e;
      }
    }
    if (!regions) throw firstError!;
    const h = this.current;
    for (const r of regions.entries) {
      if (r.fileOffset + r.length > size) throw new DiskError("VHDX_BAD_REGION_TABLE", `region at offset ${r.fileOffset} (length ${r.length}) extends past the end of the file (${size} bytes)`, path);
      if (h.logLength > 0 && r.fileOffset < h.logOffset + h.logLength && h.logOffset < r.fileOffset + r.length) {
        throw new DiskError("VHDX_BAD_REGION_TABLE", `region at offset ${r.fileOffset} overlaps the log`, path);
      }
    }
    if (regions.metadata.length > MAX_METADATA_REGION) throw new DiskError("VHDX_BAD_METADATA", `metadata region of ${regions.metadata.length} bytes exceeds the supported ${MAX_METADATA_REGION}`, path);
    this.regions = regions;
    this.metadata = decodeMetadata(path, file.readBuffer(regions.metadata.fileOffset, regions.metadata.length), regions.metadata.length);
    const m = this.metadata;
    this.geometry = new BatGeometry(m.virtualSize, m.blockSize, m.logicalSectorSize, m.hasParent);
    const need = this.geometry.entryCount * 8;
    if (need > regions.bat.length) throw new DiskError("VHDX_BAD_BAT", `BAT region holds ${regions.bat.length / 8} entries but the virtual size needs ${this.geometry.entryCount}`, path);
    this.bat = new BatTable(file.readBuffer(regions.bat.fileOffset, Math.ceil(need / 4096) * 4096));
    const problems = batProblems(this.geometry, this.bat, size, this.structures(), lenient ? 100 : 1);
    this.batIssues = problems;
    if (problems.length > 0 && !lenient) throw new DiskError("VHDX_BAD_BAT", problems[0]!.message, path, { batIndex: problems[0]!.index });
  }

  /** File spans no payload or bitmap block may overlap. */
  structures(): FileSpan[] {
    const s: FileSpan[] = [{ start: 0, end: MiB, what: "header section" }];
    if (this.current.logLength > 0) s.push({ start: this.current.logOffset, end: this.current.logOffset + this.current.logLength, what: "log" });
    for (const r of this.regions.entries) {
      s.push({ start: r.fileOffset, end: r.fileOffset + r.length, what: r === this.regions.bat ? "BAT region" : r === this.regions.metadata ? "metadata region" : "region" });
    }
    return s;
  }

  /**
   * Header update (MS-VHDX 2.2.2.1): write the non-current copy with
   * sequence+1 and the changes, then flush; only then is it current.
   */
  updateHeader(changes: HeaderChanges): void {
    const next: VhdxHeader = {
      ...this.current,
      ...changes,
      sequenceNumber: this.current.sequenceNumber + 1n,
    };
    const target = this.slot === 0 ? 1 : 0;
    this.file.write(HEADER_OFFSETS[target], encodeHeader(next));
    this.file.sync();
    this.slot = target;
    this.current = next;
  }

  close(): void {
    this.file.close();
  }
}
