/**
 * PciConfig (type-0 header, PCI Local Bus spec 3.0 6.1-6.2, capability list 6.7)
 * driven only through configRead/configWrite and the firmware-side calls the
 * board makes (assignBar, enableDecoding, addCapability).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { PCI_CAP_ID, PCI_COMMAND, PCI_STATUS, PciConfig, PciDeviceError, type PciBarSpec } from "../../../src/devices/pci/pci-config.js";

const IDENTITY = {
  vendorId: 0x1af4,
  deviceId: 0x1042,
  classCode: 0x010802,
  revision: 0x01,
  subsystemVendorId: 0x1af4,
  subsystemId: 0x0002,
  interruptPin: 1,
};

/** io BAR0 (32 bytes), mmio32 BAR1 (4 KiB), prefetchable mmio64 BAR2/3 (16 KiB), mmio32 prefetchable BAR5 (16 bytes). */
const BARS: PciBarSpec[] = [
  { index: 0, kind: "io", size: 32 },
  { index: 1, kind: "mmio32", size: 0x1000 },
  { index: 2, kind: "mmio64", size: 0x4000, prefetchable: true },
  { index: 5, kind: "mmio32", size: 16, prefetchable: true },
];

function make(bars: PciBarSpec[] = BARS): PciConfig {
  return new PciConfig(IDENTITY, bars);
}

const barReg = (i: number): number => 0x10 + 4 * i;
const rd = (c: PciConfig, off: number, size: 1 | 2 | 4 = 4): number => c.configRead(off, size);
const wr = (c: PciConfig, off: number, value: number, size: 1 | 2 | 4 = 4): void => c.configWrite(off, size, value);

/**
 * What Linux's __pci_read_base does for one BAR: read, write all-ones, read the
 * size mask, restore (and the same for the upper dword of a 64-bit BAR).
 * Returns the decoded size and flags.
 */
function sizeBarLikeLinux(c: PciConfig, index: number): { size: number; flags: number; is64: boolean } {
  const pos = barReg(index);
  const l = rd(c, pos);
  wr(c, pos, 0xffff_ffff);
  const sz = rd(c, pos);
  wr(c, pos, l);
  if (sz === 0 || sz === 0xffff_ffff) return { size: 0, flags: 0, is64: false };
  const io = (l & 1) === 1;
  const flags = l & (io ? 0x3 : 0xf);
  const is64 = !io && (l & 0x6) === 0x4;
  let mask = io ? sz & 0xffff_fffc & 0xffff : (sz & 0xffff_fff0) >>> 0;
  let size: number;
  if (is64) {
    const lh = rd(c, pos + 4);
    wr(c, pos + 4, 0xffff_ffff);
    const szh = rd(c, pos + 4);
    wr(c, pos + 4, lh);
    const full = BigInt(szh) * 2n ** 32n + BigInt(mask);
    const lowest = full & -full;
    size = Number(lowest);
    mask = 0;
  } else {
    size = (mask & -mask) >>> 0;
  }
  return { size, flags, is64 };
}

// --- identity -----------------------------------------------------------------------------

test("identity registers: ids, class, revision, subsystem, header type, interrupt pin", () => {
  const c = make();
  assert.equal(rd(c, 0x00), (0x1042 << 16) | 0x1af4);
  assert.equal(rd(c, 0x00, 2), 0x1af4);
  assert.equal(rd(c, 0x02, 2), 0x1042);
  assert.equal(rd(c, 0x08), (0x010802 << 8) | 0x01);
  assert.equal(rd(c, 0x08, 1), 0x01);
  assert.equal(rd(c, 0x09, 1), 0x02, "prog-if");
  assert.equal(rd(c, 0x0a, 1), 0x08, "subclass");
  assert.equal(rd(c, 0x0b, 1), 0x01, "base class");
  assert.equal(rd(c, 0x0e, 1), 0x00, "header type 0, single function");
  assert.equal(rd(c, 0x2c), (0x0002 << 16) | 0x1af4);
  assert.equal(rd(c, 0x3d, 1), 1, "INTA");
  assert.equal(rd(c, 0x30), 0, "no expansion ROM");
  assert.equal(rd(c, 0x34, 1), 0, "no capabilities yet");
  assert.equal(rd(c, 0x06, 2) & PCI_STATUS.capabilities, 0);
});

