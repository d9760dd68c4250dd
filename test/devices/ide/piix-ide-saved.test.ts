import { test } from "node:test";
import assert from "node:assert/strict";
import { DeviceRestoreError } from "../../../src/devices/emulated/saved-state.js";
import { ATA, AtaDriver, MemoryDisk, makeRig, pattern } from "./ide-test-driver.js";
import type { IdeDriveConfig } from "../../../src/devices/emulated/ide/piix-ide.js";

function twoRigs() {
  const disk = new MemoryDisk(1 << 20);
  disk.fill(0, pattern(2, 0, 1 << 20));
  const iso = new MemoryDisk(32 * 2048, true);
  iso.fill(0, pattern(3, 0, 32 * 2048));
  const drives: IdeDriveConfig[] = [
    { channel: 0, unit: 0, kind: "disk", device: disk },
    { channel: 1, unit: 0, kind: "cdrom", device: iso },
  ];
  const a = makeRig(drives);
  const b = makeRig(drives);
  return { a, b, disk, iso, da: new AtaDriver(a, 0), db: new AtaDriver(b, 0) };
}

const clone = <T>(x: T): T => JSON.parse(JSON.stringify(x)) as T;

test("restore: a PIO read in the middle of a block continues on the restored controller, INTRQ re-driven", () => {
  const { a, b, da, db } = twoRigs();
  da.issue(0x20, { nsect: 2, lba: 10 });
  const first = da.readData(100);
  b.ide.restore(clone(a.ide.save()));
  assert.equal(db.irq.level, true, "pending interrupt re-asserted");
  assert.equal(db.status() & ATA.DRQ, ATA.DRQ);
  const rest = db.readData(512 - 100 + 512);
  assert.deepEqual(Buffer.concat([first, rest]), Buffer.from(pattern(2, 10 * 512, 1024)));
  assert.equal(db.status(), 0x50);
});

test("SRST asserted in the middle of a PIO read (disk) or a packet command (CD-ROM): the state saves and restores", () => {
  // SRST drops the transfer and the command it belonged to; before the fix the command stayed behind
  // with no transfer, a state restore() rightly refused (found by the fuzz).
  const { a, b, da, db } = twoRigs();
  da.issue(0x20, { nsect: 2, lba: 10 });
  da.readData(100);
  da.writeCtl(ATA.OBS | ATA.SRST);
  const cd = new AtaDriver(a, 1);
  cd.issue(0xa0, { unit: 0, device: 0xa0 });
  cd.writeCtl(ATA.OBS | ATA.SRST);
  b.ide.restore(clone(a.ide.save()));
  assert.ok((db.altStatus() & ATA.BSY) !== 0, "still in reset");
  db.writeCtl(ATA.OBS);
  assert.equal(db.status() & (ATA.BSY | ATA.DRQ), 0, "released: ready, nothing to transfer");
  db.issue(0x20, { nsect: 1, lba: 3 });
  assert.deepEqual(db.readData(512), pattern(2, 3 * 512, 512));
});

test("restore: a DMA command waiting for Start runs on the restored controller", () => {
  const { a, b, da, db } = twoRigs();
  da.writePrd(0x1000, [[0x20000, 1024]]);
  db.writePrd(0x1000, [[0x20000, 1024]]);
  da.bmSetup(0x1000, true);
  da.issue(0xc8, { nsect: 2, lba: 7 });
  b.ide.restore(clone(a.ide.save()));
  db.bmStart();
  assert.equal(db.bmRead(2) & 0x07, 0x04);
  assert.equal(db.status(), 0x50);
  assert.deepEqual(b.memory.bytes(0x20000, 1024), pattern(2, 7 * 512, 1024));
});

test("restore: an ATAPI PIO data phase continues", () => {
  const { a, b } = twoRigs();
  const ca = new AtaDriver(a, 1);
  const cb = new AtaDriver(b, 1);
  ca.outb(ATA.FEAT, 0);
  ca.outb(ATA.LBAM, 0x00);
  ca.outb(ATA.LBAH, 0x08);
  ca.select(0);
  ca.outb(ATA.CMD, 0xa0);
  ca.writeData(new Uint8Array([0x28, 0, 0, 0, 0, 4, 0, 0, 2, 0, 0, 0]));
  ca.status();
  const head = ca.readData(1000);
  b.ide.restore(clone(a.ide.save()));
  const tail = cb.readData(2048 - 1000);
  assert.equal(cb.status() & ATA.DRQ, ATA.DRQ);
  assert.equal(cb.inb(ATA.LBAM) | (cb.inb(ATA.LBAH) << 8), 2048);
  const second = cb.readData(2048);
  assert.equal(cb.status() & (ATA.DRQ | ATA.ERR_BIT), 0);
  assert.deepEqual(Buffer.concat([head, tail, second]), Buffer.from(pattern(3, 4 * 2048, 4096)));
});

test("restore rejects bad saved states and leaves the controller untouched", () => {
  const { a, b, da } = twoRigs();
  da.issue(0x20, { nsect: 2, lba: 10 });
  da.readData(10);
  const good = clone(a.ide.save()) as unknown as Record<string, unknown>;
  const before = JSON.stringify(b.ide.save());
  type Mut = (s: any) => void; // eslint-disable-line @typescript-eslint/no-explicit-any
  const bad: [string, Mut][] = [
    ["kind", (s) => (s.kind = "ne2k-pci")],
    ["version", (s) => (s.version = 2)],
    ["not an object", (s) => (s.channels = 5)],
    ["pos past end", (s) => (s.channels[0].devices[0].pos = 600)],
    ["end past buffer", (s) => (s.channels[0].devices[0].end = 1 << 20)],
    ["buffer length", (s) => s.channels[0].devices[0].buffer.pop()],
    ["pio and dma", (s) => (s.channels[0].devices[0].dmaPending = true)],
    ["kind mismatch", (s) => (s.channels[0].devices[0].kind = "cdrom")],
    ["transfer past the disk", (s) => (s.channels[0].disks[0].lba = 2047)],
    ["multiple count", (s) => (s.channels[0].disks[0].multiCount = 3)],
    ["disk state on an empty position", (s) => (s.channels[0].disks[1] = s.channels[0].disks[0])],
    ["cdrom phase", (s) => (s.channels[1].cdroms[0].job = 3)],
    ["bus master pointer", (s) => (s.channels[0].busMaster.prd = 2)],
    ["control bits", (s) => (s.channels[0].control = 0x01)],
    ["register byte", (s) => (s.channels[0].devices[0].regs[3] = 256)],
  ];
  for (const [name, mutate] of bad) {
    const s = clone(good);
    mutate(s);
    assert.throws(() => b.ide.restore(s), DeviceRestoreError, name);
    assert.equal(JSON.stringify(b.ide.save()), before, `${name}: nothing applied`);
  }
  assert.throws(() => b.ide.restore(null), DeviceRestoreError);
});
