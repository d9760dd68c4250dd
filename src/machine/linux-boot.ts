/**
 * Direct boot of a Linux bzImage through the 64-bit boot protocol
 * (Documentation/arch/x86/boot.rst; struct setup_header and struct boot_params in
 * arch/x86/include/uapi/asm/bootparam.h).
 *
 * The loader parses the real-mode setup header at file offset 0x1f1, copies the
 * protected-mode kernel to 1 MiB, places the initrd as high as the kernel allows
 * in low RAM, writes the command line and builds the zero page (setup header
 * copy, loader type 0xff, e820 map, RSDP address). The caller then starts the BSP
 * in long mode at `entry64` with RSI = `bootParams` (see boot-cpu.ts).
 */
import { PartisError } from "../errors.js";
import type { GuestMemory } from "./guest-memory.js";
import { E820_MAX_ENTRIES_ZEROPAGE, e820Table, encodeE820 } from "./e820.js";
import { CMDLINE_MAX, initrdPlacement, type MemoryPlan } from "./memory-map.js";
import type { KernelExtent } from "./kernel-elf.js";

export class KernelImageError extends PartisError {}
export class LinuxLoadError extends PartisError {}

// Setup header offsets (in the bzImage file and in boot_params alike).
const HDR_START = 0x1f1;
const OFF_SETUP_SECTS = 0x1f1;
const OFF_SYSSIZE = 0x1f4;
const OFF_VID_MODE = 0x1fa;
const OFF_BOOT_FLAG = 0x1fe;
const OFF_JUMP = 0x200;
const OFF_HEADER = 0x202;
const OFF_VERSION = 0x206;
const OFF_TYPE_OF_LOADER = 0x210;
const OFF_LOADFLAGS = 0x211;
const OFF_CODE32_START = 0x214;
const OFF_RAMDISK_IMAGE = 0x218;
const OFF_RAMDISK_SIZE = 0x21c;
const OFF_HEAP_END_PTR = 0x224;
const OFF_CMD_LINE_PTR = 0x228;
const OFF_INITRD_ADDR_MAX = 0x22c;
const OFF_KERNEL_ALIGNMENT = 0x230;
const OFF_RELOCATABLE = 0x234;
const OFF_XLOADFLAGS = 0x236;
const OFF_CMDLINE_SIZE = 0x238;
const OFF_PREF_ADDRESS = 0x258;
const OFF_INIT_SIZE = 0x260;
/** Last byte of the 2.15 header (kernel_info_offset ends at 0x26c). */
const HDR_MAX_END = 0x26c;

// boot_params offsets outside the setup header.
const BP_SCREEN_INFO = 0x000;
const BP_SCREEN_INFO_SIZE = 0x40;
const BP_ACPI_RSDP_ADDR = 0x070;
const BP_EXT_RAMDISK_IMAGE = 0x0c0;
const BP_EXT_RAMDISK_SIZE = 0x0c4;
const BP_EXT_CMD_LINE_PTR = 0x0c8;
const BP_E820_ENTRIES = 0x1e8;
const BP_E820_TABLE = 0x2d0;
const BOOT_PARAMS_SIZE = 0x1000;

export const HDRS_MAGIC = 0x53726448; // "HdrS" little-endian
export const MIN_BOOT_PROTOCOL = 0x0206;
export const LOADED_HIGH = 0x01;
export const CAN_USE_HEAP = 0x80;
export const XLF_KERNEL_64 = 0x01;
export const XLF_CAN_BE_LOADED_ABOVE_4G = 0x02;
/** vid_mode 0xffff: "normal" (80x25 text), do not ask for a mode. */
export const VID_MODE_NORMAL = 0xffff;

