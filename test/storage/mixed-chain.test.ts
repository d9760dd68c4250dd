/**
 * Differencing chains whose layers mix VHD and VHDX, with real files and only
 * the public storage API (createDisk, openDisk, describeChain, convertDisk):
 * a VHDX child of a dynamic VHD, a VHD child of a dynamic VHDX, and the
 * 4-deep chain VHD(fixed) <- VHDX diff <- VHD diff <- VHDX diff. Every layer
 * gets random unaligned writes while it is the top; the chain must read as an
 * in-memory model of every write, parents must stay byte-identical, a parent
 * swapped for another disk at the same path must be refused, and a flattening
 * convert to raw must equal the model (qemu-img compare agreeing).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { DiskError, type BlockDevice, type DiskFormat } from "../../src/storage/block-device.js";
import { describeChain } from "../../src/storage/chain.js";
import { createDisk, openDisk } from "../../src/storage/open.js";
import { convertDisk } from "../../src/storage/tools/index.js";
import { qemuCompare, rng, scratchDir, sha256File } from "./tools/oracle.js";

const MiB = 1024 * 1024;
/** Not a multiple of any block size, so the last block is partial in every layer. */
const SIZE = 6 * MiB + 3 * 512;
const BLOCK = MiB;

function bytes(r: () => number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = Math.floor(r() * 256);
  return b;
}

function put(disk: BlockDevice, model: Uint8Array, offset: number, data: Uint8Array): void {
  disk.write(offset, data);
  model.set(data, offset);
}

/**
 * Random unaligned writes (1 byte to ~96 KiB, anywhere), plus fixed ones that
 * matter for a differencing layer: a single byte in the middle of a sector,
 * a write straddling a block boundary, and the disk's last bytes.
 */
function scribble(disk: BlockDevice, model: Uint8Array, seed: number, count: number): void {
  const r = rng(seed);
  for (let i = 0; i < count; i++) {
    const len = 1 + Math.floor(r() * (i % 4 === 0 ? 96 * 1024 : 3000));
    const off = Math.floor(r() * (disk.size - len + 1));
    put(disk, model, off, bytes(r, len));
  }
  const blockEdge = (1 + (seed % 5)) * BLOCK;
  put(disk, model, blockEdge - 777 - (seed % 13), bytes(r, 1500 + (seed % 31)));
  put(disk, model, 3 * 512 + 200 + seed * 7, bytes(r, 1));
  put(disk, model, disk.size - 333 - seed, bytes(r, 333 + seed));
}

function assertReadsModel(disk: BlockDevice, model: Uint8Array, seed: number, label: string): void {
  assert.equal(disk.size, model.length, `${label}: size`);
  const whole = new Uint8Array(disk.size);
  disk.read(0, whole);
  if (!Buffer.from(whole).equals(Buffer.from(model))) {
    const at = whole.findIndex((v, i) => v !== model[i]);
    assert.fail(`${label}: full read differs from the model (first at byte ${at})`);
  }
  const r = rng(seed);
  for (let i = 0; i < 40; i++) {
    const len = 1 + Math.floor(r() * 70000);
    const off = Math.floor(r() * (disk.size - len + 1));
    const b = new Uint8Array(len);
    disk.read(off, b);
    assert.ok(Buffer.from(b).equals(Buffer.from(model.subarray(off, off + len))), `${label}: read at ${off}+${len} differs`);
  }
}

function hashes(files: readonly string[]): string[] {
  return files.map((f) => sha256File(f));
}

interface Layer {
  readonly file: string;
  readonly format: DiskFormat;
  readonly type: "fixed" | "dynamic" | "differencing";
}

/**
 * Build the layers bottom-up: create each one (a child of the previous), write
 * into it while it is the top of the chain (checking reads through the whole
 * chain and that no lower file changed), close it. Returns the model.
 */
