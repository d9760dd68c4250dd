/**
 * A linear framebuffer like the one a BIOS boot loader leaves behind after
 * setting a VBE graphics mode: XRGB8888 pixels (32 bits, little-endian bytes
 * B, G, R, X) in guest-physical memory, described to Linux by
 * boot_params.screen_info (see screen-info.ts). The stock Debian kernel binds
 * vesafb to it (CONFIG_SYSFB + CONFIG_FB_VESA built in) and fbcon draws the
 * virtual terminals there; nothing else is emulated: no VGA registers, no mode
 * switching.
 *
 * The pixels live in a memfd (DeviceMemory) that the board maps into the guest
 * as a KVM memory slot, so guest drawing costs no exits; the host reads the same
 * pages (`pixels()`, `snapshotPpm()`) for a VNC or web console, on any thread
 * (`attach(handoff())`).
 *
 * DEVNOTE: the framebuffer sits at the bottom of the platform MMIO window
 * (memory-map.ts), below 4 GiB because vesafb in Linux 6.1 ignores ext_lfb_base.
 */
import { PartisError } from "../../errors.js";
import { DeviceMemory, type DeviceMemoryHandoff } from "../../hypervisor/device-memory.js";
import { FOUR_GIB, PLATFORM_MMIO_START } from "../../machine/memory-map.js";
import { VIDEO_TYPE, type ScreenInfo } from "./screen-info.js";

export class FramebufferConfigError extends PartisError {}

/** Where the board maps the framebuffer: the start of the platform MMIO window. */
export const FRAMEBUFFER_GPA = PLATFORM_MMIO_START;
/** Guest-physical space reserved for it there (2048x2048 at 32 bpp). */
export const FRAMEBUFFER_MAX_BYTES = 16 * 1024 * 1024;
export const DEFAULT_FRAMEBUFFER_WIDTH = 1024;
export const DEFAULT_FRAMEBUFFER_HEIGHT = 768;

export type PixelFormat = "XRGB8888";

export interface LinearFramebufferOptions {
  readonly width?: number;
  readonly height?: number;
  /** Guest-physical address (default FRAMEBUFFER_GPA); 64 KiB aligned, below 4 GiB. */
  readonly gpa?: number;
  /**
   * How screen_info announces it: "vesa" (VIDEO_TYPE_VLFB, vesafb; the default)
   * or "efi" (VIDEO_TYPE_EFI, efifb).
   */
  readonly firmware?: "vesa" | "efi";
}

/** Plain data for `LinearFramebuffer.attach` on another thread. */
export interface LinearFramebufferHandoff {
  readonly memory: DeviceMemoryHandoff;
  readonly width: number;
  readonly height: number;
  readonly gpa: number;
  readonly firmware: "vesa" | "efi";
}

const BYTES_PER_PIXEL = 4;
/** Video memory granule: 64 KiB (screen_info counts VBE memory in these units; also page-aligned). */
const GRANULE = 0x10000;

export class LinearFramebuffer {
  readonly format: PixelFormat = "XRGB8888";
  readonly bytesPerPixel = BYTES_PER_PIXEL;
  /** Bytes per scan line. */
  readonly stride: number;
  /** Bytes of video memory mapped into the guest (stride x height rounded up to 64 KiB). */
  readonly size: number;
  private readonly view: Uint8Array;

  private constructor(
    readonly memory: DeviceMemory,
    readonly width: number,
    readonly height: number,
    /** Guest-physical address of the first pixel. */
    readonly gpa: number,
    readonly firmware: "vesa" | "efi",
  ) {
    this.stride = width * BYTES_PER_PIXEL;
    this.size = memory.size;
    this.view = memory.bytes.subarray(0, this.stride * height);
  }

  /** A black framebuffer in a fresh memfd. Throws FramebufferConfigError for impossible geometry or placement. */
  static create(options: LinearFramebufferOptions = {}): LinearFramebuffer {
    const { width, height, gpa, firmware, size } = LinearFramebuffer.validate(
      options.width ?? DEFAULT_FRAMEBUFFER_WIDTH,
      options.height ?? DEFAULT_FRAMEBUFFER_HEIGHT,
      options.gpa ?? FRAMEBUFFER_GPA,
      options.firmware ?? "vesa",
    );
    return new LinearFramebuffer(DeviceMemory.create("framebuffer", size), width, height, gpa, firmware);
  }