export interface BzImageHeader {
  /** Boot protocol version, e.g. 0x020f. */
  readonly version: number;
  readonly setupSects: number;
  /** Protected-mode code size in 16-byte paragraphs. */
  readonly syssize: number;
  readonly loadflags: number;
  readonly xloadflags: number;
  readonly relocatable: boolean;
  readonly kernelAlignment: number;
  /** Bytes the kernel needs from its load address during decompression. */
  readonly initSize: number;
  /** Longest command line, excluding the terminating NUL. */
  readonly cmdlineSize: number;
  /** Highest address the initrd may occupy (inclusive). */
  readonly initrdAddrMax: number;
  readonly prefAddress: bigint;
  /** File offset of the protected-mode kernel. */
  readonly payloadOffset: number;
  readonly payloadLength: number;
  /** End (exclusive) of the setup header in the file, from the jump at 0x200. */
  readonly headerEnd: number;
}

/**
 * The start of a kernel file and the file's size: enough to check and plan a
 * boot without reading megabytes (the setup code and header lie within the
 * first KERNEL_HEAD_BYTES, as setup_sects is at most 255).
 */
export interface KernelFileHead {
  readonly head: Uint8Array;
  readonly size: number;
}
export const KERNEL_HEAD_BYTES = 256 * 512;

function headOf(kernel: Uint8Array | KernelFileHead): KernelFileHead {
  return kernel instanceof Uint8Array ? { head: kernel, size: kernel.length } : kernel;
}

export function parseBzImage(file: Uint8Array | KernelFileHead): BzImageHeader {
  const { head: kernel, size } = headOf(file);
  if (kernel.length < HDR_MAX_END)
    throw new KernelImageError("KERNEL_TOO_SHORT", `kernel image is ${size} bytes, too short for a setup header`, { size });
  const dv = new DataView(kernel.buffer, kernel.byteOffset, kernel.byteLength);
  const magic = dv.getUint32(OFF_HEADER, true);
  if (magic !== HDRS_MAGIC)
    throw new KernelImageError(
      "KERNEL_NOT_BZIMAGE",
      `not a Linux bzImage: no "HdrS" magic at offset 0x202 (found 0x${magic.toString(16)}); an ELF vmlinux or a compressed file is not a bzImage`,
      { magic },
    );
  const bootFlag = dv.getUint16(OFF_BOOT_FLAG, true);
  if (bootFlag !== 0xaa55)
    throw new KernelImageError("KERNEL_NOT_BZIMAGE", `not a Linux bzImage: boot_flag is 0x${bootFlag.toString(16)}, expected 0xaa55`, { bootFlag });
  const version = dv.getUint16(OFF_VERSION, true);
  if (version < MIN_BOOT_PROTOCOL)
    throw new KernelImageError(
      "KERNEL_PROTOCOL_TOO_OLD",
      `kernel boot protocol ${fmtVersion(version)} is older than ${fmtVersion(MIN_BOOT_PROTOCOL)}, the oldest this loader supports`,
      { version },
    );
  const loadflags = dv.getUint8(OFF_LOADFLAGS);
  if ((loadflags & LOADED_HIGH) === 0)
    throw new KernelImageError("KERNEL_NOT_BZIMAGE", "kernel is a zImage (LOADED_HIGH clear); only bzImage kernels are supported", { loadflags });
  const xloadflags = version >= 0x020c ? dv.getUint16(OFF_XLOADFLAGS, true) : 0;
  if ((xloadflags & XLF_KERNEL_64) === 0)
    throw new KernelImageError(
      "KERNEL_NOT_64BIT",
      `kernel has no 64-bit entry point (xloadflags 0x${xloadflags.toString(16)}, protocol ${fmtVersion(version)}): a 32-bit kernel or one older than protocol 2.12`,
      { xloadflags, version },
    );
  let setupSects = dv.getUint8(OFF_SETUP_SECTS);
  if (setupSects === 0) setupSects = 4;
  const payloadOffset = (setupSects + 1) * 512;
  const syssize = dv.getUint32(OFF_SYSSIZE, true);
  if (payloadOffset >= size)
    throw new KernelImageError("KERNEL_TRUNCATED", `kernel image is ${size} bytes but its setup code claims ${payloadOffset}`, {
      size,
      setupSects,
    });
  const payloadLength = size - payloadOffset;
  if (syssize * 16 > payloadLength)
    throw new KernelImageError(
      "KERNEL_TRUNCATED",
      `kernel image is truncated: syssize says ${syssize * 16} bytes of protected-mode code, the file has ${payloadLength}`,
      { size: kernel.length, syssize },
    );
  const headerEnd = Math.min(OFF_JUMP + 2 + dv.getUint8(OFF_JUMP + 1), HDR_MAX_END);
  const initSize = version >= 0x020a ? dv.getUint32(OFF_INIT_SIZE, true) : 0;
  return {
    version,
    setupSects,
    syssize,
    loadflags,
    xloadflags,
    relocatable: dv.getUint8(OFF_RELOCATABLE) !== 0,
    kernelAlignment: dv.getUint32(OFF_KERNEL_ALIGNMENT, true),
    initSize: initSize === 0 ? payloadLength : initSize,
    cmdlineSize: dv.getUint32(OFF_CMDLINE_SIZE, true),
    initrdAddrMax: dv.getUint32(OFF_INITRD_ADDR_MAX, true),
    prefAddress: version >= 0x020a ? dv.getBigUint64(OFF_PREF_ADDRESS, true) : 0n,
    payloadOffset,
    payloadLength,
    headerEnd,
  };
}

