/** The MSI-X behaviour the virtio transport relies on (src/devices/pci/msix.ts). */
import { test } from "node:test";
import assert from "node:assert/strict";
import { MsixTable } from "../../../src/devices/pci/msix.js";
import { PCI_CAP_ID, PciConfig } from "../../../src/devices/pci/pci-config.js";
import { RecordingMsiSink } from "./virtio-driver.js";

function make(vectors = 3) {
  const pci = new PciConfig({ vendorId: 0x1af4, deviceId: 0x1041, classCode: 0x020000 }, [{ index: 1, kind: "mmio32", size: 0x1000 }]);
  const sink = new RecordingMsiSink();
  const msix = new MsixTable(pci, { vectors, tableBar: 1, tableOffset: 0, pbaBar: 1, pbaOffset: 0x800 }, sink);
  const program = (v: number): void => {
    msix.tableWrite(v * 16, 4, 0xfee0_0000);
    msix.tableWrite(v * 16 + 4, 4, 0);
    msix.tableWrite(v * 16 + 8, 4, 0x30 + v);
  };
  return { pci, sink, msix, program, ctl: msix.capOffset + 2 };
}

test("capability: id, table size, BIR and offsets", () => {
  const { pci, msix } = make(5);
  assert.equal(pci.configRead(msix.capOffset, 1), PCI_CAP_ID.msix);
  assert.equal(pci.configRead(msix.capOffset + 2, 2) & 0x7ff, 4);
  assert.equal(pci.configRead(msix.capOffset + 4, 4), 0x0 | 1);
  assert.equal(pci.configRead(msix.capOffset + 8, 4), 0x800 | 1);
  assert.equal(msix.tableBytes, 80);
});

test("entries start masked; nothing is sent while MSI-X is disabled", () => {
  const { msix, sink, program, pci, ctl } = make();
  assert.equal(msix.tableRead(12, 4), 1, "vector control: masked");
  program(0);
  assert.equal(msix.notify(0), false, "disabled: the caller falls back to INTx");
  pci.configWrite(ctl, 2, 0x8000);
  assert.equal(msix.enabled, true);
  assert.equal(msix.notify(0), true);
  assert.equal(sink.messages.length, 0, "masked: pending instead");
  assert.equal(msix.pbaRead(0, 1), 1);
  msix.tableWrite(12, 4, 0);
  assert.deepEqual(sink.messages, [{ address: 0xfee0_0000, data: 0x30, vector: 0 }]);
  assert.equal(msix.pbaRead(0, 1), 0);
  assert.equal(msix.notify(0), true);
  assert.equal(sink.messages.length, 2);
});

test("function mask holds every vector; clearing it delivers the pending ones", () => {
  const { msix, sink, program, pci, ctl } = make();
  for (const v of [0, 1, 2]) {
    program(v);
    msix.tableWrite(v * 16 + 12, 4, 0);
  }
  pci.configWrite(ctl, 2, 0xc000);
  assert.equal(msix.functionMasked, true);
  msix.notify(1);
  msix.notify(2);
  assert.equal(sink.messages.length, 0);
  assert.equal(msix.pbaRead(0, 1), 6);
  pci.configWrite(ctl, 2, 0x8000);
  assert.deepEqual(sink.messages.map((m) => m.vector), [1, 2]);
});

test("out-of-range vectors (VIRTIO_MSI_NO_VECTOR) and unprogrammed entries send nothing", () => {
  const { msix, sink, pci, ctl } = make();
  pci.configWrite(ctl, 2, 0x8000);
  assert.equal(msix.notify(0xffff), false);
  assert.equal(msix.notify(-1), false);
  msix.tableWrite(12, 4, 0); // unmasked but address 0
  assert.equal(msix.notify(0), true);
  assert.equal(sink.messages.length, 0);
  // Vector control keeps only the mask bit; out-of-table accesses are harmless.
  msix.tableWrite(12, 4, 0xffff_fffe);
  assert.equal(msix.tableRead(12, 4), 0);
  msix.tableWrite(0x1000, 4, 1);
  assert.equal(msix.tableRead(0x1000, 4), 0);
});

test("reset: entries masked again, pending cleared, MSI-X off", () => {
  const { msix, pci, ctl, program } = make();
  program(1);
  pci.configWrite(ctl, 2, 0x8000);
  msix.notify(1);
  msix.reset();
  assert.equal(msix.enabled, false);
  assert.equal(msix.pbaRead(0, 1), 0);
  assert.equal(msix.tableRead(16 + 12, 4), 1);
  assert.equal(msix.tableRead(16, 4), 0);
});

test("vectorState (state reports): unprogrammed, masked, masked+pending, unmasked, none", () => {
  const { msix, program, pci, ctl } = make();
  pci.configWrite(ctl, 2, 0x8000);
  assert.equal(msix.vectorState(0), "masked", "entries start masked");
  msix.tableWrite(16 + 12, 4, 0);
  assert.equal(msix.vectorState(1), "unprogrammed");
  program(0);
  msix.notify(0);
  assert.equal(msix.vectorState(0), "masked+pending");
  msix.tableWrite(12, 4, 0);
  assert.equal(msix.vectorState(0), "unmasked", "unmasking delivered the pending message");
  assert.equal(msix.vectorState(3), "none");
  assert.equal(msix.vectorState(0xffff), "none");
});