test("identity defaults: revision, subsystem and pin default to 0", () => {
  const c = new PciConfig({ vendorId: 0x8086, deviceId: 0x7010, classCode: 0x010180 }, []);
  assert.equal(rd(c, 0x08, 1), 0);
  assert.equal(rd(c, 0x2c), 0);
  assert.equal(rd(c, 0x3d, 1), 0);
  for (let i = 0; i < 6; i++) assert.equal(rd(c, barReg(i)), 0);
});

test("read-only registers ignore writes of every size", () => {
  const c = make();
  const before = Array.from(c.bytes);
  for (const off of [0x00, 0x08, 0x28, 0x2c, 0x30, 0x34, 0x38, 0x3c]) {
    wr(c, off, 0xffff_ffff);
    wr(c, off, 0);
  }
  for (let off = 0; off < 0x40; off++) if (off < 0x10 || off >= 0x28) wr(c, off, 0xa5, 1);
  const after = Array.from(c.bytes);
  // Only the guest-writable bytes may differ: command, cache line, latency timer, interrupt line.
  for (let i = 0; i < 0x40; i++) {
    if ([0x04, 0x05, 0x0c, 0x0d, 0x3c].includes(i) || (i >= 0x10 && i < 0x28)) continue;
    assert.equal(after[i], before[i], `byte 0x${i.toString(16)} changed`);
  }
  assert.equal(rd(c, 0x3d, 1), 1, "interrupt pin is read-only");
});

test("cache line size, latency timer and interrupt line are read/write", () => {
  const c = make();
  wr(c, 0x0c, 0x10, 1);
  wr(c, 0x0d, 0x40, 1);
  wr(c, 0x3c, 0x0b, 1);
  assert.equal(rd(c, 0x0c, 1), 0x10);
  assert.equal(rd(c, 0x0d, 1), 0x40);
  assert.equal(rd(c, 0x3c, 1), 0x0b);
  // A dword write at 0x0c touches header type and BIST too: they stay.
  wr(c, 0x0c, 0xffff_2008);
  assert.equal(rd(c, 0x0c), 0x0000_2008);
});

test("accesses beyond config space: reads all-ones, writes ignored", () => {
  const c = make();
  assert.equal(rd(c, 0xfc, 4), 0);
  assert.equal(rd(c, 0xfe, 4), 0xffff_ffff);
  assert.equal(rd(c, 0x100, 2), 0xffff);
  assert.equal(rd(c, 0x100, 1), 0xff);
  assert.equal(rd(c, -1, 1), 0xff);
  const before = Array.from(c.bytes);
  wr(c, 0x100, 0xffff_ffff);
  wr(c, 0xfe, 0xffff_ffff);
  wr(c, -4, 0xffff_ffff);
  assert.deepEqual(Array.from(c.bytes), before);
});

// --- command / status -----------------------------------------------------------------------

test("command register: only I/O, memory, bus master and INTx disable are writable", () => {
  const c = make();
  assert.equal(rd(c, 0x04, 2), 0);
  wr(c, 0x04, 0xffff, 2);
  assert.equal(rd(c, 0x04, 2), PCI_COMMAND.io | PCI_COMMAND.memory | PCI_COMMAND.busMaster | PCI_COMMAND.intxDisable);
  assert.equal(c.command, 0x0407);
  assert.equal(c.ioEnabled && c.memoryEnabled && c.busMaster && c.intxDisabled, true);
  wr(c, 0x05, 0x00, 1);
  assert.equal(c.intxDisabled, false);
  assert.equal(c.busMaster, true);
  wr(c, 0x04, 0x00, 1);
  assert.equal(c.command, 0);
  assert.equal(c.ioEnabled || c.memoryEnabled || c.busMaster, false);
});

test("status register: writes never change it; interrupt bit follows setInterruptStatus", () => {
  const c = make();
  const s = rd(c, 0x06, 2);
  wr(c, 0x04, 0xffff_0006); // command + status in one dword
  assert.equal(rd(c, 0x06, 2), s);
  assert.equal(rd(c, 0x04, 2), 0x0006);
  c.setInterruptStatus(true);
  assert.equal(rd(c, 0x06, 2) & PCI_STATUS.interrupt, PCI_STATUS.interrupt);
  wr(c, 0x06, 0xffff, 2); // not write-one-to-clear: the device owns it
  assert.equal(rd(c, 0x06, 2) & PCI_STATUS.interrupt, PCI_STATUS.interrupt);
  c.setInterruptStatus(false);
  assert.equal(rd(c, 0x06, 2) & PCI_STATUS.interrupt, 0);
});