  /** The same framebuffer on another thread of this process (maps the memfd again). */
  static attach(h: LinearFramebufferHandoff): LinearFramebuffer {
    const { size } = LinearFramebuffer.validate(h.width, h.height, h.gpa, h.firmware);
    if (h.memory.size !== size)
      throw new FramebufferConfigError("FRAMEBUFFER_HANDOFF", `framebuffer handoff: memory is ${h.memory.size} bytes, the geometry needs ${size}`);
    return new LinearFramebuffer(DeviceMemory.attach(h.memory), h.width, h.height, h.gpa, h.firmware);
  }

  private static validate(width: number, height: number, gpa: number, firmware: string): { width: number; height: number; gpa: number; firmware: "vesa" | "efi"; size: number } {
    // lfb_width, lfb_height and lfb_linelength are 16-bit fields.
    if (!Number.isInteger(width) || !Number.isInteger(height) || width < 1 || height < 1 || width * BYTES_PER_PIXEL > 0xffff || height > 0xffff)
      throw new FramebufferConfigError("FRAMEBUFFER_GEOMETRY", `framebuffer ${width}x${height} is not a valid size`, { width, height });
    const size = Math.ceil((width * BYTES_PER_PIXEL * height) / GRANULE) * GRANULE;
    if (size > FRAMEBUFFER_MAX_BYTES)
      throw new FramebufferConfigError("FRAMEBUFFER_GEOMETRY", `framebuffer ${width}x${height} needs ${size} bytes, more than ${FRAMEBUFFER_MAX_BYTES}`, {
        width,
        height,
      });
    if (!Number.isSafeInteger(gpa) || gpa < 0 || gpa % GRANULE !== 0 || gpa + size > FOUR_GIB)
      throw new FramebufferConfigError("FRAMEBUFFER_PLACEMENT", `framebuffer address 0x${gpa.toString(16)} must be 64 KiB aligned and end below 4 GiB`, { gpa });
    if (firmware !== "vesa" && firmware !== "efi")
      throw new FramebufferConfigError("FRAMEBUFFER_FIRMWARE", `framebuffer firmware type must be "vesa" or "efi", not ${firmware}`);
    return { width, height, gpa, firmware, size };
  }

  handoff(): LinearFramebufferHandoff {
    return { memory: this.memory.handoff(), width: this.width, height: this.height, gpa: this.gpa, firmware: this.firmware };
  }

  /** Live view of the visible pixels: `height` rows of `stride` bytes, each pixel B, G, R, X. */
  pixels(): Uint8Array {
    return this.view;
  }

  /** The pixel at (x, y) as 0xRRGGBB (undefined outside the screen). */
  pixel(x: number, y: number): number | undefined {
    if (!Number.isInteger(x) || !Number.isInteger(y) || x < 0 || y < 0 || x >= this.width || y >= this.height) return undefined;
    const o = y * this.stride + x * BYTES_PER_PIXEL;
    const p = this.view;
    return (p[o + 2]! << 16) | (p[o + 1]! << 8) | p[o]!;
  }

  /** A copy of the screen as a binary PPM (P6, 8 bits per channel), for tests and debugging. */
  snapshotPpm(): Uint8Array {
    const header = new TextEncoder().encode(`P6\n${this.width} ${this.height}\n255\n`);
    const out = new Uint8Array(header.length + this.width * this.height * 3);
    out.set(header);
    const p = this.view;
    let o = header.length;
    for (let y = 0; y < this.height; y++) {
      let i = y * this.stride;
      for (let x = 0; x < this.width; x++, i += BYTES_PER_PIXEL) {
        out[o++] = p[i + 2]!;
        out[o++] = p[i + 1]!;
        out[o++] = p[i]!;
      }
    }
    return out;
  }

  /** What boot_params.screen_info must say about this framebuffer (encode with encodeScreenInfo). */
  screenInfo(): ScreenInfo {
    return {
      videoType: this.firmware === "vesa" ? VIDEO_TYPE.vesaLfb : VIDEO_TYPE.efi,
      lfbBase: this.gpa,
      lfbSize: this.size,
      lfbWidth: this.width,
      lfbHeight: this.height,
      lfbDepth: 32,
      lfbLineLength: this.stride,
      red: { size: 8, pos: 16 },
      green: { size: 8, pos: 8 },
      blue: { size: 8, pos: 0 },
      rsvd: { size: 8, pos: 24 },
    };
  }

  /** Fill the whole screen with one 0xRRGGBB colour (tests, a "no signal" screen). */
  fill(rgb: number): void {
    const px = new Uint32Array(this.memory.bytes.buffer, this.memory.bytes.byteOffset, (this.stride * this.height) / 4);
    px.fill((rgb & 0xff_ffff) >>> 0);
  }

  /** Release this thread's mapping (and the memfd, on the creating thread). Unmap the KVM slot first. */
  close(): void {
    this.memory.close();
  }
}