export interface LinuxBootInfo {
  /** 64-bit entry point: load address + 0x200 (the decompressor), or the unpacked kernel's startup_64. */
  readonly entry64: number;
  /** Guest-physical address of boot_params (RSI at entry). */
  readonly bootParams: number;
  readonly kernelLoad: number;
  readonly kernelEnd: number;
  readonly initrd?: { readonly addr: number; readonly size: number };
  readonly cmdlineAddr: number;
  readonly header: BzImageHeader;
}

export interface LinuxLoadOptions {
  /** RSDP address written to boot_params.acpi_rsdp_addr (the kernel also scans 0xE0000-0xFFFFF). */
  readonly rsdpAddr?: number;
  /**
   * struct screen_info (0x40 bytes, boot_params offset 0) describing a display the
   * kernel should use, e.g. encodeScreenInfo(framebuffer.screenInfo()) from
   * src/devices/display. Absent: all zero (no display; vgacon falls back to the dummy console).
   */
  readonly screenInfo?: Uint8Array;
  /**
   * The kernel already decompressed on the host (src/images/kernel-unpack.ts):
   * its non-zero runs are copied to their physical addresses and the BSP starts
   * at the kernel proper's startup_64, skipping the decompressor. The bzImage is
   * still given for its setup header.
   */
  readonly unpacked?: UnpackedKernelImage;
}

/** A decompressed kernel ready to copy: see src/machine/kernel-elf.ts. */
export interface UnpackedKernelImage {
  readonly entry: number;
  readonly loadStart: number;
  readonly loadEnd: number;
  readonly extents: readonly KernelExtent[];
  /** Size of the flat image the extents index into (extent.offset). */
  readonly imageBytes: number;
  /**
   * Fill `into` (a live view of guest RAM where it can be, so nothing is
   * copied twice) with extent `x`'s bytes from the flat image.
   */
  readonly read: (x: KernelExtent, into: Uint8Array) => void;
}

/** Where everything of a Linux boot goes, decided before anything is written. */
export interface LinuxLoadPlan {
  readonly header: BzImageHeader;
  readonly kernelEnd: number;
  readonly cmdline: Uint8Array;
  readonly initrd?: { readonly addr: number; readonly size: number };
}

/**
 * Check that a kernel, an initrd of `initrdSize` bytes and a command line fit
 * the memory plan, and decide their placement. Throws KernelImageError or
 * LinuxLoadError; writes nothing (the CLI validates with it before starting).
 */
