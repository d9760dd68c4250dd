/**
 * Rate limits on an IDE disk (io-limits.ts through ata-disk.ts): a read or
 * write command over its limits is held with BSY set, before any data
 * moves, until its channel's alarm; then it runs as any command does. Time
 * is the test's clock; the alarm's timerfd is fired by hand through the
 * device loop's watch, as the device thread's loop would when it expires.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { ChunkedGuestMemory } from "../../../src/machine/guest-memory.js";
import { PiixIde, type IdeDriveConfig } from "../../../src/devices/emulated/ide/piix-ide.js";
import type { DiskIoLimits } from "../../../src/devices/io-limits.js";
import { ATA, AtaDriver, MemoryDisk, fakeServices, pattern, type Rig } from "./ide-test-driver.js";
import { DeferredWork, RecordingIrqLine, RecordingPortShadow, RecordingPostedWritePorts } from "../device-fakes.js";

const MiB = 1 << 20;
const TABLE = 0x1000;
const READ_SECTORS = 0x20;
const WRITE_SECTORS = 0x30;
const READ_DMA = 0xc8;

function limitedRig(limits: DiskIoLimits | undefined) {
  let now = 1000;
  const memory = ChunkedGuestMemory.anonymous([{ gpa: 0, length: MiB, fileOffset: 0 }]);
  const irq: [RecordingIrqLine, RecordingIrqLine] = [new RecordingIrqLine(), new RecordingIrqLine()];
  const work = new DeferredWork();
  const shadow = new RecordingPortShadow();
  const posted = new RecordingPostedWritePorts();
  const watchers = new Map<number, () => void>();
  const services = {
    ...fakeServices(memory, work, shadow, posted),
    loop: {
      watchWritable: () => ({ close: () => undefined }),
      watch: (fd: number, onReadable: () => void) => {
        watchers.set(fd, onReadable);
        return { close: () => void watchers.delete(fd) };
      },
      defer: (task: () => void) => work.defer(task),
    },
  };
  const disk = new MemoryDisk(8 * MiB);
  disk.fill(0, pattern(1, 0, MiB));
  const drives: IdeDriveConfig[] = [{ channel: 0, unit: 0, kind: "disk", device: disk, ...(limits !== undefined ? { limits } : {}) }];
  const ide = new PiixIde("ide0", services, { primaryIrq: irq[0], secondaryIrq: irq[1], drives, clock: () => now });
  ide.pci.assignBar(4, 0xc000);
  ide.pci.enableDecoding();
  ide.afterAccess();
  const rig: Rig = { ide, memory, irq, work, shadow, posted };
  const drv = new AtaDriver(rig, 0);
  return {
    rig,
    drv,
    disk,
    ide,
    watchers,
    advance: (ms: number) => (now += ms),
    /** Both channels' alarms expire (each does nothing when nothing of its channel is due). */
    fireAlarms: () => [...watchers.values()].forEach((f) => f()),
  };
}

test("IDE disk without limits: no alarm timers at all", () => {
  const r = limitedRig(undefined);
  assert.equal(r.watchers.size, 0);
  r.ide.close();
});

test("IDE: a controller that cannot be made (a drive's limit is not a rate) leaves no alarm timer open or watched", () => {
  const memory = ChunkedGuestMemory.anonymous([{ gpa: 0, length: MiB, fileOffset: 0 }]);
  const watchers = new Map<number, () => void>();
  const services = {
    ...fakeServices(memory, new DeferredWork(), new RecordingPortShadow(), new RecordingPostedWritePorts()),
    loop: {
      watchWritable: () => ({ close: () => undefined }),
      watch: (fd: number, onReadable: () => void) => {
        watchers.set(fd, onReadable);
        return { close: () => void watchers.delete(fd) };
      },
      defer: (task: () => void) => task(),
    },
  };
  const drives: IdeDriveConfig[] = [
    { channel: 0, unit: 0, kind: "disk", device: new MemoryDisk(MiB), limits: { iops: 10 } },
    { channel: 1, unit: 0, kind: "disk", device: new MemoryDisk(MiB), limits: { iops: 0 } },
  ];
  const fds = readdirSync("/proc/self/fd").length;
  assert.throws(() => new PiixIde("ide0", services, { primaryIrq: new RecordingIrqLine(), secondaryIrq: new RecordingIrqLine(), drives }), /positive number/);
  assert.equal(watchers.size, 0, "the alarms made before the failure are no longer watched");
  assert.equal(readdirSync("/proc/self/fd").length, fds, "and their timerfds are closed");
});