test("onCommandWrite fires on every command write; onMappingChanged only when I/O or memory decoding flips", () => {
  const c = make();
  let commandWrites = 0;
  let mappingChanges = 0;
  c.onCommandWrite = () => commandWrites++;
  c.onMappingChanged = () => mappingChanges++;
  wr(c, 0x04, PCI_COMMAND.busMaster, 2);
  assert.deepEqual([commandWrites, mappingChanges], [1, 0]);
  wr(c, 0x04, PCI_COMMAND.busMaster | PCI_COMMAND.memory, 2);
  assert.deepEqual([commandWrites, mappingChanges], [2, 1]);
  wr(c, 0x04, PCI_COMMAND.busMaster | PCI_COMMAND.memory, 2); // no change
  assert.deepEqual([commandWrites, mappingChanges], [3, 1]);
  wr(c, 0x05, 0x04, 1); // INTx disable byte only
  assert.deepEqual([commandWrites, mappingChanges], [4, 1]);
  wr(c, 0x04, 0x07, 4); // dword write covering command: io on
  assert.deepEqual([commandWrites, mappingChanges], [5, 2]);
  wr(c, 0x06, 0xffff, 2); // status only: not a command write
  wr(c, 0x0c, 0x10, 1);
  assert.deepEqual([commandWrites, mappingChanges], [5, 2]);
});

// --- BARs ---------------------------------------------------------------------------------

test("BAR registers show assigned addresses with their flag bits", () => {
  const c = make();
  c.assignBar(0, 0xc040);
  c.assignBar(1, 0xc000_1000);
  c.assignBar(2, 0x8_0000_4000);
  c.assignBar(5, 0xc000_2010);
  assert.equal(rd(c, barReg(0)), 0xc041, "io: bit 0 set");
  assert.equal(rd(c, barReg(1)), 0xc000_1000, "mmio32, not prefetchable");
  assert.equal(rd(c, barReg(2)), 0x0000_400c, "mmio64 low: type 10b, prefetchable");
  assert.equal(rd(c, barReg(4)), 0, "unimplemented BAR");
  assert.equal(rd(c, barReg(5)), 0xc000_2018, "mmio32 prefetchable");
  assert.equal(rd(c, barReg(0), 1), 0x41);
  assert.equal(rd(c, barReg(1) + 2, 2), 0xc000);
});

test("BAR sizing (Linux's sequence) finds every BAR's size and kind and restores the address", () => {
  const c = make();
  c.assignBar(0, 0xc040);
  c.assignBar(1, 0xc000_1000);
  c.assignBar(2, 0x8_0000_4000);
  c.assignBar(5, 0xc000_2010);
  const before = [0, 1, 2, 3, 4, 5].map((i) => rd(c, barReg(i)));
  assert.deepEqual(sizeBarLikeLinux(c, 0), { size: 32, flags: 0x1, is64: false });
  assert.deepEqual(sizeBarLikeLinux(c, 1), { size: 0x1000, flags: 0x0, is64: false });
  assert.deepEqual(sizeBarLikeLinux(c, 2), { size: 0x4000, flags: 0xc, is64: true });
  assert.deepEqual(sizeBarLikeLinux(c, 4), { size: 0, flags: 0, is64: false });
  assert.deepEqual(sizeBarLikeLinux(c, 5), { size: 16, flags: 0x8, is64: false });
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((i) => rd(c, barReg(i))), before);
  c.enableDecoding();
  assert.deepEqual([0, 1, 2, 5].map((i) => c.mappedAddress(i)), [0xc040, 0xc000_1000, 0x8_0000_4000, 0xc000_2010]);
});

