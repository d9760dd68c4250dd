/**
 * VHD parent locators (regression for fuzz case 8472, seed 20240601): a
 * dynamic disk's locator entries are ignored, so a junk one (with a valid
 * header checksum) cannot move where the next block goes; a differencing
 * disk's locators are validated and a bad one is refused naming the file and
 * the locator index.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { DiskError } from "../../../src/storage/block-device.js";
import { createDisk, openDisk } from "../../../src/storage/open.js";
import { vhdDriver } from "../../../src/storage/vhd/index.js";
import {
  DYNAMIC_HEADER_SIZE,
  FOOTER_SIZE,
  PLATFORM_W2KU,
  SECTOR,
  bitmapBytes,
  decodeDynamicHeader,
  decodeFooter,
  encodeDynamicHeader,
  type ParentLocatorEntry,
} from "../../../src/storage/vhd/spec.js";

const KiB = 1024;
const MiB = 1024 * KiB;
/** Data of a new block starts on a 4 KiB boundary (VhdDisk's DATA_ALIGNMENT). */
const DATA_ALIGNMENT = 4096;

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "partis-vhd-loc-"));
}

/** Replace parent locator `index` of the dynamic header, re-sealing the header checksum. */
function setLocator(file: string, index: number, entry: ParentLocatorEntry): void {
  const fd = fs.openSync(file, "r+");
  try {
    const footerBytes = new Uint8Array(FOOTER_SIZE);
    fs.readSync(fd, footerBytes, 0, FOOTER_SIZE, 0);
    const footer = decodeFooter(footerBytes);
    assert.ok(footer.ok);
    const at = footer.value.dataOffset;
    const raw = new Uint8Array(DYNAMIC_HEADER_SIZE);
    fs.readSync(fd, raw, 0, DYNAMIC_HEADER_SIZE, at);
    const h = decodeDynamicHeader(raw);
    assert.ok(h.ok);
    const locators = [...h.value.parentLocators];
    locators[index] = entry;
    const sealed = encodeDynamicHeader({ ...h.value, parentLocators: locators });
    assert.ok(decodeDynamicHeader(sealed).ok, "the crafted header has a valid checksum");
    fs.writeSync(fd, sealed, 0, sealed.length, at);
  } finally {
    fs.closeSync(fd);
  }
}

const JUNK_LOCATORS: [string, ParentLocatorEntry][] = [
  // ~1.8 TB offset, huge space and length (what the fuzzer produced, roughly).
  ["far offset", { platformCode: PLATFORM_W2KU, platformDataSpace: 0xffffffff, platformDataLength: 0x7fffffff, platformDataOffset: 0x1a0_0000_0000 }],
  // 1 GB away, plausible-looking sizes.
  ["1 GB offset", { platformCode: PLATFORM_W2KU, platformDataSpace: 1, platformDataLength: 200, platformDataOffset: 1024 * MiB }],
  // Unknown platform code with a big data space.
  ["junk code", { platformCode: 0xdeadbeef, platformDataSpace: 0x00ffffff, platformDataLength: 12, platformDataOffset: 4096 }],
];

