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

/**
 * Where a span of guest RAM lives in host memory, filled in place by
 * GuestMemory.locate(): the whole host chunk that holds it and the span's
 * offset there. Hot paths keep one and reuse it, so finding a descriptor
 * table or a request header allocates nothing (a view per lookup would).
 */
export class GuestSpan {
  /** The host chunk holding the span (index it from `offset`). */
  view: Uint8Array = NO_BYTES;
  /** The same chunk as 32-bit words when it starts 4-byte aligned, else undefined. */
  words: Uint32Array | undefined = undefined;
  /** Byte offset of the span in `view`. */
  offset = 0;
}

const NO_BYTES = new Uint8Array(0);

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
   * Fill `out` with where [gpa, gpa+length) lives (one RAM range and host
   * mapping chunk, as tryBytes requires) and return true; false, `out`
   * untouched, otherwise. Allocates nothing.
   */
  locate(gpa: number, length: number, out: GuestSpan): boolean;
  /**
   * How many of the `length` bytes at `gpa` lie in RAM inside the one host
   * mapping chunk that holds `gpa` (0 when `gpa` is not RAM). Allocates nothing:
   * the check hot paths make before they touch a guest-given span.
   */
  contiguousLength(gpa: number, length: number): number;
  /**
   * Host virtual addresses of guest bytes `gpas[0..count)` (spans already
   * checked with contiguousLength()), into `out`, when guest RAM is host-mapped
   * memory that system calls may read and write directly (the worker's memfd
   * mappings). All at once: no address crosses a call per span, so nothing is
   * boxed even where the JIT does not inline. Absent, or false (`out` partly
   * written), when the memory is a plain JS buffer (tests, tools).
   */
  hostAddresses?(gpas: Float64Array, count: number, out: Float64Array): boolean;
  /** Copy host bytes into guest RAM; may span chunks but not holes. */
  write(gpa: number, data: Uint8Array): void;
  /** Copy guest RAM out; may span chunks but not holes. */
  read(gpa: number, length: number): Uint8Array;
}

/** One host buffer behind a piece of guest RAM. */
interface MemoryChunk {
  readonly gpa: number;
  readonly length: number;
  readonly view: Uint8Array;
  /** `view` as 32-bit words when it starts 4-byte aligned. */
  readonly words: Uint32Array | undefined;
  /** Host virtual address of view[0], or -1 for a plain JS buffer. */
  readonly host: number;
}

/**
 * GuestMemory over host buffers, one buffer per chunk of at most `chunkBytes`
 * within each range. Used by the worker (buffers are views of the mmap) and by
 * tests (plain ArrayBuffers).
 */
export class ChunkedGuestMemory implements GuestMemory {
  readonly size: number;
  private readonly chunks: MemoryChunk[] = [];

  /**
   * @param chunkFor returns host memory for [fileOffset, fileOffset+length) of the backing store.
   * @param hostAddressOf the host virtual address of a view chunkFor returned, when that
   *   memory is host-mapped (enables hostAddresses()); omitted for plain buffers.
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
        const words = view.byteOffset % 4 === 0 ? new Uint32Array(view.buffer, view.byteOffset, length >>> 2) : undefined;
        this.chunks.push({ gpa: r.gpa + off, length, view, words, host: hostAddressOf === undefined ? -1 : hostAddressOf(view) });
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
  private last: MemoryChunk | undefined;

  private chunkAt(gpa: number): MemoryChunk | undefined {
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

  locate(gpa: number, length: number, out: GuestSpan): boolean {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0) return false;
    const c = this.chunkAt(gpa);
    if (c === undefined) return false;
    const off = gpa - c.gpa;
    if (off + length > c.length) return false;
    out.view = c.view;
    out.words = c.words;
    out.offset = off;
    return true;
  }

  contiguousLength(gpa: number, length: number): number {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length <= 0) return 0;
    const c = this.chunkAt(gpa);
    if (c === undefined) return 0;
    return Math.min(length, c.gpa + c.length - gpa);
  }

  hostAddresses(gpas: Float64Array, count: number, out: Float64Array): boolean {
    for (let i = 0; i < count; i++) {
      const gpa = gpas[i]!;
      const c = this.chunkAt(gpa);
      if (c === undefined || c.host < 0) return false;
      out[i] = c.host + (gpa - c.gpa);
    }
    return true;
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
