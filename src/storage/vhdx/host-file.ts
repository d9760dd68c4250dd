/**
 * The VHDX file on the host: positioned synchronous reads and writes through
 * Node's fs, size changes and flushes, every failure turned into a DiskError
 * naming the file. A read-only open of an image whose log needs replay gets
 * a ReplayOverlay: the replayed sectors live in memory and reads see them,
 * while the file itself is never written (see log.ts).
 *
 * Opened for `cache=none` or `directsync` (O_DIRECT), every read and write
 * of this class goes through the aligned bounce buffer of a DirectIo
 * (src/storage/raw.ts: widened to the file system's alignment,
 * read-modify-write at unaligned edges), while payload transfers between
 * guest RAM and the file go straight through RawDisk.payloadOf with the
 * same DirectIo. A file system that refuses O_DIRECT leaves the file
 * buffered, with a note.
 */
import * as fs from "node:fs";
import { DiskError } from "../block-device.js";
import { DirectIo, openFileForDisk, preadFully, pwriteFully } from "../raw.js";

export const KiB = 1024;
export const MiB = 1024 * 1024;
export const TiB = MiB * MiB;

/** A write the log would replay: data (4 KiB multiples) or zeros. */
export interface ReplayedWrite {
  readonly offset: number;
  readonly length: number;
  /** undefined: zeros. */
  readonly data: Buffer | undefined;
}

export class ReplayOverlay {
  constructor(readonly writes: readonly ReplayedWrite[], readonly minFileSize: number) {}

  /** Patch buf (file bytes at pos) with the replayed writes, in replay order. */
  apply(pos: number, buf: Uint8Array): void {
    const end = pos + buf.length;
    for (const w of this.writes) {
      const s = Math.max(pos, w.offset);
      const e = Math.min(end, w.offset + w.length);
      if (s >= e) continue;
      if (w.data) buf.set(w.data.subarray(s - w.offset, e - w.offset), s - pos);
      else buf.fill(0, s - pos, e - pos);
    }
  }
}

/** How HostFile.open opens the file: O_DIRECT (`direct`), O_DSYNC (`writeThrough`). */
export interface HostFileCache {
  readonly direct?: boolean;
  readonly writeThrough?: boolean;
}

export class HostFile {
  private fd: number;
  overlay: ReplayOverlay | undefined;
  /** Set when the file is open with O_DIRECT: alignment, and the bounce buffer every read and write here goes through. */
  readonly directIo: DirectIo | undefined;
  /** Why O_DIRECT was asked for and is not in use, and similar remarks. */
  readonly notes: string[];

  private constructor(readonly path: string, fd: number, readonly readOnly: boolean, directIo?: DirectIo, notes: string[] = []) {
    this.fd = fd;
    this.directIo = directIo;
    this.notes = notes;
  }

  /**
   * The descriptor, for transfers that bypass this class (payload data
   * through RawDisk.payloadOf); undefined while an in-memory replay overlay
   * must patch what is read.
   */
  get directDescriptor(): number | undefined {
    return this.overlay === undefined && this.fd >= 0 ? this.fd : undefined;
  }

  static open(path: string, readOnly: boolean, cache: HostFileCache = {}): HostFile {
    if (cache.direct === true || cache.writeThrough === true) return HostFile.openCached(path, readOnly, cache);
    try {
      return new HostFile(path, fs.openSync(path, readOnly ? "r" : "r+"), readOnly);
    } catch (e) {
      throw ioError(path, "cannot open", e);
    }
  }

  /** Opened with O_DIRECT and/or O_DSYNC (openFileForDisk: a direct descriptor the file system refuses is given up, with a note). */
  private static openCached(path: string, readOnly: boolean, cache: HostFileCache): HostFile {
    const { fd, direct, notes } = openFileForDisk(path, readOnly, cache.direct === true, 512, cache.writeThrough === true);
    return new HostFile(path, fd, readOnly, direct, notes);
  }

  static create(path: string): HostFile {
    try {
      return new HostFile(path, fs.openSync(path, "wx+"), false);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === "EEXIST") throw new DiskError("DISK_EXISTS", "file already exists", path);
      throw ioError(path, "cannot create", e);
    }
  }

  /** Apparent size, including what an in-memory replay would extend it to. */
  size(): number {
    const s = this.statSize();
    return this.overlay ? Math.max(s, this.overlay.minFileSize) : s;
  }

  statSize(): number {
    try {
      return fs.fstatSync(this.fd).size;
    } catch (e) {
      throw ioError(this.path, "fstat failed", e);
    }
  }

  allocatedBytes(): number {
    try {
      return fs.fstatSync(this.fd).blocks * 512;
    } catch (e) {
      throw ioError(this.path, "fstat failed", e);
    }
  }

  /** Fill buf from pos; bytes past end of file read as zeros. */
  read(pos: number, buf: Uint8Array): void {
    try {
      if (this.directIo !== undefined) this.directIo.read(pos, buf);
      else preadFully(this.fd, buf, pos);
    } catch (e) {
      throw ioError(this.path, "read failed", e, pos);
    }
    if (this.overlay) this.overlay.apply(pos, buf);
  }

  readBuffer(pos: number, length: number): Buffer {
    const b = Buffer.alloc(length);
    this.read(pos, b);
    return b;
  }

  write(pos: number, buf: Uint8Array): void {
    if (this.readOnly) throw new DiskError("DISK_READ_ONLY", "write to a read-only VHDX", this.path, { offset: pos });
    try {
      if (this.directIo !== undefined) this.directIo.write(pos, buf);
      else pwriteFully(this.fd, buf, pos);
    } catch (e) {
      throw ioError(this.path, "write failed", e, pos);
    }
  }

  /** Write zeros over [pos, pos+length) in bounded chunks. */
  writeZeros(pos: number, length: number): void {
    const chunk = Buffer.alloc(Math.min(length, MiB));
    for (let off = 0; off < length; off += chunk.length) {
      this.write(pos + off, chunk.subarray(0, Math.min(chunk.length, length - off)));
    }
  }

  truncate(size: number): void {
    try {
      fs.ftruncateSync(this.fd, size);
    } catch (e) {
      throw ioError(this.path, "resize of the file failed", e, size);
    }
  }

  /** fdatasync: data and the metadata needed to read it back (file size). */
  sync(): void {
    if (this.readOnly) return;
    try {
      fs.fdatasyncSync(this.fd);
    } catch (e) {
      throw ioError(this.path, "flush failed", e);
    }
  }

  close(): void {
    if (this.fd < 0) return;
    try {
      fs.closeSync(this.fd);
    } finally {
      this.fd = -1;
    }
  }
}

function ioError(path: string, what: string, e: unknown, offset?: number): DiskError {
  const err = e as NodeJS.ErrnoException;
  return new DiskError("DISK_IO", `${what}: ${err.message ?? String(e)}`, path, { offset, errno: err.code });
}
