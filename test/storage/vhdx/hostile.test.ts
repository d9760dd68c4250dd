/**
 * Hostile and damaged files: every problem is a DiskError naming the file,
 * never a crash, a hang or a write outside the structures.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as nodePath from "node:path";
import { test } from "node:test";
import { DiskError } from "../../../src/storage/block-device.js";
import { guidFromString } from "../../../src/storage/vhdx/guid.js";
import { encodeHeader, decodeHeader } from "../../../src/storage/vhdx/header.js";
import { vhdxDriver, VhdxDisk } from "../../../src/storage/vhdx/index.js";
import { BAT_REGION_GUID, encodeRegionTable, METADATA_REGION_GUID } from "../../../src/storage/vhdx/region-table.js";
import { MiB, rng, tempDir } from "./fixtures.js";

const dir = tempDir("hostile");
let n = 0;

function fresh(): string {
  const p = nodePath.join(dir, `h${n++}.vhdx`);
  vhdxDriver.create(p, { type: "dynamic", size: 8 * MiB, blockSize: MiB });
  const d = VhdxDisk.open(p);
  d.write(0, Buffer.alloc(MiB, 1));
  d.close();
  return p;
}

function patch(p: string, off: number, bytes: Buffer): void {
  const fd = fs.openSync(p, "r+");
  fs.writeSync(fd, bytes, 0, bytes.length, off);
  fs.closeSync(fd);
}

function refuses(p: string, re: RegExp): void {
  assert.throws(() => VhdxDisk.open(p, { readOnly: true }).close(), (e: unknown) => e instanceof DiskError && e.message.includes(p) && re.test(e.message));
}

function regions(extra: { guid: Buffer; fileOffset: number; length: number; required: boolean }[], bat = 3 * MiB): Buffer {
  return encodeRegionTable([
    { guid: BAT_REGION_GUID, fileOffset: bat, length: MiB, required: true },
    { guid: METADATA_REGION_GUID, fileOffset: 2 * MiB, length: MiB, required: true },
    ...extra,
  ]);
}

test("unknown required region is refused", () => {
  const p = fresh();
  const t = regions([{ guid: guidFromString("11111111-2222-3333-4444-555555555555")!, fileOffset: 5 * MiB, length: MiB, required: true }]);
  patch(p, 192 * 1024, t);
  patch(p, 256 * 1024, t);
  refuses(p, /unknown region .* required/);
});

test("region overlapping the log, BAT past the end of the file", () => {
  const p = fresh();
  let t = regions([], MiB);
  patch(p, 192 * 1024, t);
  patch(p, 256 * 1024, t);
  refuses(p, /overlaps the log/);
  const q = fresh();
  t = regions([], 1000 * MiB);
  patch(q, 192 * 1024, t);
  patch(q, 256 * 1024, t);
  refuses(q, /past the end of the file/);
});

test("unknown required metadata item is refused; bad block size is refused", () => {
  const p = fresh();
  const entry = Buffer.alloc(32);
  guidFromString("99999999-2222-3333-4444-555555555555")!.copy(entry, 0);
  entry.writeUInt32LE(4, 24); // IsRequired, length 0
  patch(p, 2 * MiB + 32 + 5 * 32, entry);
  const count = Buffer.alloc(2);
  count.writeUInt16LE(6);
  patch(p, 2 * MiB + 10, count);
  refuses(p, /unknown metadata item .* required/);
  const q = fresh();
  const fp = Buffer.alloc(4);
  fp.writeUInt32LE(3 * MiB);
  patch(q, 2 * MiB + 64 * 1024, fp); // File Parameters is the first item
  refuses(q, /block size/);
});

test("BAT entries pointing past the end, into the header section, or at each other", () => {
  const e = (mb: number): Buffer => { const b = Buffer.alloc(8); b.writeUInt32LE(((mb % 4096) << 20 | 6) >>> 0, 0); b.writeUInt32LE(Math.floor(mb / 4096), 4); return b; };
  let p = fresh();
  patch(p, 3 * MiB + 8, e(4096 * 1024));
  refuses(p, /past the end of the file/);
  p = fresh();
  patch(p, 3 * MiB + 8, e(0));
  refuses(p, /header section/);
  p = fresh();
  patch(p, 3 * MiB + 8, e(2));
  refuses(p, /metadata region/);
  p = fresh();
  const first = Buffer.alloc(8);
  fs.readSync(fs.openSync(p, "r"), first, 0, 8, 3 * MiB);
  patch(p, 3 * MiB + 8, first);
  refuses(p, /overlap/);
  p = fresh();
  patch(p, 3 * MiB + 8, Buffer.from([7, 0, 0, 0, 0, 0, 0, 0]));
  refuses(p, /PARTIALLY_PRESENT/);
  assert.ok(vhdxDriver.check(p).some((f) => f.severity === "error" && /PARTIALLY_PRESENT/.test(f.message)));
});

/** A fresh image whose current header names `guid` as its LogGuid, over a log region of 0x61 bytes. */
function withLogGuid(guid: string): string {
  const p = fresh();
  const h = Buffer.alloc(4096);
  const fd = fs.openSync(p, "r");
  fs.readSync(fd, h, 0, 4096, 64 * 1024);
  const h2 = Buffer.alloc(4096);
  fs.readSync(fd, h2, 0, 4096, 128 * 1024);
  fs.closeSync(fd);
  const a = decodeHeader(h);
  const b = decodeHeader(h2);
  assert.ok(typeof a !== "string" && typeof b !== "string");
  const cur = a.sequenceNumber > b.sequenceNumber ? a : b;
  patch(p, 64 * 1024, encodeHeader({ ...cur, sequenceNumber: cur.sequenceNumber + 5n, logGuid: guidFromString(guid)! }));
  patch(p, MiB, Buffer.alloc(MiB, 0x61));
  return p;
}

