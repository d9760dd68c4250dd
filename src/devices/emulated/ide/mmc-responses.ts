/**
 * Data-in responses of the ATAPI CD/DVD-ROM, built into a caller's buffer
 * (each function returns the full response length; the caller truncates it to
 * the CDB's allocation length):
 *
 * - standard INQUIRY and the VPD pages 00h/80h (SPC-3 6.4);
 * - fixed-format sense data (SPC-3 4.5.3);
 * - MODE SENSE(10) with the read error recovery (01h), CD device parameters
 *   (0Dh), CD audio control (0Eh) and CD/DVD capabilities (2Ah, MMC-3 6.3.11)
 *   pages;
 * - READ TOC/PMA/ATIP formats 0 (TOC), 1 (session info) and 2 (full TOC),
 *   LBA or MSF (MMC-3 6.1.40), for a single-session, single-data-track disc;
 * - GET CONFIGURATION (MMC-3 5.2, 6.1.4) with the profile list, core, morphing,
 *   removable medium, random readable, CD read and DVD read features;
 * - GET EVENT STATUS NOTIFICATION media class (MMC-3 6.1.5), READ DISC
 *   INFORMATION (6.1.18), READ TRACK INFORMATION (6.1.26), MECHANISM STATUS.
 */

/** What the responses describe. */
export interface DiscState {
  /** A readable medium is loaded (tray closed). */
  readonly medium: boolean;
  readonly trayOpen: boolean;
  readonly locked: boolean;
  /** Capacity in 2048-byte blocks. */
  readonly blocks: number;
  /** Presented as a DVD-ROM (larger than a CD) rather than a CD-ROM. */
  readonly dvd: boolean;
}

export const PROFILE_CD_ROM = 0x0008;
export const PROFILE_DVD_ROM = 0x0010;
/** Blocks in an 80-minute CD; larger images are presented as DVDs. */
export const CD_MAX_BLOCKS = 80 * 60 * 75;

function be16(b: Uint8Array, at: number, v: number): void {
  b[at] = (v >>> 8) & 0xff;
  b[at + 1] = v & 0xff;
}

