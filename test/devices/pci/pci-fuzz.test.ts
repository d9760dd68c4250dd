/**
 * Seeded fuzz of a PCI function's config space and MSI-X table: 100,000 random
 * config writes (aligned, misaligned, out of range), config reads, table and
 * PBA accesses, notifications and resets. Nothing may throw, the read-only
 * identity and capability structure may never change, BAR flag bits stay, a
 * decoded BAR is always aligned to its size, and only real vectors signal.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { PciConfig, PCI_CAP_ID, type PciBarSpec } from "../../../src/devices/pci/pci-config.js";
import { MsixTable, type MsiSink } from "../../../src/devices/pci/msix.js";
import { SeededRandom } from "../device-fakes.js";

const VECTORS = 5;
const BARS: PciBarSpec[] = [
  { index: 0, kind: "io", size: 64 },
  { index: 1, kind: "mmio32", size: 0x4000 },
  { index: 2, kind: "mmio64", size: 0x10000, prefetchable: true },
  { index: 5, kind: "mmio32", size: 16, prefetchable: true },
];

class CountingSink implements MsiSink {
  count = 0;
  badVector = 0;
  signal(_address: number, _addressHigh: number, _data: number, vector: number): void {
    this.count++;
    if (!Number.isInteger(vector) || vector < 0 || vector >= VECTORS) this.badVector++;
  }
}

function value(r: SeededRandom): number {
  switch (r.int(6)) {
    case 0:
      return 0;
    case 1:
      return 0xffff_ffff;
    case 2:
      return (1 << r.int(32)) >>> 0;
    case 3:
      return r.int(0x100);
    default:
      return r.int(2 ** 32);
  }
}

function run(seed: number, steps: number): void {
  const r = new SeededRandom(seed);
  const pci = new PciConfig(
    { vendorId: 0x1af4, deviceId: 0x1041, classCode: 0x020000, revision: 1, subsystemVendorId: 0x1af4, subsystemId: 1, interruptPin: 1 },
    BARS,
  );
  const vendorCap = pci.addCapability(PCI_CAP_ID.vendor, Uint8Array.of(14, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13), Uint8Array.of(0, 0, 0xff, 0xff));
  const sink = new CountingSink();
  const msix = new MsixTable(pci, { vectors: VECTORS, tableBar: 1, tableOffset: 0, pbaBar: 1, pbaOffset: 0x2000 }, sink);
  const cap = msix.capOffset;
  let mappingChanges = 0;
  pci.onMappingChanged = () => {
    mappingChanges++;
    for (let i = 0; i < 6; i++) pci.mappedAddress(i); // what the board does: must not throw
  };
  pci.assignBar(0, 0xc000);
  pci.assignBar(1, 0xc000_0000);
  pci.assignBar(2, 0x10_0000_0000);
  pci.enableDecoding();

  // Read-only bytes: identity, header type, subsystem, pin, capability pointer, capability ids/next, MSI-X table size and BIRs.
  const readOnly = [0x00, 0x01, 0x02, 0x03, 0x08, 0x09, 0x0a, 0x0b, 0x0e, 0x2c, 0x2d, 0x2e, 0x2f, 0x34, 0x3d, vendorCap, vendorCap + 1, vendorCap + 2];
  for (let i = 0; i < 10; i++) readOnly.push(cap + i);
  const expected = readOnly.map((o) => (o === cap + 3 ? pci.bytes[o]! & 0x3f : pci.bytes[o]!));
  const check = (step: number): void => {
    for (let k = 0; k < readOnly.length; k++) {
      const o = readOnly[k]!;
      const got = o === cap + 3 ? pci.bytes[o]! & 0x3f : pci.bytes[o]!;
      if (got !== expected[k]) assert.fail(`step ${step}: read-only byte 0x${o.toString(16)} changed to 0x${got.toString(16)}`);
    }
    const status = pci.configRead(0x06, 2);
    if ((status & ~0x18) !== 0 || (status & 0x10) === 0) assert.fail(`step ${step}: status 0x${status.toString(16)}`);
    if ((pci.command & ~0x0407) !== 0) assert.fail(`step ${step}: command 0x${pci.command.toString(16)}`);
    const b0 = pci.configRead(0x10, 4);
    const b1 = pci.configRead(0x14, 4);
    const b2 = pci.configRead(0x18, 4);
    const b4 = pci.configRead(0x20, 4);
    const b5 = pci.configRead(0x24, 4);
    if ((b0 & 3) !== 1 || (b1 & 0xf) !== 0 || (b2 & 0xf) !== 0xc || b4 !== 0 || (b5 & 0xf) !== 8)
      assert.fail(`step ${step}: BAR flags ${[b0, b1, b2, b4, b5].map((v) => v.toString(16)).join(",")}`);
    for (const b of BARS) {
      const a = pci.mappedAddress(b.index);
      if (a === undefined) continue;
      if (!Number.isInteger(a) || a <= 0 || a % b.size !== 0) assert.fail(`step ${step}: BAR ${b.index} decodes at ${a}`);
      if (b.kind === "io" && a > 0xffff) assert.fail(`step ${step}: io BAR at 0x${a.toString(16)}`);
      if (b.kind === "mmio32" && a >= 2 ** 32) assert.fail(`step ${step}: mmio32 BAR at 0x${a.toString(16)}`);
    }
    if ((msix.pending[0]! & ~((1 << VECTORS) - 1)) !== 0) assert.fail(`step ${step}: pending bit beyond the table`);
    for (let v = 0; v < VECTORS; v++) if ((msix.table[v * 16 + 12]! & ~1) !== 0 || msix.tableRead(v * 16 + 12, 4) > 1) assert.fail(`step ${step}: vector control`);
  };

  const sizes = [1, 2, 4] as const;
  for (let step = 0; step < steps; step++) {
    const size = r.pick(sizes);
    const op = r.int(100);
    if (op < 45) {
      // Aligned config write; biased towards the header, the BARs and the capabilities.
      const region = r.int(4);
      const base = region === 0 ? 0x04 : region === 1 ? 0x10 : region === 2 ? cap : r.int(256);
      const off = Math.min(252, base + r.int(16)) & ~(size - 1);
      pci.configWrite(off, size, value(r));
    } else if (op < 55) {
      pci.configWrite(r.int(280) - 12, size, value(r)); // misaligned or out of range
    } else if (op < 65) {
      const off = r.int(280) - 12;
      const v = pci.configRead(off, size);
      if (!Number.isInteger(v) || v < 0 || v >= 2 ** (8 * size)) assert.fail(`step ${step}: read 0x${off.toString(16)}/${size} gave ${v}`);
    } else if (op < 82) {
      const off = r.int(msix.tableBytes + 16) - 8;
      if (r.int(3) === 0) {
        const v = msix.tableRead(off, size);
        if (!Number.isInteger(v) || v < 0 || v >= 2 ** (8 * size)) assert.fail(`step ${step}: table read gave ${v}`);
      } else {
        // Mostly valid messages so that deliveries happen.
        const field = off & 15;
        msix.tableWrite(off, size, field === 0 && r.int(2) === 0 ? 0xfee0_0000 : field === 12 ? r.int(2) : value(r));
      }
    } else if (op < 85) {
      const v = msix.pbaRead(r.int(msix.pbaBytes + 8) - 4, size);
      if (!Number.isInteger(v) || v < 0 || v >= 2 ** (8 * size)) assert.fail(`step ${step}: PBA read gave ${v}`);
    } else if (op < 97) {
      const vector = r.int(VECTORS + 4) - 2;
      const ok = msix.notify(vector);
      if (ok && (vector < 0 || vector >= VECTORS)) assert.fail(`step ${step}: notify(${vector}) accepted`);
    } else if (op < 98) {
      pci.setInterruptStatus(r.int(2) === 0);
    } else if (op < 99) {
      msix.reset();
    } else {
      pci.resetRegisters();
      msix.reset();
      pci.assignBar(1, 0xc000_0000);
    }
    check(step);
  }
  assert.equal(sink.badVector, 0);
  assert.ok(sink.count > 0, "some messages were delivered");
  assert.ok(mappingChanges > 0, "BAR and command writes moved mappings");
}

test("fuzz: 100,000 random config-space and MSI-X accesses (seed 1)", () => {
  run(1, 100_000);
});

test("fuzz: a second seed, shorter", () => {
  run(0xc0ffee, 20_000);
});
