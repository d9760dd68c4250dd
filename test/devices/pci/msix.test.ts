/**
 * MsixTable (PCI Local Bus spec 3.0, 6.8.2): the capability through config
 * space, the vector table and the PBA through their BAR accessors, delivery
 * through a recording MsiSink.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { PCI_CAP_ID, PCI_STATUS, PciConfig, PciDeviceError } from "../../../src/devices/pci/pci-config.js";
import { MsixTable, type MsiSink, type MsixLayout } from "../../../src/devices/pci/msix.js";

class RecordingMsiSink implements MsiSink {
  readonly messages: { address: number; addressHigh: number; data: number; vector: number }[] = [];
  signal(address: number, addressHigh: number, data: number, vector: number): void {
    this.messages.push({ address, addressHigh, data, vector });
  }
}

const ENABLE = 0x8000;
const FUNCTION_MASK = 0x4000;

function make(layout: Partial<MsixLayout> = {}) {
  const pci = new PciConfig({ vendorId: 0x1af4, deviceId: 0x1041, classCode: 0x020000 }, [
    { index: 1, kind: "mmio32", size: 0x4000 },
    { index: 4, kind: "mmio64", size: 0x1000 },
  ]);
  const sink = new RecordingMsiSink();
  const msix = new MsixTable(pci, { vectors: 3, tableBar: 1, tableOffset: 0, pbaBar: 1, pbaOffset: 0x2000, ...layout }, sink);
  const cap = msix.capOffset;
  const control = (): number => pci.configRead(cap + 2, 2);
  const setControl = (v: number): void => pci.configWrite(cap + 2, 2, v);
  /** Program vector `v` like Linux: address, upper address, data, then unmask. */
  const program = (v: number, address: number, data: number, addressHigh = 0): void => {
    msix.tableWrite(v * 16, 4, address);
    msix.tableWrite(v * 16 + 4, 4, addressHigh);
    msix.tableWrite(v * 16 + 8, 4, data);
  };
  const unmask = (v: number): void => msix.tableWrite(v * 16 + 12, 4, 0);
  const mask = (v: number): void => msix.tableWrite(v * 16 + 12, 4, 1);
  return { pci, sink, msix, cap, control, setControl, program, unmask, mask };
}

test("capability: id, table size, table and PBA offset/BIR; capabilities bit and pointer", () => {
  const { pci, cap, msix } = make({ vectors: 5, tableBar: 4, tableOffset: 0x800, pbaBar: 1, pbaOffset: 0x3000 });
  assert.equal(pci.configRead(0x34, 1), cap);
  assert.equal(pci.configRead(0x06, 2) & PCI_STATUS.capabilities, PCI_STATUS.capabilities);
  assert.equal(pci.configRead(cap, 1), PCI_CAP_ID.msix);
  assert.equal(pci.configRead(cap + 1, 1), 0, "only capability");
  assert.equal(pci.configRead(cap + 2, 2), 4, "table size N-1, disabled, unmasked");
  assert.equal(pci.configRead(cap + 4, 4), 0x800 | 4);
  assert.equal(pci.configRead(cap + 8, 4), 0x3000 | 1);
  assert.equal(msix.tableBytes, 5 * 16);
  assert.equal(msix.pbaBytes, 8);
});

test("layout validation", () => {
  const pci = new PciConfig({ vendorId: 1, deviceId: 2, classCode: 0 }, [{ index: 0, kind: "mmio32", size: 0x1000 }]);
  const sink = new RecordingMsiSink();
  const code = (e: unknown): boolean => e instanceof PciDeviceError && e.code === "MSIX_BAD_LAYOUT";
  for (const vectors of [0, 2049, 1.5, -1]) assert.throws(() => new MsixTable(pci, { vectors, tableBar: 0, tableOffset: 0, pbaBar: 0, pbaOffset: 0x800 }, sink), code);
  assert.throws(() => new MsixTable(pci, { vectors: 1, tableBar: 0, tableOffset: 4, pbaBar: 0, pbaOffset: 0x800 }, sink), code);
  assert.throws(() => new MsixTable(pci, { vectors: 1, tableBar: 0, tableOffset: 0, pbaBar: 0, pbaOffset: 0x804 }, sink), code);
  const big = new MsixTable(pci, { vectors: 2048, tableBar: 0, tableOffset: 0, pbaBar: 0, pbaOffset: 0x8000 }, sink);
  assert.equal(pci.configRead(big.capOffset + 2, 2), 2047);
  assert.equal(big.pbaBytes, 256);
});

test("message control: only enable and function mask are writable", () => {
  const { control, setControl, msix } = make();
  setControl(0xffff);
  assert.equal(control(), ENABLE | FUNCTION_MASK | 2);
  assert.equal(msix.enabled, true);
  assert.equal(msix.functionMasked, true);
  setControl(ENABLE);
  assert.deepEqual([msix.enabled, msix.functionMasked], [true, false]);
  setControl(0);
  assert.deepEqual([msix.enabled, msix.functionMasked], [false, false]);
  assert.equal(control(), 2);
});