export function planLinuxLoad(
  plan: MemoryPlan,
  kernel: Uint8Array | KernelFileHead,
  initrdSize: number,
  cmdline: string,
  unpacked?: Pick<UnpackedKernelImage, "entry" | "loadStart" | "loadEnd">,
): LinuxLoadPlan {
  const hdr = parseBzImage(kernel);
  const load = plan.kernelLoad;
  const base = decompressionBase(hdr, load);
  const kernelEnd = Math.max(load + hdr.payloadLength, base + hdr.initSize);
  if (kernelEnd > plan.lowRamEnd)
    throw new LinuxLoadError(
      "KERNEL_DOES_NOT_FIT",
      `kernel needs ${hdr.initSize} bytes from 0x${load.toString(16)} but low RAM ends at 0x${plan.lowRamEnd.toString(16)}`,
      { initSize: hdr.initSize, lowRamEnd: plan.lowRamEnd },
    );
  // The unpacked kernel must sit where its decompressor would have put it: inside [base, base + init_size).
  if (unpacked !== undefined && (unpacked.loadStart < base || unpacked.loadEnd > base + hdr.initSize || unpacked.entry < unpacked.loadStart || unpacked.entry >= unpacked.loadEnd))
    throw new LinuxLoadError(
      "UNPACKED_KERNEL_MISPLACED",
      `decompressed kernel spans 0x${unpacked.loadStart.toString(16)}-0x${unpacked.loadEnd.toString(16)} (entry 0x${unpacked.entry.toString(16)}), outside the bzImage's 0x${base.toString(16)}-0x${(base + hdr.initSize).toString(16)}`,
      { loadStart: unpacked.loadStart, loadEnd: unpacked.loadEnd, base, initSize: hdr.initSize },
    );

  // Command line (NUL-terminated, within the kernel's cmdline_size).
  const cmdBytes = new TextEncoder().encode(cmdline);
  const maxCmd = Math.min(hdr.version >= 0x0206 && hdr.cmdlineSize > 0 ? hdr.cmdlineSize : 255, CMDLINE_MAX - 1);
  if (cmdBytes.includes(0)) throw new LinuxLoadError("CMDLINE_INVALID", "kernel command line contains a NUL byte");
  if (cmdBytes.length > maxCmd)
    throw new LinuxLoadError("CMDLINE_TOO_LONG", `kernel command line is ${cmdBytes.length} bytes; this kernel accepts at most ${maxCmd}`, {
      length: cmdBytes.length,
      max: maxCmd,
    });

  let initrdInfo: { addr: number; size: number } | undefined;
  if (initrdSize > 0) {
    const addr = initrdPlacement(plan, initrdSize, hdr.initrdAddrMax, kernelEnd);
    if (addr === undefined) {
      const limit = Math.min(hdr.initrdAddrMax + 1, plan.lowRamEnd);
      throw new LinuxLoadError(
        "INITRD_DOES_NOT_FIT",
        `initrd of ${initrdSize} bytes does not fit between the kernel end 0x${kernelEnd.toString(16)} and 0x${limit.toString(16)} (${Math.max(0, limit - kernelEnd)} bytes free); give the guest more memory`,
        { initrdSize, kernelEnd, limit },
      );
    }
    initrdInfo = { addr, size: initrdSize };
  }

  return { header: hdr, kernelEnd, cmdline: cmdBytes, ...(initrdInfo !== undefined ? { initrd: initrdInfo } : {}) };
}

