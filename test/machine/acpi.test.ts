import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ChunkedGuestMemory } from "../../src/machine/guest-memory.js";
import { GiB, planMemory, type MemoryPlan } from "../../src/machine/memory-map.js";
import { buildAcpiTables } from "../../src/machine/acpi/build.js";
import { dsdt, pciIntxGsi } from "../../src/machine/acpi/dsdt.js";
import { eisaIdValue, integer, nameString, pkgLength } from "../../src/machine/acpi/aml.js";
import { AmlReader, decodeEisaId, findName, type AmlNode } from "./aml-reader.js";

const sum = (b: Uint8Array) => b.reduce((s, x) => (s + x) & 0xff, 0);
const sig = (b: Uint8Array, o = 0) => String.fromCharCode(...b.subarray(o, o + 4));

interface Board {
  plan: MemoryPlan;
  mem: ChunkedGuestMemory;
  rsdp: number;
  tables: Map<string, { addr: number; bytes: Uint8Array }>;
}

/** Build into a 1 MiB low-memory image of an 8 GiB plan and walk RSDP → XSDT → tables like an OS would. */
function build(vcpuCount: number): Board {
  const plan = planMemory(8 * GiB);
  const mem = ChunkedGuestMemory.anonymous([{ gpa: 0, length: 0x100000, fileOffset: 0 }]);
  const { rsdpAddress } = buildAcpiTables({ vcpuCount, plan }, mem);
  const table = (addr: number) => {
    const len = new DataView(mem.read(addr, 8).buffer).getUint32(4, true);
    return mem.read(addr, len);
  };
  const tables = new Map<string, { addr: number; bytes: Uint8Array }>();
  const r = mem.read(rsdpAddress, 36);
  const xsdtAddr = Number(new DataView(r.buffer).getBigUint64(24, true));
  const x = table(xsdtAddr);
  tables.set("XSDT", { addr: xsdtAddr, bytes: x });
  for (let o = 36; o < x.length; o += 8) {
    const a = Number(new DataView(x.buffer).getBigUint64(o, true));
    const t = table(a);
    tables.set(sig(t), { addr: a, bytes: t });
  }
  const fadt = tables.get("FACP")!.bytes;
  const fdv = new DataView(fadt.buffer);
  const dsdtAddr = Number(fdv.getBigUint64(140, true));
  tables.set("DSDT", { addr: dsdtAddr, bytes: table(dsdtAddr) });
  const facsAddr = fdv.getUint32(36, true);
  tables.set("FACS", { addr: facsAddr, bytes: table(facsAddr) });
  const rsdtAddr = new DataView(r.buffer).getUint32(16, true);
  tables.set("RSDT", { addr: rsdtAddr, bytes: table(rsdtAddr) });
  return { plan, mem, rsdp: rsdpAddress, tables };
}

test("RSDP v2 in the BIOS scan area with both checksums", () => {
  const b = build(2);
  assert.equal(b.rsdp, 0xe0000);
  assert.equal(b.rsdp % 16, 0);
  const r = b.mem.read(b.rsdp, 36);
  assert.equal(String.fromCharCode(...r.subarray(0, 8)), "RSD PTR ");
  assert.equal(r[15], 2);
  assert.equal(sum(r.subarray(0, 20)), 0);
  assert.equal(sum(r), 0);
  assert.equal(new DataView(r.buffer).getUint32(20, true), 36);
});

test("every table: checksum, length, inside the ACPI area", () => {
  const b = build(4);
  for (const [name, t] of b.tables) {
    assert.ok(t.addr >= 0xe0000 && t.addr + t.bytes.length <= 0x100000, name);
    if (name === "FACS") {
      assert.equal(t.addr % 64, 0);
      assert.equal(t.bytes.length, 64);
      continue;
    }
    assert.equal(sum(t.bytes), 0, `${name} checksum`);
    assert.equal(String.fromCharCode(...t.bytes.subarray(10, 16)), "PARTIS");
  }
  assert.deepEqual([...b.tables.keys()].sort(), ["APIC", "DSDT", "FACP", "FACS", "RSDT", "XSDT"]);
  const rsdt = b.tables.get("RSDT")!.bytes;
  assert.equal(rsdt.length, 36 + 8);
});