function buildChain(layers: readonly Layer[], seedBase: number): Uint8Array {
  const model = new Uint8Array(SIZE);
  layers.forEach((l, i) => {
    const parent = i === 0 ? undefined : layers[i - 1]!.file;
    if (parent === undefined) createDisk(l.file, l.format, { type: l.type as "fixed" | "dynamic", size: SIZE, blockSize: l.type === "dynamic" ? BLOCK : undefined });
    else createDisk(l.file, l.format, { type: "differencing", parentPath: parent, blockSize: BLOCK });
    const below = layers.slice(0, i).map((x) => x.file);
    const before = hashes(below);
    const d = openDisk(l.file);
    try {
      assert.equal(d.format, l.format, `${l.file}: format`);
      assert.equal(d.type, l.type, `${l.file}: type`);
      assert.equal(d.size, SIZE, `${l.file}: size`);
      if (parent !== undefined) {
        assert.ok(d.parent !== undefined && d.parent.readOnly, `${l.file}: parent opened read-only`);
        assert.equal(d.parent.format, layers[i - 1]!.format, `${l.file}: parent format`);
        assertReadsModel(d, model, seedBase + i * 10, `${l.file} before its own writes`);
      }
      scribble(d, model, seedBase + i * 10 + 1, 120);
      assertReadsModel(d, model, seedBase + i * 10 + 2, `${l.file} after its writes`);
      d.flush();
    } finally {
      d.close();
    }
    assert.deepEqual(hashes(below), before, `writes to ${l.file} changed a parent file`);
    // Only this layer holds what was written to it: a differencing layer that
    // was written has allocated data, and leaves other ranges to its parent.
    if (l.type === "differencing") {
      const own = openDisk(l.file, { readOnly: true, noParent: true });
      try {
        const ext = own.allocation(0, SIZE);
        assert.ok(ext.some((e) => e.state === "allocated"), `${l.file}: holds its writes`);
        assert.ok(ext.some((e) => e.state === "unallocated"), `${l.file}: leaves untouched ranges to the parent`);
      } finally {
        own.close();
      }
    }
  });
  return model;
}

function assertChainDescribed(layers: readonly Layer[]): void {
  const chain = describeChain(layers[layers.length - 1]!.file);
  assert.deepEqual(
    chain.map((d) => [path.resolve(d.path), d.format, d.type]),
    [...layers].reverse().map((l) => [path.resolve(l.file), l.format, l.type]),
    "describeChain lists the chain child first, with formats and types",
  );
  chain.forEach((d, i) => {
    assert.equal(d.virtualSize, SIZE);
    const next = chain[i + 1];
    if (next === undefined) assert.equal(d.parentPath, undefined);
    else assert.equal(path.resolve(d.parentPath ?? ""), path.resolve(next.path), `${d.path}: parentPath`);
  });
}

function reopenReadOnly(top: string, model: Uint8Array, seed: number): void {
  const d = openDisk(top, { readOnly: true });
  try {
    assertReadsModel(d, model, seed, `${top} reopened read-only`);
  } finally {
    d.close();
  }
}

for (const [parentFormat, childFormat] of [
  ["vhd", "vhdx"],
  ["vhdx", "vhd"],
] as const) {
  test(`${childFormat.toUpperCase()} differencing child of a dynamic ${parentFormat.toUpperCase()} parent`, () => {
    const { dir, cleanup } = scratchDir(`mixed-${childFormat}-on-${parentFormat}`);
    try {
      const layers: Layer[] = [
        { file: path.join(dir, `base.${parentFormat}`), format: parentFormat, type: "dynamic" },
        { file: path.join(dir, `child.${childFormat}`), format: childFormat, type: "differencing" },
      ];
      const model = buildChain(layers, parentFormat === "vhd" ? 100 : 200);
      const parentHash = sha256File(layers[0]!.file);
      reopenReadOnly(layers[1]!.file, model, 7);
      // More writes in a second session, then read back after reopening.
      const d = openDisk(layers[1]!.file);
      try {
        scribble(d, model, 9, 60);
      } finally {
        d.close();
      }
      reopenReadOnly(layers[1]!.file, model, 8);
      assert.equal(sha256File(layers[0]!.file), parentHash, "parent file changed");
      assertChainDescribed(layers);
    } finally {
      cleanup();
    }
  });
}