test("IDE READ DMA over an IOPS limit: held with BSY (no DMA request, no data, no interrupt) until the alarm; then it runs as usual", () => {
  const r = limitedRig({ iops: 10 });
  const { drv, rig } = r;
  assert.equal(r.watchers.size, 2, "one alarm per channel");
  const dmaRead = (lba: number): void => {
    drv.writePrd(TABLE, [[0x10000, 0x400]]);
    drv.bmSetup(TABLE, true);
    drv.issue(READ_DMA, { nsect: 2, lba });
  };
  for (let i = 0; i < 2; i++) {
    dmaRead(i * 2);
    drv.bmStart();
    assert.equal(drv.irq.level, true, `command ${i} ran at once`);
    drv.bmStop();
    assert.equal(drv.status(), 0x50);
  }
  rig.memory.bytes(0x10000, 0x400).fill(0);
  drv.irq.calls.length = 0;
  dmaRead(40);
  assert.equal(drv.altStatus(), ATA.BSY, "held: BSY, nothing else");
  assert.equal(rig.shadow.values.get(0x3f6), ATA.BSY, "and that is what the vCPUs answer from the shadow");
  drv.bmStart();
  assert.equal(drv.irq.level, false, "Start with the device busy: nothing moves");
  assert.equal(drv.bmRead(2) & 0x07, 0x01, "Active, waiting");
  assert.deepEqual(rig.memory.bytes(0x10000, 0x400), new Uint8Array(0x400));
  r.fireAlarms();
  assert.equal(drv.altStatus(), ATA.BSY, "an early wake-up: still held");
  r.advance(100);
  r.fireAlarms();
  assert.equal(drv.irq.level, true, "the alarm: the transfer ran and interrupted");
  assert.equal(drv.bmRead(2) & 0x07, 0x04);
  assert.deepEqual(rig.memory.bytes(0x10000, 0x400), pattern(1, 40 * 512, 0x400));
  drv.bmStop();
  assert.equal(drv.status(), 0x50);
  assert.equal(r.ide.throttled, 1);
  r.ide.close();
  assert.equal(r.watchers.size, 0, "close: the timers are no longer watched");
});

test("IDE: while a held command keeps the drive busy, writes to the command block (a reselect, new LBA) are ignored; the held DMA runs as issued", () => {
  const r = limitedRig({ iops: 10 });
  const { drv, rig } = r;
  for (let i = 0; i < 2; i++) {
    drv.issue(READ_SECTORS, { nsect: 1, lba: i });
    drv.readData(512);
  }
  drv.writePrd(TABLE, [[0x10000, 0x400]]);
  drv.bmSetup(TABLE, true);
  drv.issue(READ_DMA, { nsect: 2, lba: 40 });
  drv.bmStart();
  assert.equal(drv.altStatus(), ATA.BSY, "held");
  // A driver that gave up waiting probes the other device and loads a new task file.
  drv.outb(ATA.DEVICE, 0xf0);
  drv.outb(ATA.LBAL, 0);
  drv.outb(ATA.NSECT, 7);
  assert.equal(drv.altStatus(), ATA.BSY, "still device 0, still busy");
  r.advance(100);
  r.fireAlarms();
  assert.equal(drv.irq.level, true, "the held transfer ran and interrupted");
  assert.deepEqual(rig.memory.bytes(0x10000, 0x400), pattern(1, 40 * 512, 0x400), "from the LBA it was issued with");
  drv.bmStop();
  assert.equal(drv.status(), 0x50);
  drv.outb(ATA.DEVICE, 0xf0);
  assert.equal(drv.altStatus(), 0, "not busy: the reselect takes (no device 1)");
  r.ide.close();
});