test("FADT: PM blocks, SCI 9, no SMI, reset register, flags, X_ fields", () => {
  const f = build(1).tables.get("FACP")!.bytes;
  const dv = new DataView(f.buffer);
  assert.equal(f.length, 276);
  assert.equal(f[8], 6);
  assert.equal(dv.getUint16(46, true), 9);
  assert.equal(dv.getUint32(48, true), 0);
  assert.equal(dv.getUint32(56, true), 0x600);
  assert.equal(dv.getUint32(64, true), 0x604);
  assert.equal(dv.getUint32(76, true), 0x608);
  assert.deepEqual([f[88], f[89], f[91]], [4, 2, 4]);
  assert.equal(dv.getUint16(109, true), 0x3);
  const flags = dv.getUint32(112, true);
  assert.equal(flags & (1 << 4), 0, "fixed-feature power button");
  assert.notEqual(flags & (1 << 5), 0, "no sleep button");
  assert.notEqual(flags & (1 << 10), 0, "RESET_REG_SUP");
  assert.equal(flags & (1 << 20), 0, "not hardware-reduced");
  assert.deepEqual([...f.subarray(116, 120)], [1, 8, 0, 1]);
  assert.equal(dv.getBigUint64(120, true), 0xcf9n);
  assert.equal(f[128], 6);
  assert.equal(dv.getBigUint64(140, true), BigInt(dv.getUint32(40, true)));
  const gas = (o: number) => ({ space: f[o], width: f[o + 1], addr: dv.getBigUint64(o + 4, true) });
  assert.deepEqual(gas(148), { space: 1, width: 32, addr: 0x600n });
  assert.deepEqual(gas(172), { space: 1, width: 16, addr: 0x604n });
  assert.deepEqual(gas(208), { space: 1, width: 32, addr: 0x608n });
  assert.deepEqual(gas(160), { space: 0, width: 0, addr: 0n });
});

test("MADT: one enabled LAPIC per vCPU, IOAPIC, overrides, NMI", () => {
  for (const n of [1, 3, 64, 255]) {
    const m = build(n).tables.get("APIC")!.bytes;
    const dv = new DataView(m.buffer);
    assert.equal(dv.getUint32(36, true), 0xfee00000);
    assert.equal(dv.getUint32(40, true) & 1, 1);
    const byType = new Map<number, Uint8Array[]>();
    for (let o = 44; o < m.length; ) {
      const type = m[o]!, len = m[o + 1]!;
      assert.ok(len >= 2);
      byType.set(type, [...(byType.get(type) ?? []), m.subarray(o, o + len)]);
      o += len;
    }
    const lapics = byType.get(0)!;
    assert.equal(lapics.length, n);
    lapics.forEach((e, i) => {
      assert.deepEqual([e[2], e[3]], [i, i]);
      assert.equal(new DataView(e.buffer, e.byteOffset).getUint32(4, true), 1);
    });
    const io = byType.get(1)!;
    assert.equal(io.length, 1);
    const iodv = new DataView(io[0]!.buffer, io[0]!.byteOffset);
    assert.equal(iodv.getUint32(4, true), 0xfec00000);
    assert.equal(iodv.getUint32(8, true), 0);
    const iso = byType.get(2)!.map((e) => {
      const d = new DataView(e.buffer, e.byteOffset);
      return { irq: e[3], gsi: d.getUint32(4, true), flags: d.getUint16(8, true) };
    });
    assert.deepEqual(iso, [{ irq: 0, gsi: 2, flags: 0 }, { irq: 9, gsi: 9, flags: 0xd }]);
    const nmi = byType.get(4)!;
    assert.deepEqual([nmi[0]![2], nmi[0]![5]], [0xff, 1]);
  }
});

function decodeDsdt(vcpuCount = 2): { nodes: AmlNode[]; plan: MemoryPlan } {
  const b = build(vcpuCount);
  const d = b.tables.get("DSDT")!.bytes;
  assert.equal(d[8], 2, "DSDT revision 2: 64-bit integers");
  return { nodes: AmlReader.parse(d.subarray(36)), plan: b.plan };
}

test("DSDT: \\_S5 package {5, 5, 0, 0}", () => {
  const s5 = findName(decodeDsdt().nodes, "\\_S5");
  assert.ok(s5 !== undefined && s5.kind === "name" && s5.value.kind === "package");
  assert.deepEqual(
    s5.value.elements.map((e) => (e.kind === "integer" ? e.value : undefined)),
    [5n, 5n, 0n, 0n],
  );
});