test("BAR sizing read-backs: the size mask with the flag bits", () => {
  const c = make();
  wr(c, barReg(0), 0xffff_ffff);
  const io = rd(c, barReg(0));
  assert.equal(io & 0x3, 0x1, "io flag kept");
  assert.equal(io & 0xfffc, 0xffe0, "io size mask (upper 16 bits may be hardwired to 0)");
  assert.ok(io >>> 16 === 0 || io >>> 16 === 0xffff);
  wr(c, barReg(1), 0xffff_ffff);
  assert.equal(rd(c, barReg(1)), 0xffff_f000);
  wr(c, barReg(2), 0xffff_ffff);
  assert.equal(rd(c, barReg(2)), 0xffff_c00c);
  wr(c, barReg(5), 0xffff_ffff);
  assert.equal(rd(c, barReg(5)), 0xffff_fff8);
  wr(c, barReg(4), 0xffff_ffff);
  assert.equal(rd(c, barReg(4)), 0, "unimplemented BAR reads 0 after all-ones");
  // Sizing with the flag bits clear (write ~flags) is the same to the device.
  const d = make();
  wr(d, barReg(1), 0xffff_fff0);
  assert.equal(rd(d, barReg(1)), 0xffff_f000);
});

test("largest BARs: 256-byte io, 2 GiB mmio32 and mmio64", () => {
  const c = new PciConfig(IDENTITY, [
    { index: 0, kind: "io", size: 256 },
    { index: 1, kind: "mmio32", size: 2 ** 31 },
    { index: 2, kind: "mmio64", size: 2 ** 31 },
  ]);
  assert.equal(sizeBarLikeLinux(c, 0).size, 256);
  assert.equal(sizeBarLikeLinux(c, 1).size, 2 ** 31);
  assert.equal(sizeBarLikeLinux(c, 2).size, 2 ** 31);
  c.assignBar(2, 2 ** 40);
  c.enableDecoding();
  assert.equal(c.mappedAddress(2), 2 ** 40);
});

test("BAR address writes drop bits below the size; io BAR decodes 16 bits", () => {
  const c = make();
  wr(c, barReg(1), 0xc000_1fff);
  assert.equal(rd(c, barReg(1)), 0xc000_1000);
  wr(c, barReg(0), 0x0001_c05f);
  assert.equal(rd(c, barReg(0)), 0xc041);
  wr(c, barReg(5), 0xd000_001f);
  assert.equal(rd(c, barReg(5)), 0xd000_0018);
  wr(c, barReg(2), 0x1234_5678);
  assert.equal(rd(c, barReg(2)), 0x1234_400c);
  c.enableDecoding();
  assert.equal(c.mappedAddress(2), 0x1234_4000);
  assert.equal(c.mappedAddress(0), 0xc040);
});

test("partial (byte and word) BAR writes merge into the address", () => {
  const c = make();
  c.assignBar(1, 0xc000_0000);
  wr(c, barReg(1) + 1, 0x20, 1); // bits 8..15
  assert.equal(rd(c, barReg(1)), 0xc000_2000);
  wr(c, barReg(1) + 2, 0xd012, 2); // bits 16..31
  assert.equal(rd(c, barReg(1)), 0xd012_2000);
  wr(c, barReg(1) + 3, 0xe0, 1);
  assert.equal(rd(c, barReg(1)), 0xe012_2000);
  wr(c, barReg(1), 0xff, 1); // bits below the size and the flags: no effect
  assert.equal(rd(c, barReg(1)), 0xe012_2000);
  wr(c, barReg(1), 0xffff, 2); // bits 12..15 are address bits
  assert.equal(rd(c, barReg(1)), 0xe012_f000);

  c.assignBar(0, 0xc000);
  wr(c, barReg(0), 0xe0a1, 2);
  assert.equal(rd(c, barReg(0)), 0xe0a1);
  wr(c, barReg(0) + 1, 0x12, 1);
  assert.equal(rd(c, barReg(0)), 0x12a1);

  c.assignBar(2, 0);
  wr(c, barReg(2) + 2, 0x8000, 2);
  wr(c, barReg(2) + 1, 0x40, 1);
  c.enableDecoding();
  assert.equal(c.mappedAddress(2), 0x8000_4000);
  assert.equal(rd(c, barReg(2)), 0x8000_400c);
});

// The two tests below fail against pci-config.ts as of commit 54beadf (bugs reported to the lead):
// (1) the constructor never records a 64-bit BAR's upper half (`bars[index + 1]`), so the
//     upper dword register reads 0 and ignores writes; (2) writing the upper dword rewrites
//     the lower dword register from the stored address, losing a pending size read-back.