test("table and BIR registers are read-only", () => {
  const { pci, cap } = make();
  const before = [pci.configRead(cap, 4), pci.configRead(cap + 4, 4), pci.configRead(cap + 8, 4)];
  pci.configWrite(cap, 4, 0xffff_ffff);
  pci.configWrite(cap + 4, 4, 0xffff_ffff);
  pci.configWrite(cap + 8, 4, 0);
  assert.equal(pci.configRead(cap, 2), before[0]! & 0xffff);
  assert.equal(pci.configRead(cap + 4, 4), before[1]);
  assert.equal(pci.configRead(cap + 8, 4), before[2]);
});

test("every entry starts masked with a zero message; reserved vector-control bits read 0", () => {
  const { msix } = make();
  for (let v = 0; v < 3; v++) {
    assert.equal(msix.tableRead(v * 16, 4), 0);
    assert.equal(msix.tableRead(v * 16 + 4, 4), 0);
    assert.equal(msix.tableRead(v * 16 + 8, 4), 0);
    assert.equal(msix.tableRead(v * 16 + 12, 4), 1);
  }
  msix.tableWrite(12, 4, 0xffff_fffe);
  assert.equal(msix.tableRead(12, 4), 0, "only the mask bit is implemented");
  msix.tableWrite(12, 4, 0xffff_ffff);
  assert.equal(msix.tableRead(12, 4), 1);
  msix.tableWrite(13, 1, 0xff);
  assert.equal(msix.tableRead(12, 4), 1);
  assert.equal(msix.pbaRead(0, 4), 0);
});

test("table accepts dword, word and byte accesses; an 8-byte write arrives as two dwords", () => {
  const { msix } = make();
  msix.tableWrite(16, 4, 0xfee0_1000);
  msix.tableWrite(20, 4, 0x1);
  assert.equal(msix.tableRead(16, 4), 0xfee0_1000);
  assert.equal(msix.tableRead(18, 2), 0xfee0);
  assert.equal(msix.tableRead(17, 1), 0x10);
  msix.tableWrite(24, 2, 0x4041);
  msix.tableWrite(26, 1, 0x07);
  assert.equal(msix.tableRead(24, 4), 0x0007_4041);
  assert.deepEqual(msix.message(1), { address: 0xfee0_1000, addressHigh: 1, data: 0x0007_4041 });
});

test("out-of-range table and PBA accesses read 0 and are ignored", () => {
  const { msix } = make();
  const before = Array.from(msix.table);
  assert.equal(msix.tableRead(48, 4), 0);
  assert.equal(msix.tableRead(46, 4), 0);
  assert.equal(msix.tableRead(-4, 4), 0);
  msix.tableWrite(48, 4, 0xffff_ffff);
  msix.tableWrite(47, 2, 0xffff);
  msix.tableWrite(-1, 1, 0xff);
  assert.deepEqual(Array.from(msix.table), before);
  assert.equal(msix.pbaRead(8, 4), 0);
  assert.equal(msix.pbaRead(6, 4), 0);
  assert.equal(msix.pbaRead(-1, 1), 0);
});

test("notify: disabled MSI-X returns false and neither signals nor sets pending", () => {
  const { msix, sink, program, unmask } = make();
  program(0, 0xfee0_0000, 0x41);
  unmask(0);
  assert.equal(msix.notify(0), false);
  assert.equal(sink.messages.length, 0);
  assert.equal(msix.pbaRead(0, 4), 0);
});

test("notify: an enabled, unmasked, programmed vector signals its message", () => {
  const { msix, sink, program, unmask, setControl } = make();
  setControl(ENABLE);
  program(2, 0xfee0_2000, 0x4052, 0x7);
  unmask(2);
  assert.equal(msix.notify(2), true);
  assert.equal(msix.notify(2), true);
  assert.deepEqual(sink.messages, [
    { address: 0xfee0_2000, addressHigh: 7, data: 0x4052, vector: 2 },
    { address: 0xfee0_2000, addressHigh: 7, data: 0x4052, vector: 2 },
  ]);
  assert.equal(msix.pbaRead(0, 1), 0);
});

test("notify on a masked entry sets its pending bit; unmasking delivers it once and clears the bit", () => {
  const { msix, sink, program, unmask, mask, setControl } = make();
  setControl(ENABLE);
  program(1, 0xfee0_0000, 0x31);
  assert.equal(msix.notify(1), true);
  assert.equal(msix.notify(1), true);
  assert.equal(sink.messages.length, 0);
  assert.equal(msix.pbaRead(0, 1), 0b010);
  assert.equal(msix.pbaRead(0, 4), 0b010);
  unmask(1);
  assert.deepEqual(sink.messages, [{ address: 0xfee0_0000, addressHigh: 0, data: 0x31, vector: 1 }], "pending events collapse into one message");
  assert.equal(msix.pbaRead(0, 1), 0);
  unmask(1); // already unmasked: nothing more
  assert.equal(sink.messages.length, 1);
  mask(1);
  unmask(1); // nothing pending
  assert.equal(sink.messages.length, 1);
});

