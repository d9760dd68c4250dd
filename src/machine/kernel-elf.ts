/**
 * The decompressed x86-64 kernel (`vmlinux`): the ELF image a bzImage's
 * decompressor unpacks and jumps to (arch/x86/boot/compressed/misc.c,
 * parse_elf). Partis can do that unpacking once on the host (see
 * src/images/kernel-unpack.ts) and then load the segments itself, so the guest
 * starts in the kernel proper's startup_64 instead of spending its first
 * seconds decompressing.
 *
 * What the loader needs from the ELF: the PT_LOAD segments (placed at their
 * physical addresses, p_paddr) and the entry point (physical address of
 * startup_64). The relocation tables the build appends after the ELF are not
 * used: the kernel runs at its link address (no kernel-image KASLR).
 */
import { KernelImageError } from "./linux-boot.js";

const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const ET_EXEC = 2;
const EM_X86_64 = 62;
const PT_LOAD = 1;
const EHDR_SIZE = 64;
const PHDR_SIZE = 56;
const MAX_SEGMENTS = 64;
/** Below this the real-mode area, BIOS data and ROMs live: no kernel segment belongs there. */
const MIN_SEGMENT_PADDR = 0x10_0000;

export interface KernelSegment {
  /** Guest-physical load address (p_paddr). */
  readonly paddr: number;
  /** Offset of the segment's bytes in the ELF file. */
  readonly fileOffset: number;
  readonly fileSize: number;
  /** Bytes the segment occupies in memory (file bytes, then zeros). */
  readonly memSize: number;
}

export interface KernelElf {
  /** Physical entry point (the kernel proper's startup_64). */
  readonly entry: number;
  readonly segments: readonly KernelSegment[];
  /** Lowest and (exclusive) highest physical address any segment occupies. */
  readonly loadStart: number;
  readonly loadEnd: number;
}

/** One run of non-zero bytes to copy into guest memory: `length` bytes from `offset` in the flat image to `gpa`. */
export interface KernelExtent {
  readonly gpa: number;
  readonly offset: number;
  readonly length: number;
}

function bad(message: string, context: Record<string, number> = {}): KernelImageError {
  return new KernelImageError("KERNEL_ELF_INVALID", `decompressed kernel: ${message}`, context);
}

function u64(dv: DataView, off: number, what: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`${what} 0x${v.toString(16)} is out of range`);
  return Number(v);
}

/** Parse and check an x86-64 vmlinux ELF: 64-bit little-endian executable, sane PT_LOAD segments, entry inside one. */
export function parseKernelElf(image: Uint8Array): KernelElf {
  if (image.length < EHDR_SIZE || image[0] !== 0x7f || image[1] !== 0x45 || image[2] !== 0x4c || image[3] !== 0x46)
    throw bad("not an ELF file", { size: image.length });
  if (image[4] !== ELFCLASS64 || image[5] !== ELFDATA2LSB) throw bad("not a 64-bit little-endian ELF", { class: image[4]!, data: image[5]! });
  const dv = new DataView(image.buffer, image.byteOffset, image.byteLength);
  const type = dv.getUint16(16, true);
  const machine = dv.getUint16(18, true);
  if (type !== ET_EXEC || machine !== EM_X86_64) throw bad("not an x86-64 executable", { type, machine });
  const entry = u64(dv, 24, "entry point");
  const phoff = u64(dv, 32, "program header offset");
  const phentsize = dv.getUint16(54, true);
  const phnum = dv.getUint16(56, true);
  if (phentsize !== PHDR_SIZE || phnum === 0 || phnum > MAX_SEGMENTS) throw bad("unexpected program header table", { phentsize, phnum });
  if (phoff + phnum * PHDR_SIZE > image.length) throw bad("program headers run past the end of the file", { phoff, phnum, size: image.length });

  const segments: KernelSegment[] = [];
  for (let i = 0; i < phnum; i++) {
    const p = phoff + i * PHDR_SIZE;
    if (dv.getUint32(p, true) !== PT_LOAD) continue;
    const fileOffset = u64(dv, p + 8, "segment offset");
    const paddr = u64(dv, p + 24, "segment physical address");
    const fileSize = u64(dv, p + 32, "segment file size");
    const memSize = u64(dv, p + 40, "segment memory size");
    if (fileSize > memSize) throw bad(`segment ${i} has more file bytes than memory bytes`, { segment: i, fileSize, memSize });
    if (fileOffset + fileSize > image.length) throw bad(`segment ${i} runs past the end of the file`, { segment: i, fileOffset, fileSize, size: image.length });
    if (paddr < MIN_SEGMENT_PADDR || paddr + memSize > 2 ** 40) throw bad(`segment ${i} at physical 0x${paddr.toString(16)} is outside the kernel's range`, { segment: i, paddr });
    if (memSize > 0) segments.push({ paddr, fileOffset, fileSize, memSize });
  }
  if (segments.length === 0) throw bad("no loadable segments");
  segments.sort((a, b) => a.paddr - b.paddr);
  for (let i = 1; i < segments.length; i++)
    if (segments[i]!.paddr < segments[i - 1]!.paddr + segments[i - 1]!.memSize)
      throw bad("loadable segments overlap", { at: segments[i]!.paddr });
  if (!segments.some((s) => entry >= s.paddr && entry < s.paddr + s.fileSize))
    throw bad(`entry point 0x${entry.toString(16)} is not inside a loaded segment`, { entry });
  const last = segments[segments.length - 1]!;
  return { entry, segments, loadStart: segments[0]!.paddr, loadEnd: last.paddr + last.memSize };
}

/**
 * The segments' file bytes as runs of non-zero pages: guest RAM starts zeroed,
 * so zero pages (most of .bss and .brk, which the build stores as file bytes)
 * need not be kept or copied. Returns the runs and the flat image holding them
 * back to back.
 */
export function packKernelSegments(image: Uint8Array, elf: KernelElf, pageSize = 4096): { extents: KernelExtent[]; flat: Uint8Array } {
  const runs: { gpa: number; src: number; length: number }[] = [];
  let total = 0;
  for (const s of elf.segments) {
    let runStart = -1;
    const flush = (end: number): void => {
      if (runStart < 0) return;
      runs.push({ gpa: s.paddr + runStart, src: s.fileOffset + runStart, length: end - runStart });
      total += end - runStart;
      runStart = -1;
    };
    for (let off = 0; off < s.fileSize; off += pageSize) {
      const end = Math.min(off + pageSize, s.fileSize);
      let zero = true;
      for (let i = s.fileOffset + off, e = s.fileOffset + end; i < e; i++)
        if (image[i] !== 0) {
          zero = false;
          break;
        }
      if (zero) flush(off);
      else if (runStart < 0) runStart = off;
    }
    flush(s.fileSize);
  }
  const flat = new Uint8Array(total);
  const extents: KernelExtent[] = [];
  let at = 0;
  for (const r of runs) {
    flat.set(image.subarray(r.src, r.src + r.length), at);
    extents.push({ gpa: r.gpa, offset: at, length: r.length });
    at += r.length;
  }
  return { extents, flat };
}