test("LogGuid set over a log no entry was written to (a writer stopped before its first entry): nothing to replay; read-only opens leave the file alone, read-write clears it", () => {
  const p = withLogGuid("abababab-abab-abab-abab-abababababab");
  const before = fs.readFileSync(p);
  const findings = vhdxDriver.check(p);
  assert.ok(findings.some((f) => f.severity === "warning" && /no entry was written to/.test(f.message)), JSON.stringify(findings));
  assert.deepEqual(findings.filter((f) => f.severity === "error"), []);
  assert.equal(vhdxDriver.describe(p).logReplayNeeded, false);
  VhdxDisk.open(p, { readOnly: true }).close();
  assert.ok(fs.readFileSync(p).equals(before), "a read-only open writes nothing");
  VhdxDisk.open(p).close();
  assert.deepEqual(vhdxDriver.check(p), [], "the read-write open cleared the LogGuid");
});

test("LogGuid set over a damaged entry is refused (and check --repair clears it)", () => {
  const guid = "abababab-abab-abab-abab-abababababab";
  const p = withLogGuid(guid);
  // An entry header that carries the LogGuid, with a wrong checksum.
  const e = Buffer.alloc(64);
  e.writeUInt32LE(0x65676f6c, 0); // "loge"
  e.writeUInt32LE(4096, 8);
  e.writeBigUInt64LE(1n, 16);
  guidFromString(guid)!.copy(e, 32);
  patch(p, MiB, e);
  refuses(p, /no valid log sequence/);
  assert.ok(vhdxDriver.check(p, { repair: true }).some((f) => f.severity === "repaired"));
  const d = VhdxDisk.open(p, { readOnly: true });
  d.close();
});

test("not a VHDX, truncated file, out-of-range I/O", () => {
  const p = nodePath.join(dir, "junk.vhdx");
  fs.writeFileSync(p, Buffer.alloc(2 * MiB, 0x41));
  refuses(p, /not a VHDX/);
  const q = fresh();
  fs.truncateSync(q, 300 * 1024);
  refuses(q, /smaller than/);
  const r = fresh();
  const d = VhdxDisk.open(r);
  assert.throws(() => d.read(8 * MiB - 10, Buffer.alloc(11)), DiskError);
  assert.throws(() => d.write(-1, Buffer.alloc(1)), DiskError);
  d.close();
});

test("seeded fuzz of metadata, BAT and region bytes: DiskError or a working disk", () => {
  const base = fresh();
  const image = fs.readFileSync(base);
  const r = rng(99);
  const areas = [[2 * MiB, 2 * MiB + 64 * 1024 + 200], [3 * MiB, 3 * MiB + 64], [192 * 1024, 192 * 1024 + 128]];
  const p = nodePath.join(dir, "fuzz.vhdx");
  for (let i = 0; i < 150; i++) {
    const img = Buffer.from(image);
    for (let k = 0; k < 1 + Math.floor(r() * 4); k++) {
      const [s, e] = areas[Math.floor(r() * areas.length)]!;
      img[s! + Math.floor(r() * (e! - s!))] = Math.floor(r() * 256);
    }
    fs.writeFileSync(p, img);
    try {
      const d = VhdxDisk.open(p);
      const b = Buffer.alloc(64 * 1024);
      d.read(0, b);
      d.write(d.size - 4096, b.subarray(0, 4096));
      d.close();
    } catch (e) {
      assert.ok(e instanceof DiskError, `iteration ${i}: ${String(e)}`);
    }
    vhdxDriver.check(p);
  }
});