for (const [name, entry] of JUNK_LOCATORS) {
  test(`dynamic disk with a junk parent locator (${name}): a 4 KiB write grows the file by at most one block`, () => {
    const dir = tmpDir();
    try {
      const p = path.join(dir, "d.vhd");
      const blockSize = 512 * KiB;
      createDisk(p, "vhd", { type: "dynamic", size: 4 * MiB, blockSize });
      setLocator(p, 0, entry);
      const before = fs.statSync(p).size;

      const d = openDisk(p);
      const data = new Uint8Array(4 * KiB).map((_, i) => (i * 7 + 3) & 0xff);
      d.write(MiB + 512, data);
      d.close();

      const after = fs.statSync(p).size;
      // One block, its sector bitmap and the (moved) footer, plus at most the
      // padding that puts the block's data on a 4 KiB boundary.
      const limit = blockSize + bitmapBytes(blockSize) + FOOTER_SIZE + (DATA_ALIGNMENT - SECTOR);
      assert.ok(after - before <= limit, `file grew ${before} -> ${after} (${after - before} bytes; at most ${limit} allowed)`);
      assert.ok(after > before, "the write allocated a block");

      const r = openDisk(p, { readOnly: true });
      const back = new Uint8Array(data.length);
      r.read(MiB + 512, back);
      const zeros = new Uint8Array(512);
      r.read(MiB, zeros);
      r.close();
      assert.ok(Buffer.from(back).equals(Buffer.from(data)), "data reads back");
      assert.ok(zeros.every((b) => b === 0), "the rest of the block reads as zeros");
      assert.equal(vhdDriver.describe(p).type, "dynamic");
      assert.equal(vhdDriver.describe(p).parentLocators, undefined);
      const findings = vhdDriver.check(p);
      assert.deepEqual(
        findings.map((f) => f.severity),
        ["warning"],
        JSON.stringify(findings),
      );
      assert.match(findings[0]!.message, /parent locator 0 .*ignored/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
}

test("differencing disk: each kind of invalid parent locator is refused naming the file and the locator index", () => {
  const dir = tmpDir();
  try {
    const base = path.join(dir, "base.vhd");
    createDisk(base, "vhd", { type: "dynamic", size: 4 * MiB, blockSize: 512 * KiB });
    const pristine = path.join(dir, "child.pristine.vhd");
    createDisk(pristine, "vhd", { type: "differencing", parentPath: base });
    // A valid child opens, writes and checks clean.
    const ok = path.join(dir, "ok.vhd");
    fs.copyFileSync(pristine, ok);
    const d = openDisk(ok);
    d.write(0, new Uint8Array(4 * KiB).fill(9));
    d.close();
    assert.deepEqual(vhdDriver.check(ok), []);

    const size = fs.statSync(pristine).size;
    const cases: [string, ParentLocatorEntry, RegExp][] = [
      ["unknown platform code", { platformCode: 0x41414141, platformDataSpace: 1, platformDataLength: 8, platformDataOffset: 2560 }, /unknown platform code/],
      ["far offset", { platformCode: PLATFORM_W2KU, platformDataSpace: 1, platformDataLength: 8, platformDataOffset: 0x1a0_0000_0000 }, /not inside the file/],
      ["space past the end", { platformCode: PLATFORM_W2KU, platformDataSpace: 0xffffff, platformDataLength: 8, platformDataOffset: 2560 }, /not inside the file/],
      ["length beyond space", { platformCode: PLATFORM_W2KU, platformDataSpace: 1, platformDataLength: 4096, platformDataOffset: 2560 }, /exceeds its data space/],
      ["over the end footer", { platformCode: PLATFORM_W2KU, platformDataSpace: 1, platformDataLength: 8, platformDataOffset: size - FOOTER_SIZE }, /not inside the file/],
      ["over the header", { platformCode: PLATFORM_W2KU, platformDataSpace: 1, platformDataLength: 8, platformDataOffset: 1024 }, /overlaps the dynamic header/],
      ["over the BAT", { platformCode: PLATFORM_W2KU, platformDataSpace: 1, platformDataLength: 8, platformDataOffset: 1536 }, /overlaps the BAT/],
      ["over the footer copy", { platformCode: PLATFORM_W2KU, platformDataSpace: 1, platformDataLength: 8, platformDataOffset: 0 }, /overlaps the footer copy/],
    ];
    for (const [name, entry, why] of cases) {
      const p = path.join(dir, `child-${name.replace(/ /g, "-")}.vhd`);
      fs.copyFileSync(pristine, p);
      setLocator(p, 1, entry);
      const bytes = fs.readFileSync(p);
      const matches = (e: unknown): boolean =>
        e instanceof DiskError && e.code === "VHD_BAD_LOCATOR" && e.message.includes(p) && /parent locator 1\b/.test(e.message) && why.test(e.message);
      assert.throws(() => openDisk(p), matches, name);
      assert.throws(() => openDisk(p, { readOnly: true }), matches, name);
      assert.throws(() => vhdDriver.describe(p), matches, name);
      const findings = vhdDriver.check(p);
      assert.equal(findings.length, 1, name);
      assert.equal(findings[0]!.severity, "error", name);
      assert.match(findings[0]!.message, /parent locator 1\b/, name);
      assert.ok(fs.readFileSync(p).equals(bytes), `${name}: the file is unchanged`);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