test("BUG (PCI 3.0 6.2.5.1): the upper dword of a 64-bit BAR holds the address bits 32..63 and sizes as all-ones", () => {
  const c = make();
  let changes = 0;
  c.onMappingChanged = () => changes++;
  c.assignBar(2, 0x8_0000_4000);
  assert.equal(rd(c, barReg(3)), 0x8, "firmware-assigned address above 4 GiB visible to the guest");
  wr(c, barReg(3), 0xffff_ffff);
  assert.equal(rd(c, barReg(3)), 0xffff_ffff, "sizes below 4 GiB: the upper dword sizes as all ones");
  wr(c, barReg(3), 0x8);
  assert.equal(rd(c, barReg(3)), 0x8, "restored");
  wr(c, barReg(3), 0xab);
  assert.equal(rd(c, barReg(3)), 0xab);
  wr(c, barReg(3) + 1, 0x01, 1);
  assert.equal(rd(c, barReg(3)), 0x1ab, "byte write into the upper dword");
  c.enableDecoding();
  assert.equal(c.mappedAddress(2), 0x1ab_0000_4000, "the guest moves the BAR above 4 GiB");
  assert.ok(changes >= 3, "onMappingChanged fires for upper-dword moves");
});

test("BUG (PCI 3.0 6.2.5.1): writing ~0 to both dwords of a 64-bit BAR, then reading both, gives the 64-bit size mask", () => {
  // "Software writes 0FFFFFFFFh to both registers, reads them back, and combines the result
  // into a 64-bit value" (FreeBSD's pci_read_bar does exactly this, in this order).
  const c = make();
  c.assignBar(2, 0x8_0000_4000);
  wr(c, barReg(2), 0xffff_ffff);
  wr(c, barReg(3), 0xffff_ffff);
  const high = rd(c, barReg(3));
  const low = rd(c, barReg(2));
  assert.equal(low, 0xffff_c00c, "writing the upper dword must not change the lower dword register");
  assert.equal(high, 0xffff_ffff);
});

test("writes to unimplemented BARs are ignored", () => {
  const c = make();
  let changes = 0;
  c.onMappingChanged = () => changes++;
  wr(c, barReg(4), 0xdead_beef);
  wr(c, barReg(4) + 2, 0xffff, 2);
  assert.equal(rd(c, barReg(4)), 0);
  assert.equal(changes, 0);
});

test("mappedAddress honours the command register and address 0", () => {
  const c = make();
  c.assignBar(0, 0xc040);
  c.assignBar(1, 0xc000_1000);
  c.assignBar(2, 0x8_0000_4000);
  assert.deepEqual([0, 1, 2, 3, 4, 5].map((i) => c.mappedAddress(i)), [undefined, undefined, undefined, undefined, undefined, undefined]);
  wr(c, 0x04, PCI_COMMAND.memory, 2);
  assert.deepEqual([c.mappedAddress(0), c.mappedAddress(1), c.mappedAddress(2)], [undefined, 0xc000_1000, 0x8_0000_4000]);
  assert.equal(c.mappedAddress(3), undefined, "upper half of a 64-bit BAR is not a BAR of its own");
  assert.equal(c.mappedAddress(5), undefined, "never assigned: address 0 does not decode");
  wr(c, 0x04, PCI_COMMAND.io, 2);
  assert.deepEqual([c.mappedAddress(0), c.mappedAddress(1), c.mappedAddress(2)], [0xc040, undefined, undefined]);
  wr(c, 0x04, 0, 2);
  assert.equal(c.mappedAddress(0), undefined);
  assert.equal(c.mappedAddress(6), undefined);
  assert.equal(c.mappedAddress(-1), undefined);
});

test("enableDecoding turns on the spaces the BARs use, plus bus mastering", () => {
  const memOnly = new PciConfig(IDENTITY, [{ index: 0, kind: "mmio32", size: 0x1000 }]);
  memOnly.enableDecoding();
  assert.equal(memOnly.command, PCI_COMMAND.memory | PCI_COMMAND.busMaster);
  const ioOnly = new PciConfig(IDENTITY, [{ index: 4, kind: "io", size: 16 }]);
  ioOnly.enableDecoding();
  assert.equal(ioOnly.command, PCI_COMMAND.io | PCI_COMMAND.busMaster);
  const both = make();
  wr(both, 0x04, PCI_COMMAND.intxDisable, 2);
  both.enableDecoding();
  assert.equal(both.command, PCI_COMMAND.io | PCI_COMMAND.memory | PCI_COMMAND.busMaster | PCI_COMMAND.intxDisable);
});

