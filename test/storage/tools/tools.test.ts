/**
 * The disk tools on raw, VHD and VHDX, with qemu-img as the oracle:
 * sources written by qemu-io, results compared by `qemu-img compare`
 * (always `-f vpc` for VHD). Chains (which qemu 7.2 cannot read for
 * VHD/VHDX differencing) are compared against an in-memory model of every
 * write, saved as raw.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { DiskError, type DiskFormat } from "../../../src/storage/block-device.js";
import { createDisk, openDisk } from "../../../src/storage/open.js";
import { checkDisk, compactDisk, convertDisk, infoDisk, mergeDisk, resizeDisk, setParentDisk, DiskOperationCancelled } from "../../../src/storage/tools/index.js";
import { DiskModel, leftoverTemporaries, qemuCheck, qemuCompare, qemuCreate, qemuFormat, qemuIo, scratchDir, seededBytes, sha256File } from "./oracle.js";

const MiB = 1024 * 1024;
const SIZE = 24 * MiB;

/** Writes every source gets: (offset, length, pattern byte); a zero write allocates a zero block. */
const PATTERN: readonly [number, number, number][] = [
  [0, 64 * 1024, 0x11],
  [MiB + 512, 8 * 1024, 0x22],
  [5 * MiB - 4096, 3 * MiB, 0x33],
  [12 * MiB, 2 * MiB, 0x00],
  [SIZE - 4096, 4096, 0x44],
];

interface Source {
  readonly label: string;
  readonly format: DiskFormat;
  readonly path: string;
}

function qemuSource(dir: string, format: DiskFormat, type: "fixed" | "dynamic"): Source {
  const path = join(dir, `src-${format}-${type}.${format === "raw" ? "img" : format}`);
  if (format === "raw") qemuCreate(path, "raw", SIZE, type === "fixed" ? ["preallocation=full"] : []);
  else if (format === "vhd") qemuCreate(path, "vpc", SIZE, [`subformat=${type}`, "force_size=on"]);
  else qemuCreate(path, "vhdx", SIZE, [`subformat=${type}`, "block_size=1M"]);
  qemuIo(path, qemuFormat(format), PATTERN.map(([o, l, p]) => `write -P ${p} ${o} ${l}`));
  return { label: `${format} ${type}`, format, path };
}

const TARGETS: readonly { format: DiskFormat; type: "fixed" | "dynamic"; blockSize?: number }[] = [
  { format: "raw", type: "dynamic" },
  { format: "raw", type: "fixed" },
  { format: "vhd", type: "dynamic" },
  { format: "vhd", type: "fixed" },
  { format: "vhdx", type: "dynamic", blockSize: MiB },
  { format: "vhdx", type: "fixed" },
];

test("convert: every source format to every target, equal under qemu-img compare", async () => {
  const { dir, cleanup } = scratchDir("convert");
  try {
    const sources = [qemuSource(dir, "raw", "dynamic"), qemuSource(dir, "vhd", "dynamic"), qemuSource(dir, "vhd", "fixed"), qemuSource(dir, "vhdx", "dynamic"), qemuSource(dir, "vhdx", "fixed")];
    for (const s of sources) {
      const before = sha256File(s.path);
      for (const t of TARGETS) {
        const dst = join(dir, `out-${s.label.replace(" ", "_")}-${t.format}-${t.type}.${t.format === "raw" ? "img" : t.format}`);
        let calls = 0;
        const r = await convertDisk(s.path, dst, { ...t, progress: () => calls++ });
        assert.ok(calls > 0, "progress reported");
        assert.equal(r.virtualSize, SIZE);
        assert.equal(qemuCompare(s.path, qemuFormat(s.format), dst, qemuFormat(t.format)), "", `${s.label} -> ${t.format} ${t.type}`);
        // qemu 7.2 checks VHDX only (vpc reports "format does not support checks", status 63).
        if (t.format === "vhdx") assert.equal(qemuCheck(dst, "vhdx").status, 0, `qemu-img check ${dst}`);
        const check = checkDisk(dst);
        assert.ok(check.clean, `${dst}: ${JSON.stringify(check.layers)}`);
        if (t.type === "dynamic" && t.format !== "raw") {
          // Zero ranges are skipped: 64K + 8K + 3M(+4K) + 4K of data, the zero-written 2M not stored.
          assert.ok(infoDisk(dst)[0]!.allocatedBytes <= 8 * MiB, `${dst} is sparse (${infoDisk(dst)[0]!.allocatedBytes} allocated)`);
          const d = openDisk(dst, { readOnly: true });
          try {
            assert.ok(d.allocation(12 * MiB, 2 * MiB).every((e) => e.state !== "allocated"), "zero range not stored");
          } finally {
            d.close();
          }
        }
      }
      assert.equal(sha256File(s.path), before, "source unchanged");
    }
    assert.deepEqual(leftoverTemporaries(dir), []);
  } finally {
    cleanup();
  }
});

