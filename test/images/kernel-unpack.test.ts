/**
 * Unpacking bzImage kernels on the host: formats, the cache, refusals, and
 * loading the result into guest memory (no guest needed).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, utimesSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { findUnpackedKernel, unpackKernel } from "../../src/images/kernel-unpack.js";
import { openUnpackedKernel, readKernelHead } from "../../src/images/kernel-file.js";
import { ChunkedGuestMemory } from "../../src/machine/guest-memory.js";
import { LinuxLoadError, compressedPayload, loadLinux, planLinuxLoad } from "../../src/machine/linux-boot.js";
import { MiB, planMemory } from "../../src/machine/memory-map.js";
import { KERNEL_ELF_PADDR, makeBzImage, makeKernelElf, withSizeAppended } from "../fixtures/bzimage.js";

const dir = mkdtempSync(join(tmpdir(), "partis-unpack-"));
const cacheDir = join(dir, "cache");
const HLT = Uint8Array.of(0xf4);

function xz(data: Uint8Array): Uint8Array {
  const r = spawnSync("xz", ["-c", "--check=crc32"], { input: data, maxBuffer: 64 << 20 });
  assert.equal(r.status, 0, "xz (Debian xz-utils) compresses the fixture");
  return withSizeAppended(r.stdout, data.length);
}

function kernelFile(name: string, compressedKernel: Uint8Array | undefined, initSize = 1 * MiB): string {
  const path = join(dir, name);
  writeFileSync(path, makeBzImage(HLT, { initSize, ...(compressedKernel !== undefined ? { compressedKernel } : {}) }));
  return path;
}

test("gzip and xz payloads are unpacked into their non-zero pages; the second use comes from the cache", async () => {
  const elf = makeKernelElf(Uint8Array.of(0x90, 0x90, 0xf4));
  for (const [name, payload, compression] of [
    ["gzip", gzipSync(elf), "gzip"],
    ["xz", xz(elf), "xz"],
  ] as const) {
    const path = kernelFile(`bz-${name}`, payload);
    assert.equal(compressedPayload(readFileSync(path)).compression, compression);
    assert.equal(findUnpackedKernel(path, cacheDir), undefined, "nothing cached yet");
    const logs: string[] = [];
    const r = await unpackKernel(path, { cacheDir, log: (l) => logs.push(l) });
    assert.ok(r.ok, r.ok ? "" : r.why);
    assert.equal(r.kernel.compression, compression);
    assert.equal(r.kernel.entry, KERNEL_ELF_PADDR);
    assert.equal(r.kernel.loadEnd, KERNEL_ELF_PADDR + 5 * 4096);
    assert.deepEqual(r.kernel.extents.map((x) => x.gpa), [KERNEL_ELF_PADDR, KERNEL_ELF_PADDR + 8192]);
    const flat = readFileSync(r.kernel.imagePath);
    assert.equal(flat.length, 8192);
    assert.deepEqual([...flat.subarray(0, 3)], [0x90, 0x90, 0xf4]);
    assert.equal(logs.length, 1, "unpacking is announced once");
    const again = await unpackKernel(path, { cacheDir, log: (l) => logs.push(l) });
    assert.ok(again.ok);
    assert.equal(logs.length, 1, "the cached entry is used without unpacking again");
    assert.deepEqual(findUnpackedKernel(path, cacheDir), again.kernel);
  }
});

test("a replaced kernel file is unpacked again", async () => {
  const path = kernelFile("bz-replaced", gzipSync(makeKernelElf(Uint8Array.of(0x11))));
  const first = await unpackKernel(path, { cacheDir });
  assert.ok(first.ok);
  writeFileSync(path, makeBzImage(HLT, { initSize: MiB, compressedKernel: gzipSync(makeKernelElf(Uint8Array.of(0x22))) }));
  utimesSync(path, new Date(), new Date(Date.now() + 5000));
  const second = await unpackKernel(path, { cacheDir });
  assert.ok(second.ok);
  assert.notEqual(second.kernel.imagePath, first.kernel.imagePath);
  assert.equal(readFileSync(second.kernel.imagePath)[0], 0x22);
});

test("kernels that cannot be unpacked say why (the guest then decompresses them)", async () => {
  const elf = makeKernelElf(HLT);
  const cases: [string, Uint8Array | undefined, RegExp][] = [
    ["no-payload", undefined, /payload/],
    ["lz4", Uint8Array.of(0x02, 0x21, 0x4c, 0x18, 1, 2, 3, 4, 5, 6, 7, 8), /lz4-compressed kernels are decompressed by the guest/],
    ["corrupt-gzip", Uint8Array.of(0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9), /./],
    ["wrong-size", withSizeAppended(xz(elf).subarray(0, -4), elf.length + 1), /says/],
    ["not-elf", gzipSync(new Uint8Array(8192).fill(7)), /not an ELF/],
  ];
  for (const [name, payload, why] of cases) {
    const r = await unpackKernel(kernelFile(`bz-${name}`, payload), { cacheDir });
    assert.equal(r.ok, false, name);
    if (!r.ok) assert.match(r.why, why, name);
  }
});

test("loading an unpacked kernel: its pages at their addresses, entry at startup_64; misplaced images are refused", async () => {
  const path = kernelFile("bz-load", gzipSync(makeKernelElf(Uint8Array.of(0x90, 0xf4))));
  const r = await unpackKernel(path, { cacheDir });
  assert.ok(r.ok);
  const plan = planMemory(64 * MiB);
  const memory = ChunkedGuestMemory.anonymous(plan.ram);
  const image = openUnpackedKernel(r.kernel);
  const info = loadLinux(memory, plan, readKernelHead(path), undefined, "console=ttyS0", { unpacked: image });
  image.close();
  assert.equal(info.entry64, KERNEL_ELF_PADDR);
  assert.deepEqual([...memory.read(KERNEL_ELF_PADDR, 2)], [0x90, 0xf4]);
  assert.ok(memory.read(KERNEL_ELF_PADDR + 4096, 4096).every((b) => b === 0), "the skipped zero page stays zero");
  assert.ok(memory.read(KERNEL_ELF_PADDR + 8192, 4096).every((b) => b === 0xab));

  // init_size too small to hold the unpacked kernel where the decompressor would put it.
  const small = kernelFile("bz-small", gzipSync(makeKernelElf(HLT)), 8192);
  const rs = await unpackKernel(small, { cacheDir });
  assert.ok(rs.ok);
  assert.throws(() => planLinuxLoad(plan, readFileSync(small), 0, "", rs.kernel), (e: unknown) => e instanceof LinuxLoadError && e.code === "UNPACKED_KERNEL_MISPLACED");
  // A layout whose extents run past its image, and an image file cut short.
  const never = (): void => assert.fail("nothing is read for a refused extent");
  assert.throws(
    () => loadLinux(memory, plan, readFileSync(path), undefined, "", { unpacked: { ...r.kernel, imageBytes: 100, read: never } }),
    (e: unknown) => e instanceof LinuxLoadError && e.code === "UNPACKED_KERNEL_TRUNCATED",
  );
  const cut = join(dir, "cut.bin");
  writeFileSync(cut, readFileSync(r.kernel.imagePath).subarray(0, 5000));
  const short = openUnpackedKernel({ ...r.kernel, imagePath: cut });
  assert.throws(
    () => loadLinux(memory, plan, readFileSync(path), undefined, "", { unpacked: short }),
    (e: unknown) => e instanceof LinuxLoadError && e.code === "UNPACKED_KERNEL_TRUNCATED" && /ends at 5000/.test(e.message),
  );
  short.close();
  // A kernel given only by its head cannot be loaded compressed.
  const big = join(dir, "bz-big");
  writeFileSync(big, makeBzImage(HLT, { payloadBytes: 300 * 1024 }));
  const head = readKernelHead(big);
  assert.ok(head.head.length < head.size);
  assert.throws(() => loadLinux(memory, plan, head, undefined, ""), (e: unknown) => e instanceof LinuxLoadError && e.code === "KERNEL_INCOMPLETE");
});
