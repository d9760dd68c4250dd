/**
 * The default guest's artifacts: initramfs contents (/init, busybox, requested
 * modules with their dependencies in load order), cache reuse, and the cache's
 * build-once behaviour under concurrent callers.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import { after, describe, it } from "node:test";
import { readNewcCpio, writeNewcCpio } from "../../src/images/cpio.js";
import { DEFAULT_GUEST_MODULES, prepareDefaultGuest } from "../../src/images/default-guest.js";
import { ensureCacheEntry } from "../../src/images/image-cache.js";
import { KernelModuleError, PackageToolError } from "../../src/images/image-errors.js";
import { loadModuleIndex, planModuleLoad } from "../../src/images/kernel-modules.js";

const S_IFMT = 0o170000;

function archive(path: string): Map<string, { mode: number; data: Buffer }> {
  const m = new Map<string, { mode: number; data: Buffer }>();
  for (const r of readNewcCpio(gunzipSync(readFileSync(path)))) m.set(r.path, { mode: r.mode, data: r.data });
  return m;
}

describe("newc cpio", () => {
  it("round-trips files, dirs, symlinks and device nodes with 4-byte alignment", () => {
    const buf = writeNewcCpio([
      { kind: "dir", path: "etc" },
      { kind: "file", path: "etc/a", data: Buffer.from("hello"), mode: 0o600 },
      { kind: "symlink", path: "sh", target: "/bin/busybox" },
      { kind: "chardev", path: "console", major: 5, minor: 1 },
    ]);
    assert.equal(buf.length % 4, 0);
    const r = readNewcCpio(buf);
    assert.deepEqual(r.map((e) => e.path), ["etc", "etc/a", "sh", "console"]);
    assert.equal(r[1]!.data.toString(), "hello");
    assert.equal(r[1]!.mode, 0o100600);
    assert.equal(r[2]!.data.toString(), "/bin/busybox");
    assert.equal(r[3]!.mode & S_IFMT, 0o020000);
  });
  it("rejects paths that climb out", () => {
    assert.throws(() => writeNewcCpio([{ kind: "file", path: "../x", data: Buffer.alloc(0) }]));
  });
});

describe("default guest artifacts", () => {
  const dirs: string[] = [];
  after(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

  it("initramfs holds /init, busybox with applets, and the default modules (dependencies first)", async () => {
    const g = await prepareDefaultGuest();
    assert.ok(statSync(g.kernel).size > 5_000_000, "vmlinuz present");
    assert.match(g.kernelVersion, /^\d+\.\d+\.\d+-\d+-amd64$/);
    const a = archive(g.initrd);
    assert.ok(a.get("init")!.data.toString().startsWith("#!/bin/sh"));
    assert.equal(a.get("init")!.mode & 0o111, 0o111);
    assert.ok(a.get("bin/busybox")!.data.length > 1_000_000);
    assert.equal(a.get("bin/sh")!.data.toString(), "/bin/busybox");
    assert.equal(a.get("sbin/acpid")!.data.toString(), "/bin/busybox");
    assert.match(a.get("etc/acpi/PWRF/00000080")!.data.toString(), /poweroff -f/);
    assert.match(a.get("etc/inittab")!.data.toString(), /::sysinit:\/etc\/rc/);
    assert.equal(a.get("dev/console")!.mode & S_IFMT, 0o020000);
    const order = a.get("lib/modules/load-order")!.data.toString().trim().split("\n");
    const names = order.map((l) => l.slice(l.lastIndexOf("/") + 1, -3));
    const norm = (n: string) => n.replace(/-/g, "_");
    for (const m of DEFAULT_GUEST_MODULES) assert.ok(names.map(norm).includes(norm(m)), `${m} is loaded: ${names.join(" ")}`);
    const at = (n: string) => names.indexOf(n);
    assert.ok(at("virtio") >= 0 && at("virtio") < at("virtio_pci") && at("virtio_pci") < at("virtio_blk"), "virtio core before its transport and drivers");
    assert.ok(at("libata") >= 0 && at("libata") < at("ata_piix"), "libata before ata_piix");
    assert.ok(at("8390") >= 0 && at("8390") < at("ne2k-pci"), "8390 before ne2k-pci");
    for (const l of order) assert.ok(a.has(`lib/modules/${l}`), l);
  });

  it("resolves a custom module list with dependencies first and built-ins reported", async () => {
    const g = await prepareDefaultGuest();
    const index = await loadModuleIndex(g.modulesDir, g.kernelVersion);
    const plan = planModuleLoad(index, ["virtio_net", "ata_piix", "sd_mod", "kvm-amd", "i8042", "tulip", "ne2k-pci"]);
    const names = plan.load.map((m) => m.name);
    const before = (a: string, b: string): void => assert.ok(names.indexOf(a) >= 0 && names.indexOf(a) < names.indexOf(b), `${a} before ${b}: ${names.join(" ")}`);
    before("virtio_ring", "virtio");
    before("virtio", "virtio_net");
    before("failover", "net_failover");
    before("net_failover", "virtio_net");
    before("scsi_common", "scsi_mod");
    before("scsi_mod", "libata");
    before("libata", "ata_piix");
    before("scsi_mod", "sd_mod");
    before("irqbypass", "kvm");
    before("kvm", "kvm_amd");
    before("8390", "ne2k_pci");
    assert.ok(names.includes("tulip"));
    assert.equal(new Set(names).size, names.length, "no duplicates");
    assert.deepEqual(plan.builtin, ["i8042"]);
    assert.throws(() => planModuleLoad(index, ["no_such_module_xyz"]), KernelModuleError);
  });

  it("builds a guest with extra modules in its own cache entry, and reuses it", async () => {
    const a = await prepareDefaultGuest({ modules: ["button", "evdev", "virtio_blk"] });
    const mtime = statSync(a.initrd).mtimeMs;
    const t0 = performance.now();
    const b = await prepareDefaultGuest({ modules: ["button", "evdev", "virtio_blk"] });
    const elapsed = performance.now() - t0;
    assert.deepEqual(b, a);
    assert.equal(statSync(b.initrd).mtimeMs, mtime, "not rebuilt");
    assert.ok(elapsed < 1000, `cached call took ${elapsed} ms`);
    assert.notEqual(a.initrd, (await prepareDefaultGuest()).initrd);
    const order = archive(a.initrd).get("lib/modules/load-order")!.data.toString().trim().split("\n").map((l) => l.slice(l.lastIndexOf("/") + 1));
    assert.ok(order.indexOf("virtio_ring.ko") < order.indexOf("virtio.ko") && order.indexOf("virtio.ko") < order.indexOf("virtio_blk.ko"), order.join(" "));
  });

  it("an unknown kernel package is a typed apt error, not a silent fallback", async () => {
    await assert.rejects(prepareDefaultGuest({ kernelPackage: "linux-image-9.9.9-does-not-exist-amd64" }), (e: unknown) => {
      assert.ok(e instanceof PackageToolError);
      assert.equal(e.code, "APT_RESOLVE_FAILED");
      return true;
    });
  });

  it("cache entries are built once under concurrent callers", async () => {
    const root = mkdtempSync(join(tmpdir(), "partis-cache-"));
    dirs.push(root);
    let builds = 0;
    const entry = join(root, "x", "entry-1");
    const build = async (tmp: string): Promise<void> => {
      builds++;
      await new Promise((r) => setTimeout(r, 200));
      await import("node:fs/promises").then((fs) => fs.writeFile(join(tmp, "f"), "ok"));
    };
    const results = await Promise.all([ensureCacheEntry(entry, build), ensureCacheEntry(entry, build), ensureCacheEntry(entry, build)]);
    assert.equal(builds, 1);
    assert.deepEqual(results, [entry, entry, entry]);
    assert.equal(readFileSync(join(entry, "f"), "utf8"), "ok");
  });

  it("a failed build leaves no entry and no lock behind", async () => {
    const root = mkdtempSync(join(tmpdir(), "partis-cache-"));
    dirs.push(root);
    const entry = join(root, "e");
    await assert.rejects(ensureCacheEntry(entry, async () => { throw new Error("boom"); }), /boom/);
    const { readdirSync } = await import("node:fs");
    assert.deepEqual(readdirSync(root), []);
  });
});