/** base (dynamic) <- mid <- top, written through Partis, mirrored in a model. */
function buildChain(dir: string, format: "vhd" | "vhdx", depth: number): { paths: string[]; model: DiskModel } {
  const model = new DiskModel(SIZE);
  const paths: string[] = [];
  for (let i = 0; i < depth; i++) {
    const path = join(dir, `chain${i}.${format}`);
    if (i === 0) createDisk(path, format, { type: "dynamic", size: SIZE, blockSize: format === "vhdx" ? MiB : 2 * MiB });
    else createDisk(path, format, { type: "differencing", parentPath: paths[i - 1]! });
    paths.push(path);
    const dev = openDisk(path);
    try {
      for (let k = 0; k < 6; k++) {
        const off = ((i * 7 + k * 13) % 22) * MiB + ((k * 4096 * (i + 1)) % MiB);
        const len = 4096 * (1 + ((k + i) % 40));
        const data = seededBytes(i * 100 + k, len);
        dev.write(off, data);
        model.write(off, data);
      }
      dev.flush();
    } finally {
      dev.close();
    }
  }
  return { paths, model };
}

for (const format of ["vhd", "vhdx"] as const) {
  test(`${format}: info and check walk a 3-deep chain; convert flattens it`, async () => {
    const { dir, cleanup } = scratchDir(`chain-${format}`);
    try {
      const { paths, model } = buildChain(dir, format, 3);
      const info = infoDisk(paths[2]!);
      assert.equal(info.length, 3);
      assert.deepEqual(info.map((d) => d.type), ["differencing", "differencing", "dynamic"]);
      const check = checkDisk(paths[2]!);
      assert.ok(check.clean, JSON.stringify(check.layers));
      assert.equal(check.layers.length, 3);
      const expected = join(dir, "expected.img");
      model.saveRaw(expected);
      const flat = join(dir, `flat.${format}`);
      await convertDisk(paths[2]!, flat, { format, type: "dynamic" });
      assert.equal(qemuCompare(expected, "raw", flat, qemuFormat(format)), "");
    } finally {
      cleanup();
    }
  });

  test(`${format}: merge into parent equals the flattened chain, child removed`, async () => {
    const { dir, cleanup } = scratchDir(`merge-${format}`);
    try {
      const { paths, model } = buildChain(dir, format, 2);
      const expected = join(dir, "expected.img");
      model.saveRaw(expected);
      const r = await mergeDisk(paths[1]!, { into: "parent" });
      assert.equal(r.path, paths[0]);
      assert.ok(r.childRemoved);
      assert.ok(!existsSync(paths[1]!));
      assert.equal(qemuCompare(expected, "raw", paths[0]!, qemuFormat(format)), "");
      assert.ok(checkDisk(paths[0]!).clean);
    } finally {
      cleanup();
    }
  });

  test(`${format}: merge of a 3-deep chain into a new image, and into the middle parent`, async () => {
    const { dir, cleanup } = scratchDir(`merge3-${format}`);
    try {
      const { paths, model } = buildChain(dir, format, 3);
      const expected = join(dir, "expected.img");
      model.saveRaw(expected);
      const flat = join(dir, "flat.img");
      await mergeDisk(paths[2]!, { into: "new", path: flat, format: "raw", type: "dynamic" });
      assert.equal(qemuCompare(expected, "raw", flat, "raw"), "");
      assert.ok(existsSync(paths[2]!), "merge into new keeps the child");
      await mergeDisk(paths[2]!, { into: "parent" });
      const again = join(dir, "again.img");
      await convertDisk(paths[1]!, again, { format: "raw", type: "dynamic" });
      assert.equal(qemuCompare(expected, "raw", again, "raw"), "");
    } finally {
      cleanup();
    }
  });

  test(`${format}: cancelled merge leaves the chain readable and unchanged; rerun completes`, async () => {
    const { dir, cleanup } = scratchDir(`mergecancel-${format}`);
    try {
      const { paths, model } = buildChain(dir, format, 2);
      const expected = join(dir, "expected.img");
      model.saveRaw(expected);
      const ac = new AbortController();
      let chunks = 0;
      await assert.rejects(
        mergeDisk(paths[1]!, { into: "parent" }, { signal: ac.signal, chunkSize: MiB, progress: () => { if (++chunks === 8) ac.abort(); } }),
        DiskOperationCancelled,
      );
      assert.ok(existsSync(paths[1]!));
      assert.ok(checkDisk(paths[1]!).clean, "both layers check clean");
      const mid = join(dir, "mid.img");
      await convertDisk(paths[1]!, mid, { format: "raw", type: "dynamic" });
      assert.equal(qemuCompare(expected, "raw", mid, "raw"), "", "chain reads as before");
      await mergeDisk(paths[1]!, { into: "parent" });
      assert.equal(qemuCompare(expected, "raw", paths[0]!, qemuFormat(format)), "");
    } finally {
      cleanup();
    }
  });

  test(`${format}: a merge killed after writing to the parent resumes from its marker`, async () => {
    const { dir, cleanup } = scratchDir(`mergeresume-${format}`);
    try {
      const { paths, model } = buildChain(dir, format, 2);
      const expected = join(dir, "expected.img");
      model.saveRaw(expected);
      // What a kill mid-merge leaves: the marker, and a parent already written to
      // (child data copied in; a VHDX parent now has a new DataWriteGuid).
      writeFileSync(join(dir, `.chain1.${format}.partis-merge`), JSON.stringify({ kind: "partis-merge", version: 1, parentPath: paths[0] }));
      const chainView = openDisk(paths[1]!, { readOnly: true });
      const part = new Uint8Array(MiB);
      chainView.read(0, part);
      chainView.close();
      const parent = openDisk(paths[0]!);
      parent.write(0, part);
      parent.close();
      await mergeDisk(paths[1]!, { into: "parent" });
      assert.ok(!existsSync(paths[1]!));
      assert.deepEqual(readdirSync(dir).filter((n) => n.includes("partis-merge")), []);
      assert.equal(qemuCompare(expected, "raw", paths[0]!, qemuFormat(format)), "");
    } finally {
      cleanup();
    }
  });

  test(`${format}: compact drops zero blocks, content unchanged`, async () => {
    const { dir, cleanup } = scratchDir(`compact-${format}`);
    try {
      const path = join(dir, `c.${format}`);
      createDisk(path, format, { type: "dynamic", size: SIZE, blockSize: format === "vhdx" ? MiB : 2 * MiB });
      const dev = openDisk(path);
      dev.write(0, seededBytes(1, 64 * 1024));
      dev.write(4 * MiB, seededBytes(7, 6 * MiB));
      dev.write(4 * MiB, new Uint8Array(6 * MiB)); // now allocated blocks of zeros
      dev.write(16 * MiB, seededBytes(2, 4096));
      dev.flush();
      dev.close();
      const copy = join(dir, "before.img");
      await convertDisk(path, copy, { format: "raw", type: "dynamic" });
      const size0 = statSync(path).size;
      const r = await compactDisk(path);
      assert.ok(r.reclaimedBytes >= 5 * MiB, `reclaimed ${r.reclaimedBytes}`);
      assert.equal(r.fileSizeBefore - r.fileSizeAfter, r.reclaimedBytes);
      assert.equal(statSync(path).size, size0 - r.reclaimedBytes);
      assert.equal(qemuCompare(copy, "raw", path, qemuFormat(format)), "");
      assert.ok(checkDisk(path).clean);
      if (format === "vhdx") assert.equal(qemuCheck(path, "vhdx").status, 0);
      assert.deepEqual(leftoverTemporaries(dir), []);
    } finally {
      cleanup();
    }
  });

  test(`${format}: resize grows keeping content; shrink refuses over allocated tail`, async () => {
    const { dir, cleanup } = scratchDir(`resize-${format}`);
    try {
      const path = join(dir, `r.${format}`);
      createDisk(path, format, { type: "dynamic", size: SIZE, blockSize: format === "vhdx" ? MiB : 2 * MiB });
      const dev = openDisk(path);
      dev.write(MiB, seededBytes(3, 8192));
      dev.write(SIZE - 4096, seededBytes(4, 4096));
      dev.flush();
      dev.close();
      const copy = join(dir, "before.img");
      await convertDisk(path, copy, { format: "raw", type: "dynamic" });
      assert.equal(resizeDisk(path, 2 * SIZE).newSize, 2 * SIZE);
      assert.equal(infoDisk(path)[0]!.virtualSize, 2 * SIZE);
      assert.equal(qemuCompare(copy, "raw", path, qemuFormat(format)), "");
      assert.throws(() => resizeDisk(path, SIZE - 2 * MiB), DiskError);
      assert.equal(infoDisk(path)[0]!.virtualSize, 2 * SIZE, "refused shrink changed nothing");
      assert.ok(checkDisk(path).clean);
    } finally {
      cleanup();
    }
  });

  test(`${format}: set-parent re-points a moved parent`, async () => {
    const { dir, cleanup } = scratchDir(`setparent-${format}`);
    try {
      const { paths, model } = buildChain(dir, format, 2);
      const moved = join(dir, `moved.${format}`);
      const { renameSync } = await import("node:fs");
      renameSync(paths[0]!, moved);
      setParentDisk(paths[1]!, moved);
      assert.equal(infoDisk(paths[1]!)[1]!.path, moved);
      const expected = join(dir, "expected.img");
      model.saveRaw(expected);
      const flat = join(dir, "flat.img");
      await convertDisk(paths[1]!, flat, { format: "raw", type: "dynamic" });
      assert.equal(qemuCompare(expected, "raw", flat, "raw"), "");
      const other = join(dir, `other.${format}`);
      createDisk(other, format, { type: "dynamic", size: SIZE });
      assert.throws(() => setParentDisk(paths[1]!, other), DiskError, "identity mismatch refused without force");
    } finally {
      cleanup();
    }
  });
}

