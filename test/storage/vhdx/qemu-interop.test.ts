/**
 * Interop with QEMU 7.2 (an independent implementation) in both directions.
 * Skipped when qemu-img/qemu-io are not installed.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as nodePath from "node:path";
import { test } from "node:test";
import { vhdxDriver, VhdxDisk } from "../../../src/storage/vhdx/index.js";
import { MiB, QEMU, rng, run, tempDir } from "./fixtures.js";

const dir = tempDir("qemu");
const skip = QEMU ? false : "qemu-img/qemu-io not installed";

function readAll(path: string): Buffer {
  const d = VhdxDisk.open(path, { readOnly: true });
  try {
    const b = Buffer.alloc(d.size);
    d.read(0, b);
    return b;
  } finally {
    d.close();
  }
}

for (const subformat of ["fixed", "dynamic"] as const) {
  test(`QEMU-made ${subformat} image reads identically in Partis`, { skip }, () => {
    const p = nodePath.join(dir, `q-${subformat}.vhdx`);
    run("qemu-img", ["create", "-q", "-f", "vhdx", "-o", `subformat=${subformat},block_size=1M`, p, "12M"]);
    const writes = [
      "write -P 0x11 0 4k", "write -P 0x22 1536k 700k", "write -P 0x33 5M 3M", "write -P 0x44 12287k 1k", "write -z 6M 512k",
    ];
    run("qemu-io", ["-f", "vhdx", ...writes.flatMap((w) => ["-c", w]), p]);
    const raw = nodePath.join(dir, `q-${subformat}.raw`);
    run("qemu-img", ["convert", "-f", "vhdx", "-O", "raw", p, raw]);
    assert.ok(readAll(p).equals(fs.readFileSync(raw)));
    assert.deepEqual(vhdxDriver.check(p).filter((f) => f.severity === "error"), []);
    // And Partis writes into the QEMU image stay readable by QEMU.
    const d = VhdxDisk.open(p);
    d.write(3 * MiB + 17, Buffer.alloc(5000, 0x55));
    d.close();
    run("qemu-img", ["check", "-f", "vhdx", p]);
    const raw2 = nodePath.join(dir, `q-${subformat}-2.raw`);
    run("qemu-img", ["convert", "-f", "vhdx", "-O", "raw", p, raw2]);
    assert.ok(readAll(p).equals(fs.readFileSync(raw2)));
  });
}

for (const type of ["fixed", "dynamic"] as const) {
  test(`Partis-made ${type} image passes qemu-img check and compare`, { skip }, () => {
    const p = nodePath.join(dir, `p-${type}.vhdx`);
    const size = 20 * MiB;
    vhdxDriver.create(p, { type, size, blockSize: MiB, logicalSectorSize: 512 });
    const ref = Buffer.alloc(size);
    const d = VhdxDisk.open(p);
    const r = rng(7);
    for (let i = 0; i < 40; i++) {
      const len = 1 + Math.floor(r() * 300000);
      const off = Math.floor(r() * (size - len));
      const data = Buffer.alloc(len, (i * 13 + 1) & 0xff);
      d.write(off, data);
      data.copy(ref, off);
    }
    d.close();
    const refPath = nodePath.join(dir, `p-${type}.raw`);
    fs.writeFileSync(refPath, ref);
    run("qemu-img", ["check", "-f", "vhdx", p]);
    run("qemu-img", ["compare", "-f", "vhdx", "-F", "raw", p, refPath]);
    const info = JSON.parse(run("qemu-img", ["info", "--output=json", p])) as { "virtual-size": number; format: string };
    assert.equal(info["virtual-size"], size);
  });
}