function be32(b: Uint8Array, at: number, v: number): void {
  b[at] = (v >>> 24) & 0xff;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

function ascii(b: Uint8Array, at: number, length: number, text: string): void {
  for (let i = 0; i < length; i++) {
    const c = i < text.length ? text.charCodeAt(i) : 0x20;
    b[at + i] = c >= 0x20 && c < 0x7f ? c : 0x20;
  }
}

/** An address as LBA or as MSF (with the 2-second lead-in offset) in 4 bytes. */
function address(b: Uint8Array, at: number, lba: number, msf: boolean): void {
  if (!msf) return be32(b, at, lba >>> 0);
  const f = lba + 150;
  b[at] = 0;
  b[at + 1] = Math.min(0xff, Math.floor(f / (75 * 60)));
  b[at + 2] = Math.floor(f / 75) % 60;
  b[at + 3] = f % 75;
}

export function inquiryStandard(b: Uint8Array, vendor: string, product: string, revision: string): number {
  b.fill(0, 0, 36);
  b[0] = 0x05; // CD/DVD device
  b[1] = 0x80; // removable
  b[2] = 0x05; // SPC-3
  b[3] = 0x02; // response data format 2
  b[4] = 36 - 5;
  ascii(b, 8, 8, vendor);
  ascii(b, 16, 16, product);
  ascii(b, 32, 4, revision);
  return 36;
}

/** A VPD page, or -1 when the page is not supported. */
export function inquiryVpd(b: Uint8Array, page: number, serial: string): number {
  if (page === 0x00) {
    b.set([0x05, 0x00, 0x00, 0x02, 0x00, 0x80]);
    return 6;
  }
  if (page === 0x80) {
    const n = Math.min(serial.length, 32);
    b.set([0x05, 0x80, 0x00, n]);
    ascii(b, 4, n, serial);
    return 4 + n;
  }
  return -1;
}

/** Fixed-format sense data; `asc` is ASC << 8 | ASCQ. */
export function senseData(b: Uint8Array, key: number, asc: number): number {
  b.fill(0, 0, 18);
  b[0] = 0x70;
  b[2] = key & 0x0f;
  b[7] = 10;
  b[12] = (asc >>> 8) & 0xff;
  b[13] = asc & 0xff;
  return 18;
}

const PAGE_LENGTHS: Readonly<Record<number, number>> = { 0x01: 8, 0x0d: 8, 0x0e: 16, 0x2a: 22 };

/** One mode page at b[at]; `changeable` reports the (empty) changeable-bits mask. Returns its length. */
function modePage(b: Uint8Array, at: number, page: number, changeable: boolean, s: DiscState): number {
  const n = PAGE_LENGTHS[page]!;
  b.fill(0, at, at + n);
  b[at] = page;
  b[at + 1] = n - 2;
  if (changeable) return n;
  switch (page) {
    case 0x01: // read error recovery
      b[at + 3] = 5; // read retry count
      break;
    case 0x0d: // CD device parameters
      be16(b, at + 4, 60); // S units per M
      be16(b, at + 6, 75); // F units per S
      break;
    case 0x0e: // CD audio control
      b[at + 2] = 0x04; // Immed
      b[at + 8] = 0x01; // port 0: channel 0
      b[at + 9] = 0xff;
      b[at + 10] = 0x02; // port 1: channel 1
      b[at + 11] = 0xff;
      break;
    case 0x2a: // CD/DVD capabilities and mechanical status
      b[at + 2] = 0x3b; // reads CD-R, CD-RW, method 2, DVD-ROM, DVD-R
      b[at + 3] = 0x00; // writes nothing
      b[at + 4] = 0x71; // audio play, mode 2 form 1 and 2, multisession
      b[at + 5] = 0x00;
      b[at + 6] = 0x29 | (s.locked ? 0x02 : 0); // tray, eject, lock (and its state)
      b[at + 7] = 0x00;
      be16(b, at + 8, 176 * 24); // maximum read speed (KB/s, obsolete)
      be16(b, at + 10, 256); // volume levels
      be16(b, at + 12, 512); // buffer size (KB)
      be16(b, at + 14, 176 * 24); // current read speed
      break;
  }
  return n;
}

/**
 * MODE SENSE(10) data for page `page` (3Fh = all) and page control `pc`
 * (0 current, 1 changeable, 2 default). Returns -1 for an unknown page.
 */
export function modeSense10(b: Uint8Array, page: number, pc: number, s: DiscState): number {
  b.fill(0, 0, 8);
  let n = 8;
  const pages = page === 0x3f ? [0x01, 0x0d, 0x0e, 0x2a] : PAGE_LENGTHS[page] !== undefined ? [page] : undefined;
  if (pages === undefined) return -1;
  for (const p of pages) n += modePage(b, n, p, pc === 1, s);
  be16(b, 0, n - 2);
  return n;
}

/** READ TOC formats 0-2; returns -1 for an invalid format or starting track. */
export function readToc(b: Uint8Array, format: number, msf: boolean, track: number, s: DiscState): number {
  switch (format) {
    case 0: {
      if (track > 1 && track !== 0xaa) return -1;
      let n = 4;
      if (track <= 1) {
        b.fill(0, n, n + 8);
        b[n + 1] = 0x14; // ADR 1, data track
        b[n + 2] = 1;
        address(b, n + 4, 0, msf);
        n += 8;
      }
      b.fill(0, n, n + 8);
      b[n + 1] = 0x14;
      b[n + 2] = 0xaa; // lead-out
      address(b, n + 4, s.blocks, msf);
      n += 8;
      be16(b, 0, n - 2);
      b[2] = 1;
      b[3] = 1;
      return n;
    }
    case 1: {
      b.fill(0, 0, 12);
      be16(b, 0, 10);
      b[2] = 1; // first session
      b[3] = 1; // last session
      b[5] = 0x14;
      b[6] = 1; // first track in the last session
      address(b, 8, 0, msf);
      return 12;
    }
    case 2: {
      // Full TOC: A0 (first track), A1 (last track), A2 (lead-out), track 1.
      let n = 4;
      const entry = (point: number, pmin: number, psec: number, pframe: number): void => {
        b.fill(0, n, n + 11);
        b[n] = 1; // session
        b[n + 1] = 0x14;
        b[n + 3] = point;
        b[n + 8] = pmin;
        b[n + 9] = psec;
        b[n + 10] = pframe;
        n += 11;
      };
      entry(0xa0, 1, 0x00, 0);
      entry(0xa1, 1, 0, 0);
      const f = s.blocks + 150;
      entry(0xa2, Math.min(0xff, Math.floor(f / 4500)), Math.floor(f / 75) % 60, f % 75);
      entry(1, 0, 2, 0);
      be16(b, 0, n - 2);
      b[2] = 1;
      b[3] = 1;
      return n;
    }
    default:
      return -1;
  }
}

/** GET CONFIGURATION for request type `rt` (0 all, 1 current, 2 one) from feature `start`. */
export function getConfiguration(b: Uint8Array, rt: number, start: number, s: DiscState): number {
  const profile = !s.medium ? 0 : s.dvd ? PROFILE_DVD_ROM : PROFILE_CD_ROM;
  b.fill(0, 0, 8);
  be16(b, 6, profile);
  let n = 8;
  const feature = (code: number, version: number, persistent: boolean, current: boolean, body: readonly number[]): void => {
    if (rt === 2 ? code !== start : code < start) return;
    if (rt === 1 && !current) return;
    be16(b, n, code);
    b[n + 2] = (version << 2) | (persistent ? 0x02 : 0) | (current ? 0x01 : 0);
    b[n + 3] = body.length;
    for (let i = 0; i < body.length; i++) b[n + 4 + i] = body[i]!;
    n += 4 + body.length;
  };
  const dvd = s.medium && s.dvd;
  const cd = s.medium && !s.dvd;
  feature(0x0000, 0, true, true, [0x00, 0x10, dvd ? 1 : 0, 0, 0x00, 0x08, cd ? 1 : 0, 0]);
  feature(0x0001, 2, true, true, [0, 0, 0, 2, 0x01, 0, 0, 0]); // core: ATAPI, DBE
  feature(0x0002, 1, true, true, [0, 0, 0, 0]); // morphing (polling only)
  feature(0x0003, 0, true, true, [0x29, 0, 0, 0]); // removable medium: tray, eject, lock
  feature(0x0010, 0, false, s.medium, [0, 0, 0x08, 0x00, 0, s.dvd ? 16 : 1, 0, 0]); // random readable, 2048-byte blocks
  feature(0x001e, 2, false, cd, [0, 0, 0, 0]); // CD read
  feature(0x001f, 0, false, dvd, []); // DVD read
  be32(b, 0, n - 4);
  return n;
}

/** GET EVENT STATUS NOTIFICATION (polled) for the requested class mask; `event` is the media event code. */
export function eventStatus(b: Uint8Array, classes: number, event: number, s: DiscState): number {
  if ((classes & 0x10) === 0) {
    b.set([0x00, 0x02, 0x80, 0x10]); // no event available of the requested classes; media class supported
    return 4;
  }
  b.set([0x00, 0x06, 0x04, 0x10, event & 0x0f, (s.trayOpen ? 0x01 : 0) | (s.medium ? 0x02 : 0), 0, 0]);
  return 8;
}

export function discInformation(b: Uint8Array): number {
  b.fill(0, 0, 34);
  be16(b, 0, 32);
  b[2] = 0x0e; // last session complete, disc finalized
  b[3] = 1; // first track
  b[4] = 1; // sessions
  b[5] = 1; // first track in last session
  b[6] = 1; // last track in last session
  b[7] = 0x20; // unrestricted use
  be32(b, 16, 0xffff_ffff); // last session lead-in: none (finalized)
  be32(b, 20, 0xffff_ffff); // last possible lead-out: none
  return 34;
}

/** READ TRACK INFORMATION for the single data track; -1 when the address does not name it. */
export function trackInformation(b: Uint8Array, addressType: number, number: number, s: DiscState): number {
  const ok =
    (addressType === 0 && number < s.blocks) || (addressType === 1 && number === 1) || (addressType === 2 && number === 1);
  if (!ok) return -1;
  b.fill(0, 0, 36);
  be16(b, 0, 34);
  b[2] = 1; // track
  b[3] = 1; // session
  b[5] = 0x04; // data track, uninterrupted
  b[6] = 0x01; // data mode 1
  be32(b, 8, 0); // start
  be32(b, 24, s.blocks); // track size
  be32(b, 28, Math.max(0, s.blocks - 1)); // last recorded address
  return 36;
}

export function mechanismStatus(b: Uint8Array, s: DiscState): number {
  b.fill(0, 0, 8);
  b[1] = s.trayOpen ? 0x10 : 0x00;
  return 8;
}