interface Res { tag: number; body: Uint8Array }
function resources(buf: Uint8Array): Res[] {
  const out: Res[] = [];
  for (let o = 0; o < buf.length; ) {
    const b = buf[o]!;
    if (b & 0x80) {
      const len = buf[o + 1]! | (buf[o + 2]! << 8);
      out.push({ tag: b, body: buf.subarray(o + 3, o + 3 + len) });
      o += 3 + len;
    } else {
      const len = b & 7;
      out.push({ tag: (b >> 3) & 0xf, body: buf.subarray(o + 1, o + 1 + len) });
      o += 1 + len;
    }
  }
  return out;
}

function nameValue(nodes: AmlNode[], path: string): AmlNode {
  const n = findName(nodes, path);
  assert.ok(n !== undefined && n.kind === "name", `${path} missing`);
  return n.value;
}

test("DSDT: PCI0 root bridge with _HID, _BBN, _CRS windows", () => {
  const { nodes, plan } = decodeDsdt();
  const hid = nameValue(nodes, "\\_SB.PCI0._HID");
  assert.ok(hid.kind === "integer");
  assert.equal(decodeEisaId(Number(hid.value)), "PNP0A03");
  const bbn = nameValue(nodes, "\\_SB.PCI0._BBN");
  assert.deepEqual(bbn, { kind: "integer", value: 0n });
  const crs = nameValue(nodes, "\\_SB.PCI0._CRS");
  assert.ok(crs.kind === "buffer");
  const rs = resources(crs.bytes);
  assert.equal(rs.at(-1)!.tag, 0xf, "end tag");
  const word = (r: Res, i: number) => r.body[i]! | (r.body[i + 1]! << 8);
  const bus = rs.find((r) => r.tag === 0x88 && r.body[0] === 2)!;
  assert.deepEqual([word(bus, 5), word(bus, 7), word(bus, 11)], [0, 0xff, 0x100]);
  const ios = rs.filter((r) => r.tag === 0x88 && r.body[0] === 1).map((r) => [word(r, 5), word(r, 7)]);
  assert.deepEqual(ios, [[0, 0xcf7], [0xd00, 0xffff]]);
  const m32 = rs.find((r) => r.tag === 0x87 && r.body[0] === 0)!;
  const d = new DataView(m32.body.buffer, m32.body.byteOffset);
  assert.deepEqual([d.getUint32(7, true), d.getUint32(11, true)], [plan.pciMmio32.start, plan.pciMmio32.start + plan.pciMmio32.size - 1]);
  const m64 = rs.find((r) => r.tag === 0x8a)!;
  const q = new DataView(m64.body.buffer, m64.body.byteOffset);
  assert.equal(q.getBigUint64(11, true), BigInt(plan.pciMmio64.start));
  assert.equal(q.getBigUint64(35, true), BigInt(plan.pciMmio64.size));
});

test("DSDT: _PRT routes every slot/pin to GSI 16 + (slot + pin) % 4", () => {
  const prt = nameValue(decodeDsdt().nodes, "\\_SB.PCI0._PRT");
  assert.ok(prt.kind === "package");
  assert.equal(prt.elements.length, 128);
  for (const e of prt.elements) {
    assert.ok(e.kind === "package" && e.elements.length === 4);
    const [a, pin, src, gsi] = e.elements.map((x) => (x.kind === "integer" ? Number(x.value) : -1));
    assert.equal(a! & 0xffff, 0xffff);
    assert.equal(src, 0);
    assert.equal(gsi, pciIntxGsi(a! >>> 16, pin!));
    assert.ok(gsi! >= 16 && gsi! <= 19);
  }
  assert.equal(pciIntxGsi(1, 0), 17);
  assert.equal(pciIntxGsi(3, 1), 16);
});

