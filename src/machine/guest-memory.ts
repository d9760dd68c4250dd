/**
 * Guest physical memory as the rest of Partis sees it: RAM ranges at guest
 * physical addresses, each backed by host memory (an mmap of the partition's
 * memfd in the worker; a plain ArrayBuffer in tests). The only way to touch
 * guest RAM is a bounds-checked view from `bytes()`; nothing indexes the
 * backing store directly. Addresses are numbers (exact up to 2^53).
 */
import { PartisError } from "../errors.js";

export class GuestMemoryError extends PartisError {}

export interface RamRange {
  /** Guest-physical start. */
  readonly gpa: number;
  readonly length: number;
  /** Offset of this range in the backing memfd (ranges are packed there). */
  readonly fileOffset: number;
}

export interface GuestMemory {
  readonly ranges: readonly RamRange[];
  /** Total RAM bytes. */
  readonly size: number;
  /**
   * A live view of guest RAM [gpa, gpa+length). Throws GuestMemoryError when the
   * span is not entirely inside one RAM range (or one host mapping chunk).
   */
  bytes(gpa: number, length: number): Uint8Array;
  /** Like bytes() but returns undefined instead of throwing (hot paths, guest-controlled addresses). */
  tryBytes(gpa: number, length: number): Uint8Array | undefined;
  /**
   * How many of the `length` bytes at `gpa` lie in RAM inside the one host
   * mapping chunk that holds `gpa` (0 when `gpa` is not RAM). Allocates nothing:
   * the check hot paths make before they touch a guest-given span.
   */
  contiguousLength(gpa: number, length: number): number;
  /**
   * Host virtual address of guest byte `gpa`, when guest RAM is host-mapped
   * memory that system calls may read and write directly (the worker's memfd
   * mappings), for a span already checked with contiguousLength(). Absent, or
   * -1, when the memory is a plain JS buffer (tests, tools).
   */
  hostAddress?(gpa: number): number;
  /** Copy host bytes into guest RAM; may span chunks but not holes. */
  write(gpa: number, data: Uint8Array): void;
  /** Copy guest RAM out; may span chunks but not holes. */
  read(gpa: number, length: number): Uint8Array;
}

/**
 * GuestMemory over host buffers, one buffer per chunk of at most `chunkBytes`
 * within each range. Used by the worker (buffers are views of the mmap) and by
 * tests (plain ArrayBuffers).
 */
export class ChunkedGuestMemory implements GuestMemory {
  readonly size: number;
  private readonly chunks: { gpa: number; length: number; view: Uint8Array; host: number }[] = [];

  /**
   * @param chunkFor returns host memory for [fileOffset, fileOffset+length) of the backing store.
   * @param hostAddressOf the host virtual address of a view chunkFor returned, when that
   *   memory is host-mapped (enables hostAddress()); omitted for plain buffers.
   */
  constructor(
    readonly ranges: readonly RamRange[],
    chunkFor: (fileOffset: number, length: number) => Uint8Array,
    readonly chunkBytes = 1 << 30,
    hostAddressOf?: (view: Uint8Array) => number,
  ) {
    let size = 0;
    for (const r of ranges) {
      size += r.length;
      for (let off = 0; off < r.length; off += chunkBytes) {
        const length = Math.min(chunkBytes, r.length - off);
        const view = chunkFor(r.fileOffset + off, length);
        if (view.byteLength !== length) throw new GuestMemoryError("GUEST_MEMORY_MAP", "host mapping has the wrong size");
        this.chunks.push({ gpa: r.gpa + off, length, view, host: hostAddressOf === undefined ? -1 : hostAddressOf(view) });
      }
    }
    this.chunks.sort((a, b) => a.gpa - b.gpa);
    this.size = size;
  }

  /** Plain in-process memory, for tests and tools. */
  static anonymous(ranges: readonly RamRange[]): ChunkedGuestMemory {
    return new ChunkedGuestMemory(ranges, (_off, len) => new Uint8Array(len));
  }

  /** The chunk the last lookup found: most accesses in a row hit the same one. */
  private last: { gpa: number; length: number; view: Uint8Array; host: number } | undefined;

  private chunkAt(gpa: number): { gpa: number; length: number; view: Uint8Array; host: number } | undefined {
    const l = this.last;
    if (l !== undefined && gpa >= l.gpa && gpa < l.gpa + l.length) return l;
    const cs = this.chunks;
    let lo = 0;
    let hi = cs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const c = cs[mid]!;
      if (gpa < c.gpa) hi = mid - 1;
      else if (gpa >= c.gpa + c.length) lo = mid + 1;
      else {
        this.last = c;
        return c;
      }
    }
    return undefined;
  }

  tryBytes(gpa: number, length: number): Uint8Array | undefined {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0) return undefined;
    const c = this.chunkAt(gpa);
    if (c === undefined) return undefined;
    const off = gpa - c.gpa;
    if (off + length > c.length) return undefined;
    return c.view.subarray(off, off + length);
  }

  contiguousLength(gpa: number, length: number): number {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length <= 0) return 0;
    const c = this.chunkAt(gpa);
    if (c === undefined) return 0;
    return Math.min(length, c.gpa + c.length - gpa);
  }

  hostAddress(gpa: number): number {
    const c = this.chunkAt(gpa);
    return c === undefined || c.host < 0 ? -1 : c.host + (gpa - c.gpa);
  }

  bytes(gpa: number, length: number): Uint8Array {
    const v = this.tryBytes(gpa, length);
    if (v === undefined)
      throw new GuestMemoryError("GUEST_MEMORY_RANGE", `guest range 0x${gpa.toString(16)}+0x${length.toString(16)} is not RAM`, {
        gpa,
        length,
      });
    return v;
  }

  write(gpa: number, data: Uint8Array): void {
    let done = 0;
    while (done < data.length) {
      const c = this.chunkAt(gpa + done);
      if (c === undefined)
        throw new GuestMemoryError("GUEST_MEMORY_RANGE", `guest address 0x${(gpa + done).toString(16)} is not RAM`, { gpa, length: data.length });
      const off = gpa + done - c.gpa;
      const n = Math.min(c.length - off, data.length - done);
      c.view.set(data.subarray(done, done + n), off);
      done += n;
    }
  }

  read(gpa: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const c = this.chunkAt(gpa + done);
      if (c === undefined)
        throw new GuestMemoryError("GUEST_MEMORY_RANGE", `guest address 0x${(gpa + done).toString(16)} is not RAM`, { gpa, length });
      const off = gpa + done - c.gpa;
      const n = Math.min(c.length - off, length - done);
      out.set(c.view.subarray(off, off + n), done);
      done += n;
    }
    return out;
  }
}