test("assignBar refuses misaligned addresses and undeclared BARs", () => {
  const c = make();
  const code = (e: unknown): boolean => e instanceof PciDeviceError && e.code === "PCI_BAD_BAR";
  assert.throws(() => c.assignBar(1, 0xc000_0800), code);
  assert.throws(() => c.assignBar(0, 0xc010), code);
  assert.throws(() => c.assignBar(2, 0x8_0000_2000), code);
  assert.throws(() => c.assignBar(3, 0x1000_0000), code, "upper half of a 64-bit BAR");
  assert.throws(() => c.assignBar(4, 0x1000), code, "not declared");
  assert.throws(() => c.assignBar(7, 0x1000), code);
  c.assignBar(1, 0xc000_1000);
  assert.equal(rd(c, barReg(1)), 0xc000_1000);
});

test("constructor rejects impossible BAR declarations", () => {
  const bad: PciBarSpec[][] = [
    [{ index: 6, kind: "mmio32", size: 0x1000 }],
    [{ index: -1, kind: "io", size: 16 }],
    [{ index: 1.5, kind: "io", size: 16 }],
    [{ index: 5, kind: "mmio64", size: 0x1000 }],
    [{ index: 0, kind: "mmio32", size: 8 }],
    [{ index: 0, kind: "mmio32", size: 0x1800 }],
    [{ index: 0, kind: "io", size: 2 }],
    [{ index: 0, kind: "io", size: 512 }],
    [{ index: 0, kind: "mmio32", size: 2 ** 32 }],
    [
      { index: 0, kind: "io", size: 16 },
      { index: 0, kind: "mmio32", size: 16 },
    ],
    [
      { index: 2, kind: "mmio64", size: 0x1000 },
      { index: 3, kind: "mmio32", size: 0x1000 },
    ],
    [
      { index: 3, kind: "mmio32", size: 0x1000 },
      { index: 2, kind: "mmio64", size: 0x1000 },
    ],
  ];
  for (const bars of bad) assert.throws(() => new PciConfig(IDENTITY, bars), PciDeviceError, JSON.stringify(bars));
});

test("bar() and barSpecs() describe the declared BARs", () => {
  const c = make();
  assert.deepEqual(c.barSpecs().map((b) => b.index), [0, 1, 2, 5]);
  assert.equal(c.bar(2)?.kind, "mmio64");
  assert.notEqual(c.bar(3)?.kind, "mmio32", "the upper half of BAR 2 is no BAR of its own");
  assert.equal(c.bar(4), undefined);
});

test("onMappingChanged fires when a BAR address changes, not for rewrites of the same address", () => {
  const c = make();
  c.assignBar(1, 0xc000_1000);
  let changes = 0;
  c.onMappingChanged = () => changes++;
  wr(c, barReg(1), 0xc000_1000);
  assert.equal(changes, 0);
  wr(c, barReg(1), 0xc000_2000);
  assert.equal(changes, 1);
  wr(c, barReg(1), 0xffff_ffff); // sizing moves it out of the way
  assert.equal(changes, 2);
  wr(c, barReg(1), 0xc000_2000); // restore
  assert.equal(changes, 3);
  wr(c, barReg(2), 0xd000_0000); // 64-bit BAR, low dword
  assert.equal(changes, 4);
  c.assignBar(5, 0xc000_3000); // firmware assignment does not notify
  assert.equal(changes, 4);
});

test("resetRegisters: command, status and BAR addresses back to power-on; capability layout kept", () => {
  const c = make();
  c.addCapability(PCI_CAP_ID.vendor, new Uint8Array(6));
  c.assignBar(1, 0xc000_1000);
  c.enableDecoding();
  c.setInterruptStatus(true);
  c.resetRegisters();
  assert.equal(c.command, 0);
  assert.equal(rd(c, 0x06, 2), PCI_STATUS.capabilities);
  assert.equal(rd(c, barReg(1)), 0);
  assert.equal(rd(c, barReg(2)), 0xc, "flag bits survive");
  assert.equal(rd(c, barReg(0)), 0x1);
  assert.equal(rd(c, 0x34, 1), 0x40);
  assert.equal(rd(c, 0x40, 1), PCI_CAP_ID.vendor);
  assert.equal(rd(c, 0x00), (0x1042 << 16) | 0x1af4);
});