test("DSDT: legacy devices and processors", () => {
  const { nodes } = decodeDsdt(3);
  const hid = (p: string) => {
    const v = nameValue(nodes, p);
    return v.kind === "integer" ? decodeEisaId(Number(v.value)) : v.kind === "string" ? v.value : "?";
  };
  assert.equal(hid("\\_SB.COM1._HID"), "PNP0501");
  assert.equal(hid("\\_SB.KBD._HID"), "PNP0303");
  assert.equal(hid("\\_SB.RTC._HID"), "PNP0B00");
  const com = nameValue(nodes, "\\_SB.COM1._CRS");
  assert.ok(com.kind === "buffer");
  const rs = resources(com.bytes);
  assert.deepEqual([rs[0]!.tag, rs[0]!.body[1]! | (rs[0]!.body[2]! << 8), rs[0]!.body[6]], [0x8, 0x3f8, 8]);
  assert.deepEqual([rs[1]!.tag, rs[1]!.body[0]! | (rs[1]!.body[1]! << 8)], [0x4, 1 << 4]);
  const kbd = nameValue(nodes, "\\_SB.KBD._CRS");
  assert.ok(kbd.kind === "buffer");
  assert.equal(resources(kbd.bytes)[2]!.body[0], 1 << 1);
  const rtc = nameValue(nodes, "\\_SB.RTC._CRS");
  assert.ok(rtc.kind === "buffer");
  assert.equal(resources(rtc.bytes)[1]!.body[1], 1, "IRQ 8");
  for (let i = 0; i < 3; i++) {
    assert.equal(hid(`\\_SB.C00${i}._HID`), "ACPI0007");
    assert.deepEqual(nameValue(nodes, `\\_SB.C00${i}._UID`), { kind: "integer", value: BigInt(i) });
  }
  assert.equal(findName(nodes, "\\_SB.C003"), undefined);
});

test("AML encoder primitives", () => {
  assert.equal(eisaIdValue("PNP0A03"), 0x030ad041);
  assert.deepEqual([...pkgLength(0x3e)], [0x3f]);
  assert.deepEqual([...pkgLength(0x3f)], [0x41, 0x04]);
  assert.deepEqual([...pkgLength(0x1000)], [0x83, 0x00, 0x01]); // total 0x1003
  assert.deepEqual([...integer(0x1_0000_0000n)], [0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
  assert.deepEqual([...integer(0x100)], [0x0b, 0, 1]);
  assert.deepEqual([...nameString("\\_SB.PCI0")], [0x5c, 0x2e, 0x5f, 0x53, 0x42, 0x5f, 0x50, 0x43, 0x49, 0x30]);
  assert.deepEqual([...nameString("KBD")], [0x4b, 0x42, 0x44, 0x5f]);
  assert.throws(() => nameString("toolong"));
});

test("tables for 255 vCPUs fit the ACPI area", () => {
  const b = build(255);
  const dsdtT = b.tables.get("DSDT")!;
  assert.ok(AmlReader.parse(dsdtT.bytes.subarray(36)).length > 0);
  assert.throws(() => buildAcpiTables({ vcpuCount: 256, plan: b.plan }, b.mem));
});

test("iasl disassembles the DSDT cleanly (independent oracle: acpica-tools, installed by scripts/setup.sh)", () => {
  let iasl: string | undefined;
  for (const p of ["/usr/bin/iasl", "/usr/local/bin/iasl"]) if (existsSync(p)) iasl = p;
  assert.ok(iasl !== undefined, "iasl is missing: run scripts/setup.sh (Debian package acpica-tools)");
  const dir = mkdtempSync(join(tmpdir(), "partis-dsdt-"));
  try {
    const plan = planMemory(8 * GiB);
    writeFileSync(join(dir, "dsdt.dat"), dsdt({ vcpuCount: 2, plan }));
    execFileSync(iasl, ["-d", "dsdt.dat"], { cwd: dir, stdio: "pipe" });
    const dsl = readFileSync(join(dir, "dsdt.dsl"), "utf8");
    assert.match(dsl, /Name \(\\_S5, Package \(0x04\)/);
    assert.match(dsl, /EisaId \("PNP0A03"\)/);
    assert.match(dsl, /EisaId \("PNP0501"\)/);
    assert.match(dsl, /WordBusNumber \(ResourceProducer, MinFixed, MaxFixed, PosDecode,/);
    assert.match(dsl, /QWordMemory \(ResourceProducer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadWrite,/);
    assert.match(dsl, /0x0000000240000000,/);
    // Recompile the disassembly: iasl reports no errors.
    const out = execFileSync(iasl, ["-p", "re", "dsdt.dsl"], { cwd: dir, stdio: "pipe" }).toString();
    assert.match(out, /Compilation (complete|successful)\. 0 Errors, 0 Warnings/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
