/**
 * Linux's `struct screen_info` (include/uapi/linux/screen_info.h), the first
 * 0x40 bytes of boot_params (Documentation/arch/x86/zero-page.rst): how the boot
 * loader tells the kernel about the display it left behind. For a linear
 * framebuffer the type is VIDEO_TYPE_VLFB ("VESA VGA in graphic mode"), as a
 * BIOS boot loader with a VBE mode sets it; the kernel's sysfb code then
 * registers a "vesa-framebuffer" platform device and vesafb (CONFIG_FB_VESA)
 * drives it, or simplefb/simpledrm where CONFIG_SYSFB_SIMPLEFB is set.
 *
 * DEVNOTE: for VIDEO_TYPE_VLFB, lfb_size counts 64 KiB units (the VBE
 * TotalMemory field); for VIDEO_TYPE_EFI it counts bytes. A base above 4 GiB
 * needs VIDEO_CAPABILITY_64BIT_BASE and ext_lfb_base (efifb and simplefb honour
 * them; vesafb in 6.1 reads only the low 32 bits).
 */
import { PartisError } from "../../errors.js";

export class ScreenInfoError extends PartisError {}

/** Bytes of struct screen_info at boot_params offset 0. */
export const SCREEN_INFO_SIZE = 0x40;

/** orig_video_isVGA values (screen_info.h). */
export const VIDEO_TYPE = { vgaColor: 0x22, vesaLfb: 0x23, efi: 0x70 } as const;
/** screen_info.capabilities bits. */
export const VIDEO_CAPABILITY = { skipQuirks: 1 << 0, base64: 1 << 1 } as const;

/** One colour channel: `size` bits starting at bit `pos` of a pixel. */
export interface ColorField {
  readonly size: number;
  readonly pos: number;
}

/** The linear-framebuffer fields of struct screen_info, in plain units. */
export interface ScreenInfo {
  /** orig_video_isVGA: VIDEO_TYPE.vesaLfb or VIDEO_TYPE.efi. */
  readonly videoType: number;
  /** Guest-physical address of the first pixel (lfb_base, plus ext_lfb_base above 4 GiB). */
  readonly lfbBase: number;
  /** Bytes of video memory (encoded in 64 KiB units for VIDEO_TYPE_VLFB). */
  readonly lfbSize: number;
  readonly lfbWidth: number;
  readonly lfbHeight: number;
  /** Bits per pixel. */
  readonly lfbDepth: number;
  /** Bytes per scan line. */
  readonly lfbLineLength: number;
  readonly red: ColorField;
  readonly green: ColorField;
  readonly blue: ColorField;
  /** The unused ("X") byte of XRGB8888. */
  readonly rsvd: ColorField;
  /** Extra capability bits (VIDEO_CAPABILITY_64BIT_BASE is added when the base needs it). */
  readonly capabilities?: number;
}

// Offsets inside struct screen_info.
const ORIG_VIDEO_IS_VGA = 0x0f;
const LFB_WIDTH = 0x12;
const LFB_HEIGHT = 0x14;
const LFB_DEPTH = 0x16;
const LFB_BASE = 0x18;
const LFB_SIZE = 0x1c;
const LFB_LINELENGTH = 0x24;
const RED_SIZE = 0x26;
const PAGES = 0x32;
const CAPABILITIES = 0x36;
const EXT_LFB_BASE = 0x3a;

function u16(name: string, v: number): number {
  if (!Number.isInteger(v) || v < 0 || v > 0xffff) throw new ScreenInfoError("SCREEN_INFO_RANGE", `screen_info.${name} ${v} does not fit 16 bits`, { [name]: v });
  return v;
}

function u8(name: string, v: number): number {
  if (!Number.isInteger(v) || v < 0 || v > 0xff) throw new ScreenInfoError("SCREEN_INFO_RANGE", `screen_info.${name} ${v} does not fit 8 bits`, { [name]: v });
  return v;
}

/** The 0x40 bytes of struct screen_info for `si` (every other field zero: no text mode, no VBE PMI). */
export function encodeScreenInfo(si: ScreenInfo): Uint8Array {
  const out = new Uint8Array(SCREEN_INFO_SIZE);
  const dv = new DataView(out.buffer);
  if (!Number.isSafeInteger(si.lfbBase) || si.lfbBase < 0 || si.lfbBase >= 2 ** 64)
    throw new ScreenInfoError("SCREEN_INFO_RANGE", `framebuffer base ${si.lfbBase} is not a 64-bit address`, { lfbBase: si.lfbBase });
  const vesa = si.videoType === VIDEO_TYPE.vesaLfb;
  const sizeField = vesa ? Math.ceil(si.lfbSize / 0x10000) : si.lfbSize;
  if (!Number.isSafeInteger(si.lfbSize) || si.lfbSize <= 0 || sizeField > 0xffff_ffff)
    throw new ScreenInfoError("SCREEN_INFO_RANGE", `framebuffer size ${si.lfbSize} does not fit screen_info.lfb_size`, { lfbSize: si.lfbSize });
  const high = Math.floor(si.lfbBase / 2 ** 32);
  let capabilities = si.capabilities ?? 0;
  if (high !== 0) capabilities |= VIDEO_CAPABILITY.base64;

  out[ORIG_VIDEO_IS_VGA] = u8("orig_video_isVGA", si.videoType);
  dv.setUint16(LFB_WIDTH, u16("lfb_width", si.lfbWidth), true);
  dv.setUint16(LFB_HEIGHT, u16("lfb_height", si.lfbHeight), true);
  dv.setUint16(LFB_DEPTH, u16("lfb_depth", si.lfbDepth), true);
  dv.setUint32(LFB_BASE, si.lfbBase % 2 ** 32, true);
  dv.setUint32(LFB_SIZE, sizeField, true);
  dv.setUint16(LFB_LINELENGTH, u16("lfb_linelength", si.lfbLineLength), true);
  const fields = [si.red, si.green, si.blue, si.rsvd];
  fields.forEach((f, i) => {
    out[RED_SIZE + 2 * i] = u8("color size", f.size);
    out[RED_SIZE + 2 * i + 1] = u8("color pos", f.pos);
  });
  dv.setUint16(PAGES, 1, true);
  dv.setUint32(CAPABILITIES, capabilities >>> 0, true);
  dv.setUint32(EXT_LFB_BASE, high, true);
  return out;
}