test("IDE PIO under a bandwidth limit: a held READ SECTORS interrupts with its data at the alarm; a held WRITE SECTORS asks for its data then", () => {
  const r = limitedRig({ bytesPerSecond: 64 * 1024 });
  const { drv, disk } = r;
  // 6.4 KiB in the bucket: a 16-sector read goes into debt, the next waits.
  drv.issue(READ_SECTORS, { nsect: 16, lba: 0 });
  for (let i = 0; i < 16; i++) drv.readData(512);
  assert.equal(drv.status(), 0x50);
  drv.irq.calls.length = 0;
  drv.issue(READ_SECTORS, { nsect: 1, lba: 100 });
  assert.equal(drv.altStatus(), ATA.BSY);
  assert.equal(drv.irq.level, false);
  r.advance(200);
  r.fireAlarms();
  assert.equal(drv.irq.level, true, "data-in block offered with INTRQ");
  assert.equal(drv.status() & (ATA.BSY | ATA.DRQ), ATA.DRQ);
  assert.deepEqual(drv.readData(512), pattern(1, 100 * 512, 512));
  assert.equal(drv.status(), 0x50);
  // A write held, then its data.
  r.advance(1000);
  drv.issue(WRITE_SECTORS, { nsect: 16, lba: 200 });
  drv.writeData(new Uint8Array(16 * 512).fill(0x5a));
  drv.irq.calls.length = 0;
  drv.issue(WRITE_SECTORS, { nsect: 1, lba: 300 });
  assert.equal(drv.altStatus(), ATA.BSY, "the write is held before it asks for data");
  r.advance(200);
  r.fireAlarms();
  assert.equal(drv.altStatus() & (ATA.BSY | ATA.DRQ), ATA.DRQ, "now it asks (no interrupt for the first data-out block)");
  assert.equal(drv.irq.level, false);
  drv.writeData(new Uint8Array(512).fill(0xa5));
  assert.equal(drv.irq.level, true);
  assert.equal(drv.status(), 0x50);
  assert.deepEqual(disk.bytes(300 * 512, 512), new Uint8Array(512).fill(0xa5));
  assert.equal(r.ide.throttled, 2);
  r.ide.close();
});

test("IDE limits: a command that will fail is answered at once (not held, not charged); SRST drops a held command; save() starts it first", () => {
  const r = limitedRig({ iops: 1 });
  const { drv, rig } = r;
  drv.issue(READ_SECTORS, { nsect: 1, lba: 0 });
  drv.readData(512);
  drv.issue(READ_SECTORS, { nsect: 1, lba: 1 });
  drv.readData(512);
  assert.equal(drv.status(), 0x50, "the bucket's one and one into debt");
  drv.issue(READ_SECTORS, { nsect: 1, lba: 16 * 2048 * 10 });
  assert.equal(drv.altStatus() & (ATA.BSY | ATA.ERR_BIT), ATA.ERR_BIT, "out of range: IDNF at once, though in debt");
  assert.equal(drv.inb(ATA.ERR), ATA.IDNF);
  // Held, then SRST: nothing happens at the alarm.
  drv.issue(READ_SECTORS, { nsect: 1, lba: 5 });
  assert.equal(drv.altStatus(), ATA.BSY);
  drv.softreset();
  drv.irq.calls.length = 0;
  r.advance(10_000);
  r.fireAlarms();
  assert.equal(drv.irq.rises(), 0, "the held read was dropped");
  assert.equal(drv.altStatus() & ATA.BSY, 0);
  // Held DMA, then save(): started and moved, its completion in the saved state.
  for (const lba of [6, 7]) {
    drv.issue(READ_SECTORS, { nsect: 1, lba });
    drv.readData(512);
  }
  drv.writePrd(TABLE, [[0x20000, 0x200]]);
  drv.bmSetup(TABLE, true);
  drv.issue(READ_DMA, { nsect: 1, lba: 9 });
  drv.bmStart();
  assert.equal(drv.altStatus(), ATA.BSY);
  const saved = r.ide.save();
  assert.deepEqual(rig.memory.bytes(0x20000, 0x200), pattern(1, 9 * 512, 0x200), "save() ran the held transfer");
  assert.equal(saved.channels[0]!.busMaster.status & 0x07, 0x04, "saved with Interrupt, not Active");
  assert.equal(r.ide.throttled, 2, "the read dropped by SRST and the DMA");
  r.ide.close();
});