test("saveRegisters is plain data", () => {
  const c = make();
  c.assignBar(2, 0x8_0000_4000);
  const s = c.saveRegisters();
  assert.deepEqual(structuredClone(s), s);
  assert.equal(s.bytes.length, 256);
  assert.equal(s.barAddress[2], 0x8_0000_4000);
});

// --- capabilities ---------------------------------------------------------------------------

/** Walk the capability list the way Linux does (with a TTL), returning [offset, id] pairs. */
function walkCapabilities(c: PciConfig): [number, number][] {
  const out: [number, number][] = [];
  if ((rd(c, 0x06, 2) & PCI_STATUS.capabilities) === 0) return out;
  let pos = rd(c, 0x34, 1);
  for (let ttl = 48; ttl > 0 && pos >= 0x40; ttl--) {
    pos &= ~3;
    const id = rd(c, pos, 1);
    if (id === 0xff) break;
    out.push([pos, id]);
    pos = rd(c, pos + 1, 1);
  }
  return out;
}

test("capability list: 0x34, status bit, dword-aligned chaining, last next pointer 0", () => {
  const c = make();
  const a = c.addCapability(PCI_CAP_ID.vendor, Uint8Array.of(7, 1, 2, 3, 4)); // 7 bytes
  const b = c.addCapability(PCI_CAP_ID.msix, new Uint8Array(10));
  const d = c.addCapability(PCI_CAP_ID.pciExpress, new Uint8Array(1));
  assert.equal(a, 0x40);
  assert.equal(b, 0x48, "next capability dword aligned");
  assert.equal(d, 0x54);
  assert.equal(rd(c, 0x34, 1), 0x40);
  assert.equal(rd(c, 0x06, 2) & PCI_STATUS.capabilities, PCI_STATUS.capabilities);
  assert.deepEqual(walkCapabilities(c), [
    [0x40, PCI_CAP_ID.vendor],
    [0x48, PCI_CAP_ID.msix],
    [0x54, PCI_CAP_ID.pciExpress],
  ]);
  assert.equal(rd(c, 0x55, 1), 0, "last next pointer");
  assert.deepEqual([rd(c, 0x42, 1), rd(c, 0x43, 1), rd(c, 0x46, 1)], [7, 1, 4]);
  // Id and next bytes are read-only.
  wr(c, 0x40, 0xffff, 2);
  wr(c, 0x48, 0, 4);
  assert.deepEqual(walkCapabilities(c).map(([, id]) => id), [PCI_CAP_ID.vendor, PCI_CAP_ID.msix, PCI_CAP_ID.pciExpress]);
});

test("capability bodies: only the writable mask's bits change; onWrite sees the capability offset", () => {
  const c = make();
  const seen: [number, number][] = [];
  const at = c.addCapability(PCI_CAP_ID.vendor, Uint8Array.of(0x11, 0x22, 0x33, 0x44), Uint8Array.of(0x00, 0xff, 0x0f, 0x00), (o, s) =>
    seen.push([o, s]),
  );
  wr(c, at + 2, 0xaaaa_aaaa);
  assert.deepEqual([rd(c, at + 2, 1), rd(c, at + 3, 1), rd(c, at + 4, 1), rd(c, at + 5, 1)], [0x11, 0xaa, 0x3a, 0x44]);
  wr(c, at + 4, 0x05, 1);
  assert.equal(rd(c, at + 4, 1), 0x35);
  assert.deepEqual(seen, [
    [2, 4],
    [4, 1],
  ]);
  wr(c, 0x3c, 0x0, 4); // dword before the capability: no callback
  assert.equal(seen.length, 2);
});

test("a full configuration space refuses another capability", () => {
  const c = make();
  c.addCapability(PCI_CAP_ID.vendor, new Uint8Array(180));
  assert.throws(
    () => c.addCapability(PCI_CAP_ID.vendor, new Uint8Array(32)),
    (e: unknown) => e instanceof PciDeviceError && e.code === "PCI_CONFIG_FULL",
  );
  c.addCapability(PCI_CAP_ID.vendor, new Uint8Array(6)); // 0xf8..0xff still fits
  assert.equal(walkCapabilities(c).length, 2);
});
