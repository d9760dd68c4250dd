/**
 * Format detection by content, the create/describe front door, parent path
 * resolution and chain description.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { DiskError } from "../../src/storage/block-device.js";
import { createDisk, describeDisk, driverFor, openDisk, probeFormat } from "../../src/storage/open.js";
import { describeChain, resolveParentPath, verifyParent } from "../../src/storage/chain.js";

const MiB = 1024 * 1024;

function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "partis-open-"));
}

test("probe by content, not by name", () => {
  const dir = tmpDir();
  const fixed = path.join(dir, "disk.img"); // a VHD with a raw-looking name
  const dyn = path.join(dir, "disk.raw");
  const raw = path.join(dir, "disk.vhd"); // raw with a VHD-looking name
  createDisk(fixed, "vhd", { type: "fixed", size: MiB });
  createDisk(dyn, "vhd", { type: "dynamic", size: MiB });
  createDisk(raw, "raw", { type: "fixed", size: MiB });
  assert.equal(probeFormat(fixed), "vhd");
  assert.equal(probeFormat(dyn), "vhd");
  assert.equal(probeFormat(raw), "raw");
  const vhdxLike = path.join(dir, "x");
  const head = Buffer.alloc(MiB);
  head.write("vhdxfile", 0, "latin1");
  fs.writeFileSync(vhdxLike, head);
  const vhdx = driverFor("vhdx");
  assert.equal(probeFormat(vhdxLike), vhdx.probe(head.subarray(0, 65536), head.subarray(MiB - 65536), MiB) ? "vhdx" : "raw");
  for (const p of [fixed, dyn, raw]) {
    const d = openDisk(p);
    assert.equal(d.size, MiB);
    d.close();
  }
  assert.equal(describeDisk(fixed).type, "fixed");
  assert.equal(describeDisk(raw).type, "raw");
  assert.equal(driverFor("vhd").format, "vhd");
  fs.rmSync(dir, { recursive: true });
});

test("resolveParentPath: relative first (to the child's directory), then absolute, then the bare name", () => {
  const dir = tmpDir();
  fs.mkdirSync(path.join(dir, "a"));
  fs.writeFileSync(path.join(dir, "a", "p.vhd"), "");
  fs.writeFileSync(path.join(dir, "p.vhd"), "");
  const child = path.join(dir, "a", "c.vhd");
  assert.equal(resolveParentPath(child, [{ kind: "absolute", path: path.join(dir, "p.vhd") }, { kind: "relative", path: ".\\p.vhd" }]), path.join(dir, "a", "p.vhd"));
  assert.equal(resolveParentPath(child, [{ kind: "relative", path: "..\\p.vhd" }]), path.join(dir, "p.vhd"));
  assert.equal(resolveParentPath(child, [{ kind: "relative", path: "./gone.vhd" }, { kind: "absolute", path: path.join(dir, "p.vhd") }]), path.join(dir, "p.vhd"));
  assert.equal(resolveParentPath(child, [{ kind: "absolute", path: "C:\\VMs\\p.vhd" }]), path.join(dir, "a", "p.vhd"));
  assert.throws(
    () => resolveParentPath(child, [{ kind: "relative", path: ".\\nothing.vhd" }]),
    (e: unknown) => e instanceof DiskError && e.code === "PARENT_NOT_FOUND" && e.message.includes("nothing.vhd"),
  );
  fs.rmSync(dir, { recursive: true });
});

test("verifyParent: identity mismatch refused naming both files; time stamp only warns", () => {
  assert.throws(
    () => verifyParent("/x/child.vhd", "/x/parent.vhd", { expectedId: "00000000-0000-0000-0000-000000000001", actualId: "00000000-0000-0000-0000-000000000002" }),
    (e: unknown) => e instanceof DiskError && e.code === "PARENT_MISMATCH" && e.message.includes("/x/child.vhd") && e.message.includes("/x/parent.vhd"),
  );
  const w = verifyParent("/x/c", "/x/p", { expectedId: "{AB-CD}", actualId: "abcd", expectedTimestamp: 5, actualTimestamps: [6] });
  assert.equal(w.length, 1);
});

test("describeChain lists child first down to the base", () => {
  const dir = tmpDir();
  const a = path.join(dir, "a.vhd");
  const b = path.join(dir, "b.vhd");
  const c = path.join(dir, "c.vhd");
  createDisk(a, "vhd", { type: "dynamic", size: 2 * MiB });
  createDisk(b, "vhd", { type: "differencing", parentPath: a });
  createDisk(c, "vhd", { type: "differencing", parentPath: b });
  const chain = describeChain(c);
  assert.deepEqual(chain.map((d) => [path.basename(d.path), d.type]), [["c.vhd", "differencing"], ["b.vhd", "differencing"], ["a.vhd", "dynamic"]]);
  assert.equal(chain[0]!.parentId, chain[1]!.uniqueId);
  fs.rmSync(dir, { recursive: true });
});