/** `kernel` is the whole bzImage, or only its head when the kernel comes unpacked (options.unpacked). */
export function loadLinux(
  memory: GuestMemory,
  plan: MemoryPlan,
  kernel: Uint8Array | KernelFileHead,
  initrd: Uint8Array | undefined,
  cmdline: string,
  options: LinuxLoadOptions = {},
): LinuxBootInfo {
  if (options.screenInfo !== undefined && options.screenInfo.length !== BP_SCREEN_INFO_SIZE)
    throw new LinuxLoadError("SCREEN_INFO_SIZE", `screen_info is ${options.screenInfo.length} bytes, expected ${BP_SCREEN_INFO_SIZE}`, {
      length: options.screenInfo.length,
    });
  const unpacked = options.unpacked;
  const { header: hdr, kernelEnd, cmdline: cmdBytes, initrd: initrdInfo } = planLinuxLoad(plan, kernel, initrd?.length ?? 0, cmdline, unpacked);
  const load = plan.kernelLoad;

  // Copy in: kernel, initrd, command line.
  const { head, size } = headOf(kernel);
  if (unpacked === undefined) {
    if (head.length !== size) throw new LinuxLoadError("KERNEL_INCOMPLETE", `only ${head.length} of the kernel's ${size} bytes were given`, { given: head.length, size });
    memory.write(load, head.subarray(hdr.payloadOffset));
  } else
    for (const x of unpacked.extents) {
      if (x.offset + x.length > unpacked.imageBytes)
        throw new LinuxLoadError("UNPACKED_KERNEL_TRUNCATED", `decompressed kernel image is ${unpacked.imageBytes} bytes; an extent needs ${x.offset + x.length}`, { offset: x.offset, length: x.length });
      if (x.gpa < unpacked.loadStart || x.gpa + x.length > unpacked.loadEnd)
        throw new LinuxLoadError("UNPACKED_KERNEL_MISPLACED", `decompressed kernel extent at 0x${x.gpa.toString(16)} is outside its load span`, { gpa: x.gpa, length: x.length });
      const view = memory.tryBytes(x.gpa, x.length);
      if (view !== undefined) unpacked.read(x, view);
      else {
        const bytes = new Uint8Array(x.length);
        unpacked.read(x, bytes);
        memory.write(x.gpa, bytes);
      }
    }
  if (initrdInfo !== undefined && initrd !== undefined) memory.write(initrdInfo.addr, initrd);
  const cmdBuf = new Uint8Array(cmdBytes.length + 1);
  cmdBuf.set(cmdBytes);
  memory.write(plan.cmdline.start, cmdBuf);

  // Zero page.
  const bp = new Uint8Array(BOOT_PARAMS_SIZE);
  const dv = new DataView(bp.buffer);
  bp.set(head.subarray(HDR_START, hdr.headerEnd), HDR_START);
  dv.setUint16(OFF_VID_MODE, VID_MODE_NORMAL, true);
  dv.setUint8(OFF_TYPE_OF_LOADER, 0xff);
  dv.setUint8(OFF_LOADFLAGS, (hdr.loadflags | CAN_USE_HEAP) & 0xff);
  // heap_end_ptr: offset from the real-mode setup start; unused on the 64-bit path but sane.
  dv.setUint16(OFF_HEAP_END_PTR, 0xfe00, true);
  dv.setUint32(OFF_CODE32_START, load, true);
  dv.setUint32(OFF_CMD_LINE_PTR, plan.cmdline.start >>> 0, true);
  dv.setUint32(BP_EXT_CMD_LINE_PTR, Math.floor(plan.cmdline.start / 2 ** 32), true);
  if (initrdInfo !== undefined) {
    dv.setUint32(OFF_RAMDISK_IMAGE, initrdInfo.addr >>> 0, true);
    dv.setUint32(OFF_RAMDISK_SIZE, initrdInfo.size >>> 0, true);
    dv.setUint32(BP_EXT_RAMDISK_IMAGE, Math.floor(initrdInfo.addr / 2 ** 32), true);
    dv.setUint32(BP_EXT_RAMDISK_SIZE, Math.floor(initrdInfo.size / 2 ** 32), true);
  }
  if (options.rsdpAddr !== undefined) dv.setBigUint64(BP_ACPI_RSDP_ADDR, BigInt(options.rsdpAddr), true);
  if (options.screenInfo !== undefined) bp.set(options.screenInfo, BP_SCREEN_INFO);
  const e820 = e820Table(plan);
  if (e820.length > E820_MAX_ENTRIES_ZEROPAGE) throw new LinuxLoadError("E820_TOO_LARGE", `e820 map has ${e820.length} entries`);
  dv.setUint8(BP_E820_ENTRIES, e820.length);
  bp.set(encodeE820(e820), BP_E820_TABLE);
  memory.write(plan.zeroPage, bp);

  return {
    entry64: unpacked?.entry ?? load + 0x200,
    bootParams: plan.zeroPage,
    kernelLoad: load,
    kernelEnd,
    ...(initrdInfo !== undefined ? { initrd: initrdInfo } : {}),
    cmdlineAddr: plan.cmdline.start,
    header: hdr,
  };
}