test("4-deep chain VHD(fixed) <- VHDX diff <- VHD diff <- VHDX diff", async () => {
  const { dir, cleanup } = scratchDir("mixed-chain4");
  try {
    const layers: Layer[] = [
      { file: path.join(dir, "l0-base.vhd"), format: "vhd", type: "fixed" },
      { file: path.join(dir, "l1-diff.vhdx"), format: "vhdx", type: "differencing" },
      { file: path.join(dir, "l2-diff.vhd"), format: "vhd", type: "differencing" },
      { file: path.join(dir, "l3-top.vhdx"), format: "vhdx", type: "differencing" },
    ];
    const top = layers[3]!.file;
    const model = buildChain(layers, 300);
    const parents = layers.slice(0, 3).map((l) => l.file);
    const parentHashes = hashes(parents);

    // A second read-write session on the top: writes still land only there.
    const d = openDisk(top);
    try {
      scribble(d, model, 400, 80);
      assertReadsModel(d, model, 401, "top, second session");
    } finally {
      d.close();
    }
    assert.deepEqual(hashes(parents), parentHashes, "a parent file changed after writing the top");
    reopenReadOnly(top, model, 402);
    assertChainDescribed(layers);

    // Each parent, swapped for a different disk at the same path (same
    // format and type, same parent where it has one), is refused by name.
    for (let i = 0; i < 3; i++) {
      const victim = layers[i]!;
      const child = layers[i + 1]!.file;
      const aside = `${victim.file}.orig`;
      fs.renameSync(victim.file, aside);
      try {
        if (i === 0) createDisk(victim.file, victim.format, { type: "fixed", size: SIZE });
        else createDisk(victim.file, victim.format, { type: "differencing", parentPath: layers[i - 1]!.file, blockSize: BLOCK });
        assert.throws(
          () => openDisk(top, { readOnly: true }).close(),
          (e: unknown) => {
            assert.ok(e instanceof DiskError, `expected a DiskError, got ${String(e)}`);
            assert.equal(e.code, "PARENT_MISMATCH", e.message);
            assert.ok(e.message.includes(victim.file), `message names the parent ${victim.file}: ${e.message}`);
            assert.ok(e.message.includes(child), `message names the child ${child}: ${e.message}`);
            return true;
          },
          `replaced ${victim.file} must be refused`,
        );
      } finally {
        fs.rmSync(victim.file, { force: true });
        fs.renameSync(aside, victim.file);
      }
    }
    assert.deepEqual(hashes(parents), parentHashes, "a parent file changed during the replacement checks");
    reopenReadOnly(top, model, 403);

    // Flattening the top to raw gives exactly the model.
    const flat = path.join(dir, "flat.img");
    const topHash = sha256File(top);
    const r = await convertDisk(top, flat, { format: "raw", type: "dynamic" });
    assert.equal(r.virtualSize, SIZE);
    const flatBytes = fs.readFileSync(flat);
    assert.equal(flatBytes.length, SIZE);
    assert.ok(flatBytes.equals(Buffer.from(model)), "converted raw differs from the model");
    const modelRaw = path.join(dir, "model.img");
    fs.writeFileSync(modelRaw, model);
    assert.equal(qemuCompare(modelRaw, "raw", flat, "raw"), "", "qemu-img compare -f raw model vs converted");
    assert.deepEqual(hashes([...parents, top]), [...parentHashes, topHash], "convert changed a file of the chain");
  } finally {
    cleanup();
  }
});
