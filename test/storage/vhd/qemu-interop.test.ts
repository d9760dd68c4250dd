/**
 * Interop with QEMU's vpc driver (qemu-img / qemu-io 7.2 as an independent
 * oracle), both directions. Always `-f vpc`. Skipped when qemu-img is absent.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { createDisk, openDisk } from "../../../src/storage/open.js";
import { vhdDriver } from "../../../src/storage/vhd/index.js";

const MiB = 1024 * 1024;

function have(cmd: string): boolean {
  try {
    execFileSync(cmd, ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}
const skip = have("qemu-img") && have("qemu-io") ? false : "qemu-img/qemu-io not installed";

function qemu(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: "utf8" });
}

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "partis-vhd-qemu-"));
}

/** A raw reference of `size` bytes with a few patterned ranges. */
function pattern(size: number): { ranges: [number, number, number][]; raw: Uint8Array } {
  const ranges: [number, number, number][] = [
    [0, 4096, 0x11],
    [MiB - 512, 3 * MiB + 1024, 0x5a],
    [size - 1536, 1536, 0xe7],
  ];
  const raw = new Uint8Array(size);
  for (const [o, l, v] of ranges) raw.fill(v, o, o + l);
  return { ranges, raw };
}

for (const subformat of ["fixed", "dynamic"] as const) {
  test(`qemu-img creates ${subformat}, qemu-io writes, Partis reads identical content`, { skip }, () => {
    const dir = tmpDir();
    const p = path.join(dir, "q.vhd");
    // A size qemu can represent exactly in CHS (it rounds up otherwise).
    const size = 16 * MiB - 64 * 512; // arbitrary; read back what qemu reports
    qemu("qemu-img", ["create", "-q", "-f", "vpc", "-o", `subformat=${subformat}`, p, String(size)]);
    const info = JSON.parse(qemu("qemu-img", ["info", "-f", "vpc", "--output=json", p])) as { "virtual-size": number };
    const vsize = info["virtual-size"];
    const { ranges, raw } = pattern(vsize);
    for (const [o, l, v] of ranges) qemu("qemu-io", ["-f", "vpc", "-c", `write -P 0x${v.toString(16)} ${o} ${l}`, p]);
    const d = openDisk(p, { readOnly: true });
    assert.equal(d.format, "vhd");
    assert.equal(d.type, subformat);
    assert.equal(d.size, vsize, "Partis and qemu-img disagree on the virtual size");
    const back = new Uint8Array(vsize);
    d.read(0, back);
    d.close();
    assert.ok(Buffer.from(back).equals(Buffer.from(raw)));
    // And Partis can keep writing to qemu's image, which qemu still reads.
    const w = openDisk(p);
    w.write(5 * MiB + 3, new Uint8Array(700).fill(0x42));
    raw.fill(0x42, 5 * MiB + 3, 5 * MiB + 703);
    w.close();
    const ref = path.join(dir, "ref.raw");
    fs.writeFileSync(ref, raw);
    qemu("qemu-img", ["compare", "-q", "-f", "vpc", "-F", "raw", p, ref]);
    assert.ok(vhdDriver.check(p).every((f) => f.severity !== "error"), JSON.stringify(vhdDriver.check(p)));
    fs.rmSync(dir, { recursive: true });
  });

  test(`Partis creates ${subformat}, qemu-img reads identical content and the exact size`, { skip }, () => {
    const dir = tmpDir();
    const p = path.join(dir, "p.vhd");
    const size = 10 * MiB + 3 * 512; // not CHS-exact: needs creator "win "
    createDisk(p, "vhd", { type: subformat, size });
    const { ranges, raw } = pattern(size);
    const d = openDisk(p);
    for (const [o, l, v] of ranges) d.write(o, new Uint8Array(l).fill(v));
    d.close();
    const info = JSON.parse(qemu("qemu-img", ["info", "-f", "vpc", "--output=json", p])) as { "virtual-size": number; format: string };
    assert.equal(info["virtual-size"], size);
    const ref = path.join(dir, "ref.raw");
    fs.writeFileSync(ref, raw);
    qemu("qemu-img", ["compare", "-q", "-f", "vpc", "-F", "raw", p, ref]);
    const out = path.join(dir, "out.raw");
    qemu("qemu-img", ["convert", "-f", "vpc", "-O", "raw", p, out]);
    assert.ok(fs.readFileSync(out).equals(Buffer.from(raw)));
    // qemu writes into our image; we read its write.
    qemu("qemu-io", ["-f", "vpc", "-c", "write -P 0x77 8M 4k", p]);
    raw.fill(0x77, 8 * MiB, 8 * MiB + 4096);
    const r = openDisk(p, { readOnly: true });
    const back = new Uint8Array(size);
    r.read(0, back);
    r.close();
    assert.ok(Buffer.from(back).equals(Buffer.from(raw)));
    fs.rmSync(dir, { recursive: true });
  });
}

test("qemu-img convert to vpc with force_size: Partis reads the exact size", { skip }, () => {
  const dir = tmpDir();
  const src = path.join(dir, "src.raw");
  const size = 7 * MiB + 512;
  const { raw } = pattern(size);
  fs.writeFileSync(src, raw);
  const p = path.join(dir, "c.vhd");
  qemu("qemu-img", ["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", src, p]);
  const d = openDisk(p, { readOnly: true });
  assert.equal(d.size, size);
  const back = new Uint8Array(size);
  d.read(0, back);
  d.close();
  assert.ok(Buffer.from(back).equals(Buffer.from(raw)));
  fs.rmSync(dir, { recursive: true });
});
