/**
 * IDENTIFY DEVICE (ATA-7 section 6.17, table 26) and IDENTIFY PACKET DEVICE
 * (ATA-7 6.18, table 28) data: 256 little-endian words with ASCII strings
 * stored two characters a word, first character in the high byte (ATA-7
 * 6.17.11), and the integrity word 255 (signature A5h plus a checksum byte
 * that makes the 512 bytes sum to zero).
 *
 * What the words advertise is what the models implement: LBA28 and LBA48,
 * PIO modes 3-4, multiword DMA 0-2, Ultra DMA 0-5 (the drive's side; ata_piix
 * limits a PIIX3 to MWDMA2 itself), write cache, FLUSH CACHE (EXT), power
 * management, READ/WRITE MULTIPLE up to 16 sectors a block.
 */

/** Transfer mode settings a device reports back in words 63 and 88. */
export interface TransferModes {
  /** Selected multiword DMA mode, or -1. */
  readonly mwdma: number;
  /** Selected Ultra DMA mode, or -1. */
  readonly udma: number;
}

export interface AtaIdentity {
  readonly model: string;
  readonly serial: string;
  readonly firmware: string;
  /** Device 0 or 1 (word 93 reset results). */
  readonly unit: 0 | 1;
}

export interface DiskIdentifyState extends TransferModes {
  /** Capacity in 512-byte sectors. */
  readonly sectors: number;
  readonly physicalSectorSize: number;
  /** Current READ/WRITE MULTIPLE block size in sectors (0 = disabled). */
  readonly multiCount: number;
  readonly writeCache: boolean;
  readonly lookAhead: boolean;
  /** Current CHS translation (INITIALIZE DEVICE PARAMETERS). */
  readonly heads: number;
  readonly sectorsPerTrack: number;
}

export const MAX_MULTIPLE = 16;
/** Default translation: 16 heads, 63 sectors a track. */
export const DEFAULT_HEADS = 16;
export const DEFAULT_SPT = 63;

function putWord(out: Uint8Array, word: number, value: number): void {
  out[word * 2] = value & 0xff;
  out[word * 2 + 1] = (value >>> 8) & 0xff;
}

/** ASCII string, space padded, two characters a word with the first in the high byte. */
function putString(out: Uint8Array, firstWord: number, words: number, text: string): void {
  for (let i = 0; i < words * 2; i++) {
    const c = i < text.length ? text.charCodeAt(i) : 0x20;
    const ch = c >= 0x20 && c < 0x7f ? c : 0x20;
    // Byte 2k of the word pair is the high byte of word k.
    out[(firstWord + (i >> 1)) * 2 + ((i & 1) === 0 ? 1 : 0)] = ch;
  }
}

function putChecksum(out: Uint8Array): void {
  out[510] = 0xa5;
  let sum = 0;
  for (let i = 0; i < 511; i++) sum = (sum + out[i]!) & 0xff;
  out[511] = (0x100 - sum) & 0xff;
}

function resetResults(unit: 0 | 1): number {
  // Bit 14 set, bit 13 80-conductor cable detected; device 0: bits 0-3 (jumper, diagnostics passed); device 1: bits 8-9.
  return unit === 0 ? 0x600b : 0x6300;
}

function dmaWords(out: Uint8Array, modes: TransferModes): void {
  putWord(out, 63, 0x0007 | (modes.mwdma >= 0 ? 0x100 << modes.mwdma : 0));
  putWord(out, 64, 0x0003); // PIO 3 and 4
  putWord(out, 65, 120); // minimum MWDMA cycle (ns)
  putWord(out, 66, 120); // recommended MWDMA cycle
  putWord(out, 67, 120); // minimum PIO cycle without flow control
  putWord(out, 68, 120); // minimum PIO cycle with IORDY
  putWord(out, 88, 0x003f | (modes.udma >= 0 ? 0x100 << modes.udma : 0));
}