const OFF_PAYLOAD_OFFSET = 0x248;
const OFF_PAYLOAD_LENGTH = 0x24c;

/** Compression formats of a bzImage payload, by magic (arch/x86/boot/compressed/Makefile). */
export type KernelCompression = "gzip" | "xz" | "zstd" | "lzma" | "bzip2" | "lz4" | "lzo" | "unknown";
const PAYLOAD_MAGIC: readonly (readonly [KernelCompression, readonly number[]])[] = [
  ["gzip", [0x1f, 0x8b]],
  ["xz", [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]],
  ["zstd", [0x28, 0xb5, 0x2f, 0xfd]],
  ["lzma", [0x5d, 0x00, 0x00]],
  ["bzip2", [0x42, 0x5a, 0x68]],
  ["lz4", [0x02, 0x21, 0x4c, 0x18]],
  ["lzo", [0x89, 0x4c, 0x5a, 0x4f]],
];

/**
 * The bzImage's compressed kernel (protocol 2.08+: payload_offset/payload_length,
 * relative to the protected-mode code) and its format. Every format but gzip
 * carries the decompressed size as 4 trailing little-endian bytes (the build's
 * size_append); `data` excludes them and `decompressedSize` reports them.
 */
export function compressedPayload(kernel: Uint8Array, hdr: BzImageHeader = parseBzImage(kernel)): { compression: KernelCompression; data: Uint8Array; decompressedSize?: number } {
  if (hdr.version < 0x0208) throw new KernelImageError("KERNEL_PROTOCOL_TOO_OLD", `kernel boot protocol ${fmtVersion(hdr.version)} does not describe its payload (2.08+)`, { version: hdr.version });
  const dv = new DataView(kernel.buffer, kernel.byteOffset, kernel.byteLength);
  const offset = hdr.payloadOffset + dv.getUint32(OFF_PAYLOAD_OFFSET, true);
  const length = dv.getUint32(OFF_PAYLOAD_LENGTH, true);
  if (length < 8 || offset + length > kernel.length)
    throw new KernelImageError("KERNEL_TRUNCATED", `kernel payload (0x${offset.toString(16)}, ${length} bytes) runs past the end of the ${kernel.length}-byte file`, { offset, length });
  const p = kernel.subarray(offset, offset + length);
  const compression = PAYLOAD_MAGIC.find(([, magic]) => magic.every((b, i) => p[i] === b))?.[0] ?? "unknown";
  if (compression === "gzip" || compression === "unknown") return { compression, data: p };
  return { compression, data: p.subarray(0, length - 4), decompressedSize: new DataView(p.buffer, p.byteOffset + length - 4, 4).getUint32(0, true) };
}

/**
 * Where the kernel decompresses itself (arch/x86/boot/compressed/head_64.S): a
 * relocatable kernel uses its load address rounded up to kernel_alignment, but never
 * below pref_address (LOAD_PHYSICAL_ADDR); a fixed one uses pref_address. It needs
 * init_size bytes from there, so nothing else may be placed in that span.
 */
export function decompressionBase(hdr: BzImageHeader, load: number): number {
  const pref = Number(hdr.prefAddress);
  if (!hdr.relocatable) return pref > 0 ? pref : load;
  const align = hdr.kernelAlignment > 0 ? hdr.kernelAlignment : 1;
  return Math.max(Math.ceil(load / align) * align, pref);
}

function fmtVersion(v: number): string {
  return `${v >> 8}.${(v & 0xff).toString().padStart(2, "0")}`;
}