test("function mask: notify sets pending; clearing the function mask delivers every pending unmasked vector", () => {
  const { msix, sink, program, unmask, setControl } = make();
  setControl(ENABLE | FUNCTION_MASK);
  for (let v = 0; v < 3; v++) {
    program(v, 0xfee0_0000, 0x40 + v);
    unmask(v);
  }
  msix.tableWrite(2 * 16 + 12, 4, 1); // vector 2 masked by its entry as well
  for (let v = 0; v < 3; v++) assert.equal(msix.notify(v), true);
  assert.equal(sink.messages.length, 0);
  assert.equal(msix.pbaRead(0, 1), 0b111);
  unmask(0); // entry was already unmasked; the function mask still holds
  assert.equal(sink.messages.length, 0);
  setControl(ENABLE);
  assert.deepEqual(sink.messages.map((m) => [m.vector, m.data]), [
    [0, 0x40],
    [1, 0x41],
  ]);
  assert.equal(msix.pbaRead(0, 1), 0b100, "vector 2 stays pending behind its entry mask");
  unmask(2);
  assert.deepEqual(sink.messages.map((m) => m.vector), [0, 1, 2]);
  assert.equal(msix.pbaRead(0, 1), 0);
});

test("pending bits wait while MSI-X is disabled and go out when it is enabled again", () => {
  const { msix, sink, program, unmask, setControl } = make();
  setControl(ENABLE | FUNCTION_MASK);
  program(0, 0xfee0_0000, 0x41);
  unmask(0);
  msix.notify(0);
  setControl(FUNCTION_MASK); // disable
  setControl(0); // unmask function while disabled: not allowed to send
  assert.equal(sink.messages.length, 0);
  assert.equal(msix.pbaRead(0, 1), 1);
  setControl(ENABLE);
  assert.equal(sink.messages.length, 1);
  assert.equal(msix.pbaRead(0, 1), 0);
});

test("out-of-range and non-integer vectors are ignored", () => {
  const { msix, sink, program, unmask, setControl } = make();
  setControl(ENABLE);
  program(0, 0xfee0_0000, 0x41);
  unmask(0);
  for (const v of [3, 0xffff, -1, 0.5, Number.NaN, Infinity]) assert.equal(msix.notify(v), false, String(v));
  assert.equal(sink.messages.length, 0);
  assert.equal(msix.pbaRead(0, 4), 0);
});

test("an unmasked entry with address 0 sends nothing (never programmed)", () => {
  const { msix, sink, unmask, setControl } = make();
  setControl(ENABLE);
  unmask(0);
  assert.equal(msix.notify(0), true);
  assert.equal(sink.messages.length, 0);
});

test("PBA bits for vectors beyond the first qword", () => {
  const { msix, setControl } = make({ vectors: 70, pbaOffset: 0x2000 });
  assert.equal(msix.pbaBytes, 16);
  setControl(ENABLE);
  msix.notify(69);
  msix.notify(64);
  msix.notify(7);
  assert.equal(msix.pbaRead(0, 1), 0x80);
  assert.equal(msix.pbaRead(8, 1), 0b0010_0001);
  assert.equal(msix.pbaRead(8, 2), 0b0010_0001);
  assert.equal(msix.pbaRead(4, 4), 0);
});

test("message(): the programmed address and data of a vector", () => {
  const { msix, program } = make();
  program(1, 0xfee0_3000, 0xbeef, 0x12);
  assert.deepEqual(msix.message(1), { address: 0xfee0_3000, addressHigh: 0x12, data: 0xbeef });
  assert.deepEqual(msix.message(0), { address: 0, addressHigh: 0, data: 0 });
});

test("reset(): entries masked and zeroed, pending cleared, enable and function mask cleared", () => {
  const { msix, control, setControl, program, unmask } = make();
  setControl(ENABLE | FUNCTION_MASK);
  program(0, 0xfee0_0000, 0x41);
  unmask(0);
  msix.notify(0);
  msix.reset();
  assert.equal(control(), 2);
  assert.equal(msix.pbaRead(0, 4), 0);
  assert.deepEqual(msix.message(0), { address: 0, addressHigh: 0, data: 0 });
  assert.equal(msix.tableRead(12, 4), 1);
});

test("the MSI-X capability chains after an earlier capability", () => {
  const pci = new PciConfig({ vendorId: 1, deviceId: 2, classCode: 0 }, [{ index: 0, kind: "mmio32", size: 0x1000 }]);
  const vendor = pci.addCapability(PCI_CAP_ID.vendor, new Uint8Array(14));
  const msix = new MsixTable(pci, { vectors: 2, tableBar: 0, tableOffset: 0, pbaBar: 0, pbaOffset: 0x800 }, new RecordingMsiSink());
  assert.equal(pci.configRead(0x34, 1), vendor);
  assert.equal(pci.configRead(vendor + 1, 1), msix.capOffset);
  assert.equal(msix.capOffset % 4, 0);
  assert.equal(pci.configRead(msix.capOffset, 1), PCI_CAP_ID.msix);
  assert.equal(pci.configRead(msix.capOffset + 1, 1), 0);
});