/** IDENTIFY DEVICE data for an ATA disk, into out[0, 512). */
export function buildIdentifyDevice(out: Uint8Array, id: AtaIdentity, s: DiskIdentifyState): void {
  out.fill(0, 0, 512);
  const total = s.sectors;
  const defaultCyl = Math.max(1, Math.min(16383, Math.floor(total / (DEFAULT_HEADS * DEFAULT_SPT))));
  putWord(out, 0, 0x0040); // fixed device
  putWord(out, 1, defaultCyl);
  putWord(out, 3, DEFAULT_HEADS);
  putWord(out, 6, DEFAULT_SPT);
  putString(out, 10, 10, id.serial);
  putString(out, 23, 4, id.firmware);
  putString(out, 27, 20, id.model);
  putWord(out, 47, 0x8000 | MAX_MULTIPLE);
  putWord(out, 49, 0x0b00); // IORDY supported, LBA, DMA
  putWord(out, 50, 0x4000);
  putWord(out, 51, 0x0200); // obsolete PIO timing
  putWord(out, 53, 0x0007); // words 54-58, 64-70 and 88 valid
  const curCyl = Math.max(0, Math.min(65535, Math.floor(total / (s.heads * s.sectorsPerTrack))));
  const curCap = Math.min(0xffff_ffff, curCyl * s.heads * s.sectorsPerTrack);
  putWord(out, 54, curCyl);
  putWord(out, 55, s.heads);
  putWord(out, 56, s.sectorsPerTrack);
  putWord(out, 57, curCap & 0xffff);
  putWord(out, 58, Math.floor(curCap / 65536) & 0xffff);
  putWord(out, 59, s.multiCount > 0 ? 0x0100 | s.multiCount : 0);
  const lba28 = Math.min(total, 0x0fff_ffff);
  putWord(out, 60, lba28 & 0xffff);
  putWord(out, 61, Math.floor(lba28 / 65536) & 0xffff);
  dmaWords(out, s);
  putWord(out, 80, 0x00f0); // ATA/ATAPI-4 to -7
  putWord(out, 81, 0x0000);
  // Words 82-87: command sets supported / enabled.
  putWord(out, 82, 0x0068); // look-ahead, write cache, power management
  putWord(out, 83, 0x7400); // valid, FLUSH CACHE EXT, FLUSH CACHE, 48-bit
  putWord(out, 84, 0x4000);
  putWord(out, 85, 0x0008 | (s.writeCache ? 0x0020 : 0) | (s.lookAhead ? 0x0040 : 0));
  putWord(out, 86, 0x3400);
  putWord(out, 87, 0x4000);
  putWord(out, 93, resetResults(id.unit));
  for (let i = 0; i < 4; i++) putWord(out, 100 + i, Math.floor(total / 2 ** (16 * i)) & 0xffff);
  if (s.physicalSectorSize > 512 && (s.physicalSectorSize & (s.physicalSectorSize - 1)) === 0) {
    const log2 = Math.min(15, Math.round(Math.log2(s.physicalSectorSize / 512)));
    putWord(out, 106, 0x6000 | log2);
  } else putWord(out, 106, 0x4000);
  putChecksum(out);
}

/** IDENTIFY PACKET DEVICE data for an ATAPI CD/DVD-ROM, into out[0, 512). */
export function buildIdentifyPacket(out: Uint8Array, id: AtaIdentity, modes: TransferModes): void {
  out.fill(0, 0, 512);
  // ATAPI, CD-ROM command set (05h), removable, accelerated DRQ (50 us), 12-byte packets.
  putWord(out, 0, 0x85c0);
  putString(out, 10, 10, id.serial);
  putString(out, 23, 4, id.firmware);
  putString(out, 27, 20, id.model);
  putWord(out, 49, 0x0b00); // IORDY supported, LBA, DMA
  putWord(out, 50, 0x4000);
  putWord(out, 53, 0x0006); // words 64-70 and 88 valid
  dmaWords(out, modes);
  putWord(out, 71, 30); // typical PACKET to bus release (ns)
  putWord(out, 72, 30); // typical SERVICE to BSY cleared
  putWord(out, 80, 0x00f0);
  putWord(out, 82, 0x0210); // DEVICE RESET, PACKET
  putWord(out, 83, 0x4000);
  putWord(out, 84, 0x4000);
  putWord(out, 85, 0x0210);
  putWord(out, 86, 0x0000);
  putWord(out, 87, 0x4000);
  putWord(out, 93, resetResults(id.unit));
  putChecksum(out);
}