test("cancelled convert leaves no temporary file and the source unchanged", async () => {
  const { dir, cleanup } = scratchDir("cancel");
  try {
    const src = join(dir, "src.img");
    writeFileSync(src, seededBytes(9, 16 * MiB));
    const before = sha256File(src);
    for (const format of ["raw", "vhd", "vhdx"] as const) {
      const ac = new AbortController();
      const dst = join(dir, `dst.${format}`);
      await assert.rejects(
        convertDisk(src, dst, { format, type: "dynamic", chunkSize: MiB, signal: ac.signal, progress: (d) => { if (d >= 3 * MiB) ac.abort(); } }),
        DiskOperationCancelled,
      );
      assert.ok(!existsSync(dst));
      assert.deepEqual(leftoverTemporaries(dir), []);
    }
    const ac = new AbortController();
    ac.abort();
    const vhd = join(dir, "c.vhd");
    createDisk(vhd, "vhd", { type: "dynamic", size: 16 * MiB });
    const d = openDisk(vhd);
    d.write(0, new Uint8Array(4 * MiB));
    d.close();
    const vhdBefore = sha256File(vhd);
    await assert.rejects(compactDisk(vhd, { signal: ac.signal }), DiskOperationCancelled);
    assert.equal(sha256File(vhd), vhdBefore);
    assert.equal(sha256File(src), before);
    assert.deepEqual(leftoverTemporaries(dir), []);
  } finally {
    cleanup();
  }
});

test("convert refuses an existing destination and names a missing source", async () => {
  const { dir, cleanup } = scratchDir("refuse");
  try {
    const src = join(dir, "src.img");
    writeFileSync(src, new Uint8Array(MiB));
    await assert.rejects(convertDisk(src, src, { format: "raw", type: "dynamic" }), (e: unknown) => e instanceof DiskError && e.code === "DISK_EXISTS");
    await assert.rejects(convertDisk(join(dir, "nope.vhd"), join(dir, "x.vhd"), { format: "vhd", type: "dynamic" }), (e: unknown) => e instanceof DiskError && e.message.includes("nope.vhd"));
  } finally {
    cleanup();
  }
});
