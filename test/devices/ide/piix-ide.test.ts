import { test } from "node:test";
import assert from "node:assert/strict";
import { ChunkedGuestMemory } from "../../../src/machine/guest-memory.js";
import { PiixIde, IdeConfigError, type IdeDriveConfig } from "../../../src/devices/emulated/ide/piix-ide.js";
import { ATA, AtaDriver, MemoryDisk, checkPortShadow, fakeServices, idString, makeRig, pattern } from "./ide-test-driver.js";
import { RecordingIrqLine, ScriptedRing } from "../device-fakes.js";
import { DeviceBus } from "../../../src/worker/device-bus.js";
import { MAILBOX_OP } from "../../../src/worker/device-mailbox.js";
import { makeServices } from "../virtio/virtio-driver.js";
import { openRaw } from "../../../src/storage/raw.js";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import type { BlockDevice, HostIoQueue } from "../../../src/storage/block-device.js";
import { IoUring } from "../../../src/hypervisor/io-uring.js";
import { poll } from "../../../src/hypervisor/libc.js";
import { tmpdir } from "node:os";
import { join } from "node:path";

const MiB = 1 << 20;

function diskRig(opts: { size?: number; readOnly?: boolean; slave?: boolean; memory?: ChunkedGuestMemory } = {}) {
  const disk = new MemoryDisk(opts.size ?? 8 * MiB, opts.readOnly ?? false);
  disk.fill(0, pattern(1, 0, MiB));
  const drives: IdeDriveConfig[] = [{ channel: 0 as const, unit: 0 as const, kind: "disk" as const, device: disk, serial: "SN-0001" }];
  const slave = new MemoryDisk(MiB);
  if (opts.slave === true) drives.push({ channel: 0, unit: 1, kind: "disk", device: slave, serial: "SN-0002" });
  const rig = makeRig(drives, opts.memory);
  const drv = new AtaDriver(rig, 0);
  return { rig, drv, disk, slave, ide: rig.ide };
}

test("PCI identity: 8086:7010, class 01 01 80, BAR4 16 I/O ports, no INTx pin, IDETIM decode enabled", () => {
  const { ide } = diskRig();
  const cfg = ide.pci;
  assert.equal(cfg.configRead(0x00, 4), 0x7010_8086);
  assert.equal(cfg.configRead(0x08, 4) >>> 8, 0x010180);
  assert.equal(cfg.configRead(0x3d, 1), 0);
  assert.equal(cfg.configRead(0x20, 4), 0xc001);
  cfg.configWrite(0x20, 4, 0xffff_ffff);
  assert.equal(cfg.configRead(0x20, 4), 0xfff1, "16-byte I/O BAR sizing");
  for (const bar of [0x10, 0x14, 0x18, 0x1c, 0x24]) assert.equal(cfg.configRead(bar, 4), 0);
  assert.equal(cfg.configRead(0x40, 2), 0x8000);
  assert.equal(cfg.configRead(0x42, 2), 0x8000);
  cfg.configWrite(0x40, 2, 0xa307);
  cfg.configWrite(0x44, 1, 0x0b);
  assert.equal(cfg.configRead(0x40, 2), 0xa307);
  assert.equal(cfg.configRead(0x44, 1), 0x0b);
  ide.reset();
  assert.equal(cfg.configRead(0x40, 4), 0x8000_8000);
  assert.equal(cfg.configRead(0x44, 1), 0);
});

test("legacy regions: 1F0-1F7, 3F6, 170-177, 376", () => {
  const { ide } = diskRig();
  assert.deepEqual(
    ide.isaRegions.map((r) => [r.name, r.start, r.length]),
    [["primary", 0x1f0, 8], ["primary-control", 0x3f6, 1], ["secondary", 0x170, 8], ["secondary-control", 0x376, 1]],
  );
});

test("construction rejects impossible drive lists", () => {
  const memory = ChunkedGuestMemory.anonymous([{ gpa: 0, length: 4096, fileOffset: 0 }]);
  const make = (drives: ConstructorParameters<typeof PiixIde>[2]["drives"]) =>
    new PiixIde("ide0", fakeServices(memory), { primaryIrq: new RecordingIrqLine(), secondaryIrq: new RecordingIrqLine(), drives });
  const d = new MemoryDisk(MiB);
  assert.throws(() => make([{ channel: 0, unit: 0, kind: "disk", device: undefined }]), IdeConfigError);
  assert.throws(() => make([{ channel: 0, unit: 0, kind: "disk", device: d }, { channel: 0, unit: 0, kind: "cdrom", device: undefined }]), IdeConfigError);
  assert.throws(() => make([{ channel: 2 as 0, unit: 0, kind: "disk", device: d }]), IdeConfigError);
});

test("decoding: ports float while PCI I/O is off or IDETIM decode is clear", () => {
  const { ide, drv } = diskRig();
  assert.equal(drv.status() & ATA.DRDY, ATA.DRDY);
  ide.pci.configWrite(0x04, 2, 0x0004);
  assert.equal(drv.status(), 0xff);
  ide.pci.configWrite(0x04, 2, 0x0005);
  ide.pci.configWrite(0x40, 2, 0x0000);
  assert.equal(drv.status(), 0xff);
  assert.equal(drv.altStatus(), 0xff);
  ide.pci.configWrite(0x40, 2, 0x8000);
  assert.equal(drv.altStatus() & ATA.DRDY, ATA.DRDY);
});

test("probe like ata_piix: devchk, SRST, signatures classify master disk, no slave; empty channel floats", () => {
  const { rig, drv } = diskRig();
  assert.equal(drv.devchk(0), true);
  drv.softreset();
  assert.equal(drv.classify(0), "ata");
  drv.select(1);
  assert.equal(drv.status(), 0, "absent device 1 reads Status 00h");
  assert.equal(drv.classify(1), "none");
  const sec = new AtaDriver(rig, 1);
  assert.equal(sec.devchk(0), false);
  assert.equal(sec.status(), 0xff);
  assert.equal(sec.altStatus(), 0xff);
  assert.equal(rig.ide.isaRead("secondary", 0, 2), 0xffff);
  sec.softreset();
  assert.equal(sec.classify(0), "none");
  assert.equal(rig.irq[1].calls.filter((l) => l).length, 0);
});

test("SRST: signature registers, error 01h, device 0 selected, BSY while held, no interrupt", () => {
  const { drv } = diskRig({ slave: true });
  drv.select(1);
  drv.outb(ATA.NSECT, 0x33);
  drv.writeCtl(ATA.SRST);
  assert.equal(drv.status(), ATA.BSY);
  drv.writeCtl(0);
  assert.equal(drv.inb(ATA.DEVICE) & 0x10, 0, "device 0 selected after reset");
  for (const unit of [0, 1] as const) {
    drv.select(unit);
    assert.deepEqual([ATA.ERR, ATA.NSECT, ATA.LBAL, ATA.LBAM, ATA.LBAH].map((r) => drv.inb(r)), [1, 1, 1, 0, 0]);
    assert.equal(drv.classify(unit), "ata");
  }
  assert.equal(drv.irq.level, false);
});

test("EXECUTE DEVICE DIAGNOSTIC: signatures, device 0 interrupts", () => {
  const { drv } = diskRig({ slave: true });
  drv.select(1);
  drv.outb(ATA.CMD, 0x90);
  assert.equal(drv.irq.level, true);
  assert.equal(drv.inb(ATA.ERR), 0x01);
  assert.equal(drv.status() & (ATA.BSY | ATA.ERR_BIT), 0);
  assert.equal(drv.irq.level, false);
});

test("IDENTIFY DEVICE: strings, capacity, features, modes, checksum", () => {
  const { drv } = diskRig({ size: 8 * MiB });
  const id = drv.identify(0);
  assert.equal(idString(id, 27, 20), "PARTIS HARDDISK");
  assert.equal(idString(id, 10, 10), "SN-0001");
  assert.equal(idString(id, 23, 4), "1.0");
  assert.equal(id[0]! & 0x8000, 0, "ATA device");
  const sectors = (8 * MiB) / 512;
  assert.equal(id[60]! | (id[61]! << 16), sectors);
  assert.equal(id[100]! + id[101]! * 65536, sectors);
  assert.equal(id[49]! & 0x0300, 0x0300, "LBA and DMA");
  assert.equal(id[83]! & 0xc000, 0x4000);
  assert.ok(id[83]! & (1 << 10), "LBA48");
  assert.ok(id[83]! & (1 << 12), "FLUSH CACHE");
  assert.ok(id[83]! & (1 << 13), "FLUSH CACHE EXT");
  assert.ok(id[82]! & (1 << 5) && id[85]! & (1 << 5), "write cache supported and enabled");
  assert.equal(id[86]! & (1 << 10), 1 << 10, "LBA48 enabled");
  assert.equal(id[87]! & 0xc000, 0x4000);
  assert.equal(id[53]! & 0x06, 0x06);
  assert.equal(id[63], 0x0007, "MWDMA 0-2, none selected");
  assert.equal(id[64], 0x0003, "PIO 3-4");
  assert.equal(id[88]! & 0xff, 0x3f, "UDMA 0-5");
  assert.equal(id[47], 0x8010, "multiple up to 16");
  assert.equal(id[59], 0x0110, "multiple 16 current");
  assert.equal(id[80]! & 0x00f0, 0x00f0);
  const bytes = new Uint8Array(id.buffer);
  assert.equal(bytes[510], 0xa5);
  assert.equal(bytes.reduce((a, b) => (a + b) & 0xff, 0), 0, "integrity checksum");
  assert.equal(drv.irq.rises(), 1);
});

test("SET FEATURES transfer mode shows in words 63/88; bad modes and subcommands abort", () => {
  const { drv } = diskRig();
  drv.identify(0);
  drv.issue(0xef, { feature: 0x03, nsect: 0x22, device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 0);
  assert.equal(drv.identify(0)[63], 0x0407);
  drv.issue(0xef, { feature: 0x03, nsect: 0x45, device: 0xa0 });
  const id = drv.identify(0);
  assert.equal(id[63], 0x0007);
  assert.equal(id[88], 0x203f);
  drv.issue(0xef, { feature: 0x03, nsect: 0x0c, device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 0, "PIO4");
  drv.issue(0xef, { feature: 0x03, nsect: 0x23, device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, ATA.ERR_BIT);
  assert.equal(drv.inb(ATA.ERR), ATA.ABRT);
  drv.issue(0xef, { feature: 0x82, device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 0);
  assert.equal(drv.identify(0)[85]! & 0x20, 0, "write cache disabled");
  drv.issue(0xef, { feature: 0x77, device: 0xa0 });
  assert.equal(drv.inb(ATA.ERR), ATA.ABRT);
});

test("interrupts: INTRQ per ATA rules, nIEN masks it, Status read clears it, Alternate Status does not", () => {
  const { drv } = diskRig();
  drv.issue(0xe5, { device: 0xa0 }); // CHECK POWER MODE
  assert.equal(drv.irq.level, true);
  assert.equal(drv.bmRead(2) & 0x04, 0x04, "bus-master Interrupt mirrors INTRQ");
  drv.altStatus();
  assert.equal(drv.irq.level, true);
  drv.status();
  assert.equal(drv.irq.level, false);
  drv.writeCtl(ATA.NIEN);
  drv.bmWrite(2, 1, 0x04);
  drv.issue(0xe5, { device: 0xa0 });
  assert.equal(drv.irq.level, false);
  assert.equal(drv.bmRead(2) & 0x04, 0);
  drv.writeCtl(0);
  assert.equal(drv.irq.level, true, "pending interrupt shows when nIEN clears");
  drv.outb(ATA.CMD, 0xe5);
  drv.status();
  assert.equal(drv.irq.level, false);
});

test("PIO READ SECTORS: 16-bit data reads, INTRQ per sector, none after the last, LBA of last sector", () => {
  const { drv } = diskRig();
  drv.irq.calls.length = 0;
  drv.issue(0x20, { nsect: 3, lba: 5 });
  const got: Uint8Array[] = [];
  for (let i = 0; i < 3; i++) {
    assert.equal(drv.irq.level, true, `interrupt for block ${i}`);
    assert.equal(drv.status() & (ATA.DRQ | ATA.BSY | ATA.ERR_BIT), ATA.DRQ);
    got.push(drv.readData(512));
  }
  assert.equal(drv.irq.level, false);
  assert.equal(drv.status(), 0x50);
  assert.equal(drv.irq.rises(), 3);
  assert.deepEqual(Buffer.concat(got), Buffer.from(pattern(1, 5 * 512, 3 * 512)));
  assert.equal(drv.inb(ATA.LBAL), 7);
});

test("PIO READ MULTIPLE EXT with 32-bit data reads and SET MULTIPLE MODE", () => {
  const { drv } = diskRig();
  drv.issue(0xc6, { nsect: 3, device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 1, "3 is not a power of two");
  drv.issue(0xc6, { nsect: 4, device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 0);
  assert.equal(drv.identify(0)[59], 0x0104);
  drv.irq.calls.length = 0;
  drv.issue(0x29, { nsect: 10, lba: 100, lba48: true });
  const blocks = [4, 4, 2];
  const got: Uint8Array[] = [];
  for (const n of blocks) {
    assert.equal(drv.status() & ATA.DRQ, ATA.DRQ);
    got.push(drv.readData(n * 512, 4));
  }
  assert.equal(drv.status() & ATA.DRQ, 0);
  assert.equal(drv.irq.rises(), 3);
  assert.deepEqual(Buffer.concat(got), Buffer.from(pattern(1, 100 * 512, 10 * 512)));
  drv.issue(0xc6, { nsect: 0, device: 0xa0 });
  drv.issue(0xc4, { nsect: 1, lba: 0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 1, "READ MULTIPLE with multiple mode disabled aborts");
});

test("a string read of the data port through the device bus moves whole DRQ blocks at once, reading what element-by-element reads would: across blocks, past the command's end, 16 and 32 bits", () => {
  for (const width of [2, 4] as const) {
    const results: { data: Uint8Array; status: number; error: number; rises: number; elementReads: number }[] = [];
    for (const how of ["bus", "elements"] as const) {
      const { drv, rig } = diskRig();
      const ide = rig.ide;
      const bus = new DeviceBus();
      bus.attach(1 << 3, ide);
      let elementReads = 0;
      const element = ide.isaRead.bind(ide);
      ide.isaRead = (region, offset, size) => {
        elementReads++;
        return element(region, offset, size);
      };
      drv.issue(0xc6, { nsect: 4, device: 0xa0 });
      drv.status();
      drv.issue(0xc4, { nsect: 10, lba: 100 }); // READ MULTIPLE: DRQ blocks of 4, 4 and 2 sectors
      elementReads = 0;
      const words = (10 * 512 + 64) / width; // 64 bytes past the command's end
      let data: Uint8Array;
      if (how === "bus") {
        data = new Uint8Array(words * width);
        // As KVM hands a `rep insw` over: up to a page per exit.
        const page = new Uint8Array(4096);
        for (let done = 0; done < words; ) {
          const n = Math.min(4096 / width, words - done);
          bus.service({ op: MAILBOX_OP.pioRead, size: width, count: n, address: 0x1f0, data: page });
          data.set(page.subarray(0, n * width), done * width);
          done += n;
        }
      } else data = drv.readData(words * width, width);
      const reads = elementReads;
      results.push({ data, status: drv.altStatus(), error: drv.inb(ATA.ERR), rises: drv.irq.rises(), elementReads: reads });
    }
    const [bus, elements] = results;
    assert.deepEqual(bus!.data, elements!.data, `${width}-byte elements: same bytes`);
    assert.deepEqual(bus!.data.subarray(0, 5120), pattern(1, 100 * 512, 5120));
    assert.deepEqual(bus!.data.subarray(5120), new Uint8Array(64), "past the end: zeros, as element reads give");
    assert.deepEqual([bus!.status, bus!.error, bus!.rises], [elements!.status, elements!.error, elements!.rises], "same end state");
    assert.equal(bus!.elementReads, 64 / width, "only the elements past the command's end went one by one");
    assert.equal(elements!.elementReads, (10 * 512 + 64) / width);
  }
});

test("PIO WRITE SECTORS EXT and WRITE MULTIPLE: data lands on the disk, INTRQ after each block", () => {
  const { drv, disk } = diskRig();
  const data = pattern(7, 0, 4 * 512);
  drv.irq.calls.length = 0;
  drv.issue(0x34, { nsect: 2, lba: 2000, lba48: true });
  assert.equal(drv.irq.level, false, "no interrupt before the first data-out block");
  assert.equal(drv.altStatus() & ATA.DRQ, ATA.DRQ);
  drv.writeData(data.subarray(0, 512));
  assert.equal(drv.irq.level, true);
  assert.equal(drv.status() & ATA.DRQ, ATA.DRQ);
  drv.writeData(data.subarray(512, 1024));
  assert.equal(drv.irq.level, true);
  assert.equal(drv.status(), 0x50);
  assert.deepEqual(disk.bytes(2000 * 512, 1024), data.subarray(0, 1024));

  drv.issue(0xc6, { nsect: 2, device: 0xa0 });
  drv.status();
  drv.issue(0xc5, { nsect: 3, lba: 3000 });
  drv.writeData(data.subarray(0, 1024), 4);
  assert.equal(drv.status() & ATA.DRQ, ATA.DRQ);
  drv.writeData(data.subarray(1024, 1536), 4);
  assert.equal(drv.status(), 0x50);
  assert.deepEqual(disk.bytes(3000 * 512, 1536), data.subarray(0, 1536));
});

test("write cache off: every write command flushes; FLUSH CACHE (EXT) flushes", () => {
  const { drv, disk } = diskRig();
  drv.issue(0xe7, { device: 0xa0 });
  drv.issue(0xea, { device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 0);
  assert.equal(disk.flushes, 2);
  drv.issue(0xef, { feature: 0x82, device: 0xa0 });
  const before = disk.flushes;
  drv.issue(0x30, { nsect: 1, lba: 9 });
  drv.writeData(new Uint8Array(512).fill(9));
  assert.equal(disk.flushes, before + 1, "flush after the write");
});

test("a disk whose writes are stable by themselves (cache=writethrough, directsync): write cache off at power-on, no flush added after writes; the guest may still turn the cache on", () => {
  const disk = new MemoryDisk(MiB);
  const drv = new AtaDriver(makeRig([{ channel: 0, unit: 0, kind: "disk", device: disk, writeThrough: true }]), 0);
  assert.equal(drv.identify(0)[85]! & 0x20, 0, "IDENTIFY: write cache disabled");
  assert.equal(drv.identify(0)[82]! & 0x20, 0x20, "write cache still supported");
  drv.issue(0x30, { nsect: 1, lba: 9 });
  drv.writeData(new Uint8Array(512).fill(9));
  assert.equal(drv.status() & ATA.ERR_BIT, 0);
  assert.equal(disk.flushes, 0, "an O_DSYNC write needs no flush");
  assert.deepEqual(disk.bytes(9 * 512, 512), new Uint8Array(512).fill(9));
  drv.issue(0xef, { feature: 0x02, device: 0xa0 });
  assert.equal(drv.identify(0)[85]! & 0x20, 0x20, "SET FEATURES: write cache enabled");
});

test("LBA48 addresses above 2^28 and the HOB registers", () => {
  const big = new MemoryDisk(2 ** 40);
  const rig = makeRig([{ channel: 0, unit: 0, kind: "disk", device: big }]);
  const drv = new AtaDriver(rig, 0);
  const id = drv.identify(0);
  assert.equal(id[60]! | (id[61]! << 16), 0x0fff_ffff, "LBA28 capacity saturates");
  assert.equal(id[100]! + id[101]! * 2 ** 16 + id[102]! * 2 ** 32, 2 ** 31);
  const lba = 2 ** 30 + 12345;
  const data = pattern(3, 0, 512);
  drv.issue(0x34, { nsect: 1, lba, lba48: true });
  drv.writeData(data);
  assert.equal(drv.status(), 0x50);
  assert.deepEqual(big.bytes(lba * 512, 512), data);
  drv.writeCtl(ATA.HOB);
  assert.equal(drv.inb(ATA.LBAL), (lba / 2 ** 24) & 0xff, "HOB LBA (31:24)");
  drv.writeCtl(0);
  assert.equal(drv.inb(ATA.LBAL), lba & 0xff);
  drv.issue(0x20, { nsect: 1, lba: 0x0fff_fff0 }); // LBA28 works too
  assert.equal(drv.status() & ATA.DRQ, ATA.DRQ);
  drv.readData(512);
});

test("CHS addressing through INITIALIZE DEVICE PARAMETERS", () => {
  const { drv } = diskRig();
  drv.issue(0x91, { nsect: 32, device: 0xa0 | 7 }); // 8 heads, 32 sectors/track
  assert.equal(drv.status() & ATA.ERR_BIT, 0);
  const id = drv.identify(0);
  assert.deepEqual([id[55], id[56]], [8, 32]);
  // C/H/S 2/3/4 -> (2*8+3)*32 + 3 = 611
  drv.issue(0x20, { nsect: 1, lba: 4 | (2 << 8), device: 0xa0 | 3 });
  assert.deepEqual(drv.readData(512), pattern(1, 611 * 512, 512));
  drv.issue(0x20, { nsect: 1, lba: 0, device: 0xa0 }); // sector 0 does not exist
  assert.equal(drv.status() & ATA.ERR_BIT, 1);
  assert.equal(drv.inb(ATA.ERR), ATA.IDNF);
});

test("errors: out-of-range LBA (IDNF), read-only writes (ABRT), unknown commands (ABRT), back-end failures (UNC)", () => {
  const { drv, disk } = diskRig({ size: MiB });
  drv.issue(0x20, { nsect: 2, lba: 2047 });
  assert.equal(drv.irq.level, true);
  assert.equal(drv.status(), 0x51);
  assert.equal(drv.inb(ATA.ERR), ATA.IDNF);
  drv.issue(0x42, { nsect: 1, lba: 2048, lba48: true }); // READ VERIFY EXT
  assert.equal(drv.inb(ATA.ERR), ATA.IDNF);
  drv.issue(0x40, { nsect: 0, lba: 0 }); // 256 sectors, in range
  assert.equal(drv.status() & ATA.ERR_BIT, 0);
  for (const cmd of [0x00, 0x08, 0xf8, 0x2f, 0xb0, 0xa1, 0xa0]) {
    drv.issue(cmd, { device: 0xa0 });
    assert.equal(drv.status(), 0x51, `command 0x${cmd.toString(16)}`);
    assert.equal(drv.inb(ATA.ERR), ATA.ABRT);
  }
  disk.failReads = true;
  drv.issue(0x20, { nsect: 1, lba: 1 });
  assert.equal(drv.status() & (ATA.ERR_BIT | ATA.DRQ), ATA.ERR_BIT);
  assert.equal(drv.inb(ATA.ERR), ATA.UNC);

  const ro = diskRig({ readOnly: true }).drv;
  ro.issue(0x30, { nsect: 1, lba: 1 });
  assert.equal(ro.status(), 0x51);
  assert.equal(ro.inb(ATA.ERR), ATA.ABRT);
  ro.issue(0xca, { nsect: 1, lba: 1 });
  assert.equal(ro.inb(ATA.ERR), ATA.ABRT);
});

test("power: STANDBY IMMEDIATE, CHECK POWER MODE, IDLE IMMEDIATE", () => {
  const { drv } = diskRig();
  drv.issue(0xe0, { device: 0xa0 });
  drv.issue(0xe5, { device: 0xa0 });
  assert.equal(drv.inb(ATA.NSECT), 0x00);
  drv.issue(0xe1, { device: 0xa0 });
  drv.issue(0xe5, { device: 0xa0 });
  assert.equal(drv.inb(ATA.NSECT), 0xff);
});

test("commands to an absent device 1 are ignored", () => {
  const { drv } = diskRig();
  drv.issue(0xec, { unit: 1, device: 0xa0 });
  assert.equal(drv.status(), 0);
  assert.equal(drv.irq.level, false);
  drv.select(0);
  assert.equal(drv.status() & ATA.DRQ, 0);
});

// Bus-master DMA --------------------------------------------------------------

const TABLE = 0x1000;

test("READ DMA: PRD walk with a sector split across regions, Interrupt set, Active clear, INTRQ", () => {
  const { drv, rig } = diskRig();
  drv.writePrd(TABLE, [[0x10000, 0x300], [0x20000, 0x100], [0x30000, 0x400]]);
  drv.bmSetup(TABLE, true);
  drv.irq.calls.length = 0;
  drv.issue(0xc8, { nsect: 4, lba: 20 });
  assert.equal(drv.irq.level, false, "nothing before Start");
  drv.bmStart();
  assert.equal(drv.irq.level, true);
  const bm = drv.bmRead(2);
  assert.equal(bm & 0x07, 0x04, "Interrupt, no Error, not Active");
  drv.bmStop();
  assert.equal(drv.status(), 0x50);
  drv.bmWrite(2, 1, bm);
  assert.equal(drv.bmRead(2) & 0x06, 0);
  const expect = pattern(1, 20 * 512, 2048);
  const m = rig.memory;
  assert.deepEqual(m.bytes(0x10000, 0x300), expect.subarray(0, 0x300));
  assert.deepEqual(m.bytes(0x20000, 0x100), expect.subarray(0x300, 0x400));
  assert.deepEqual(m.bytes(0x30000, 0x400), expect.subarray(0x400));
});

test("WRITE DMA EXT with a 64 KiB region (byte count 0) and Start before the command", () => {
  const { drv, rig, disk } = diskRig();
  const data = pattern(9, 0, 0x10000 + 0x2000);
  rig.memory.write(0x40000, data.subarray(0, 0x10000));
  rig.memory.write(0x60000, data.subarray(0x10000));
  drv.writePrd(TABLE, [[0x40000, 0], [0x60000, 0x2000]]);
  drv.bmSetup(TABLE, false);
  drv.bmStart();
  assert.equal(drv.bmRead(2) & 0x01, 0x01, "Active");
  drv.issue(0x35, { nsect: (0x12000 / 512), lba: 4096, lba48: true });
  assert.equal(drv.irq.level, true);
  assert.equal(drv.bmRead(2) & 0x07, 0x04);
  drv.bmStop();
  assert.equal(drv.status(), 0x50);
  assert.deepEqual(disk.bytes(4096 * 512, data.length), data);
});

test("PRD table longer than the transfer: Active stays set with Interrupt (device ended early)", () => {
  const { drv } = diskRig();
  drv.writePrd(TABLE, [[0x10000, 0x1000]]);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: 1, lba: 0 });
  drv.bmStart();
  assert.equal(drv.bmRead(2) & 0x07, 0x05);
  drv.bmStop();
  assert.equal(drv.bmRead(2) & 0x01, 0);
  assert.equal(drv.status(), 0x50);
});

test("DMA regions that cross host mapping chunks still land whole", () => {
  const memory = new ChunkedGuestMemory([{ gpa: 0, length: MiB, fileOffset: 0 }], (_o, len) => new Uint8Array(len), 0x10000);
  const { drv, rig } = diskRig({ memory });
  drv.writePrd(TABLE, [[0x1ff00, 0x400]]);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: 2, lba: 3 });
  drv.bmStart();
  assert.equal(drv.bmRead(2) & 0x07, 0x04);
  assert.equal(drv.status(), 0x50);
  assert.deepEqual(rig.memory.read(0x1ff00, 0x400), pattern(1, 3 * 512, 0x400));
});

test("malformed PRDs end with the Error bit and an aborted command, never an exception", () => {
  const cases: { name: string; nsect?: number; prep: (d: AtaDriver) => void }[] = [
    { name: "table outside RAM", prep: (d) => d.bmSetup(0x20_0000, true) },
    { name: "region outside RAM", prep: (d) => (d.writePrd(TABLE, [[0xfff0_0000, 0x800]]), d.bmSetup(TABLE, true)) },
    { name: "region straddling the end of RAM", prep: (d) => (d.writePrd(TABLE, [[0xfff00, 0x800]]), d.bmSetup(TABLE, true)) },
    { name: "short table", prep: (d) => (d.writePrd(TABLE, [[0x10000, 0x200]]), d.bmSetup(TABLE, true)) },
    { name: "wrong direction", prep: (d) => (d.writePrd(TABLE, [[0x10000, 0x800]]), d.bmSetup(TABLE, false)) },
    {
      name: "table with no EOT running off its 64 KiB",
      nsect: 64,
      prep: (d) => {
        const m = d.rig.memory;
        for (let i = 0; i < 8192 + 4; i++) m.write(0x80000 + i * 8, new Uint8Array([0, 0, 1, 0, 2, 0, 0, 0]));
        d.bmSetup(0x80000, true);
      },
    },
  ];
  for (const c of cases) {
    const { drv } = diskRig();
    c.prep(drv);
    drv.issue(0xc8, { nsect: c.nsect ?? 4, lba: 0 });
    drv.bmStart();
    assert.equal(drv.bmRead(2) & 0x07, 0x06, `${c.name}: Error + Interrupt, not Active`);
    assert.equal(drv.irq.level, true, c.name);
    assert.equal(drv.status(), 0x51, c.name);
    assert.equal(drv.inb(ATA.ERR), ATA.ABRT, c.name);
    drv.bmStop();
  }
});

test("DMA waits for bus mastering: PCI bus master off ends the transfer with Error", () => {
  const { drv, ide, rig } = diskRig();
  ide.pci.configWrite(0x04, 2, 0x0001);
  drv.writePrd(TABLE, [[0x10000, 0x200]]);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: 1, lba: 0 });
  drv.bmStart();
  assert.equal(drv.bmRead(2) & 0x02, 0x02);
  assert.equal(drv.status() & ATA.ERR_BIT, 1);
  assert.deepEqual(rig.memory.bytes(0x10000, 16), new Uint8Array(16));
});

test("DMA back-end read failure: UNC, Interrupt without bus-master Error (the device ended early)", () => {
  const { drv, disk } = diskRig();
  disk.failReads = true;
  drv.writePrd(TABLE, [[0x10000, 0x200]]);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: 1, lba: 0 });
  drv.bmStart();
  assert.equal(drv.bmRead(2) & 0x06, 0x04);
  assert.equal(drv.status(), 0x51);
  assert.equal(drv.inb(ATA.ERR), ATA.UNC);
});

// DMA runs after the access that starts it (the device thread's deferred work) -------------

test("DMA is deferred: Start returns with the transfer owed (Active, DRQ, no data, no interrupt); the device thread's next turn moves it", () => {
  const { drv, rig } = diskRig();
  rig.work.immediate = false;
  drv.writePrd(TABLE, [[0x10000, 0x400]]);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: 2, lba: 7 });
  drv.bmStart();
  assert.equal(rig.work.tasks.length, 1, "one transfer owed");
  assert.equal(drv.bmRead(2) & 0x07, 0x01, "Active, no Interrupt yet");
  assert.equal(drv.altStatus(), 0x58, "DRDY DSC DRQ: mid-transfer");
  assert.equal(drv.irq.level, false);
  assert.deepEqual(rig.memory.bytes(0x10000, 0x400), new Uint8Array(0x400), "no data before the transfer runs");
  assert.equal(rig.work.run(), 1);
  assert.equal(drv.irq.level, true);
  assert.equal(drv.bmRead(2) & 0x07, 0x04, "Interrupt, not Active");
  assert.deepEqual(rig.memory.bytes(0x10000, 0x400), pattern(1, 7 * 512, 0x400));
  drv.bmStop();
  assert.equal(drv.status(), 0x50);
  assert.equal(rig.work.run(), 0, "nothing else owed");
});

test("port read shadow through a DMA read: Status withdrawn while an interrupt is pending, Alternate Status and bus-master status current before the interrupt rises", () => {
  const { drv, rig } = diskRig({ slave: true });
  const { shadow } = rig;
  const at = (port: number): number | undefined => shadow.values.get(port);
  const BM = 0xc000;
  // After set-up: both channels' Status / Alternate Status and both channels' bus-master command and status.
  assert.deepEqual([...shadow.values.keys()].sort((a, b) => a - b), [0x177, 0x1f7, 0x376, 0x3f6, BM, BM + 2, BM + 8, BM + 10]);
  assert.equal(at(0x3f6), 0x50, "DRDY DSC");
  assert.equal(at(0x376), 0xff, "empty secondary channel floats");
  rig.work.immediate = false;
  drv.writePrd(TABLE, [[0x10000, 0x400]]);
  drv.bmSetup(TABLE, true);
  assert.equal(at(BM), 0x08, "direction written, published at once");
  drv.issue(0xc8, { nsect: 2, lba: 7 });
  drv.bmStart();
  assert.equal(at(BM), 0x09);
  assert.equal(at(BM + 2)! & 0x07, 0x01, "Active");
  assert.equal(at(0x3f6), 0x58, "mid-transfer: DRQ");
  assert.equal(at(0x1f7), 0x58, "no interrupt pending: Status reads without side effect");
  // The interrupt rises inside the deferred transfer: what its handler reads must be published by then.
  const seenAtRise: (number | undefined)[][] = [];
  const irq = rig.irq[0];
  const setLevel = irq.setLevel.bind(irq);
  irq.setLevel = (level) => {
    if (level) seenAtRise.push([at(0x1f7), at(0x3f6), at(BM + 2)]);
    setLevel(level);
  };
  assert.equal(rig.work.run(), 1);
  assert.deepEqual(seenAtRise, [[undefined, 0x50, 0x04]], "at the rising edge: Status forwarded (it acknowledges), Alternate Status done, Interrupt set and not Active");
  assert.equal(checkPortShadow(rig.ide, shadow, rig.irq, "after the transfer"), 7);
  drv.bmStop();
  assert.equal(drv.status(), 0x50, "the forwarded Status read acknowledges");
  assert.equal(irq.level, false);
  assert.equal(at(0x1f7), 0x50, "published again once nothing is pending");
  // Selecting device 1 publishes its status; moving BAR4 moves the bus-master entries.
  drv.select(1);
  assert.equal(at(0x1f7), 0x50);
  rig.ide.pci.configWrite(0x20, 4, 0xd001);
  rig.ide.afterAccess();
  assert.deepEqual([BM, BM + 2, BM + 8, BM + 10].map((p) => shadow.values.has(p)), [false, false, false, false], "the old address is withdrawn");
  assert.equal(at(0xd000 + 2)! & 0x04, 0x04, "Interrupt still set (write one to clear) at the new address");
  // PCI I/O decoding off: every compatibility port floats.
  rig.ide.pci.configWrite(0x04, 2, 0x04);
  rig.ide.afterAccess();
  assert.deepEqual([at(0x1f7), at(0x3f6), shadow.values.has(0xd000)], [0xff, 0xff, false]);
  assert.ok(checkPortShadow(rig.ide, shadow, rig.irq, "decoding off") >= 4);
});

test("posted writes: every compatibility port and the bus-master ports where BAR4 decodes now", () => {
  const { rig } = diskRig();
  const range = (start: number, n: number): number[] => Array.from({ length: n }, (_, i) => start + i);
  const expected = (bm: number[]): number[] => [...range(0x170, 8), ...range(0x1f0, 8), 0x376, 0x3f6, ...bm].sort((a, b) => a - b);
  const now = (): number[] => [...rig.posted.ports].sort((a, b) => a - b);
  assert.deepEqual(now(), expected(range(0xc000, 16)));
  rig.ide.pci.configWrite(0x20, 4, 0xd001);
  rig.ide.afterAccess();
  assert.deepEqual(now(), expected(range(0xd000, 16)), "BAR4 moved: the old ports are refused, the new accepted");
  rig.ide.pci.configWrite(0x04, 2, 0x04);
  rig.ide.afterAccess();
  assert.deepEqual(now(), expected([]), "I/O decoding off: no bus-master ports");
});

test("deferred DMA: Stop before it runs leaves the command waiting for the engine; Start again moves it once", () => {
  const { drv, rig } = diskRig();
  rig.work.immediate = false;
  drv.writePrd(TABLE, [[0x10000, 0x200]]);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: 1, lba: 3 });
  drv.bmStart();
  drv.bmStop();
  rig.work.run();
  assert.deepEqual(rig.memory.bytes(0x10000, 0x200), new Uint8Array(0x200), "a stopped engine moves nothing");
  assert.equal(drv.irq.level, false);
  assert.equal(drv.altStatus() & ATA.DRQ, ATA.DRQ, "the command still waits");
  drv.bmStart();
  drv.bmStop();
  drv.bmStart(); // two Starts before the device thread runs: still one transfer
  assert.equal(rig.work.run(), 1);
  assert.deepEqual(rig.memory.bytes(0x10000, 0x200), pattern(1, 3 * 512, 0x200));
  assert.equal(drv.irq.level, true);
  assert.equal(drv.status(), 0x50);
});

test("deferred DMA: a reset (SRST) or a new command before it runs drops it; nothing moves", () => {
  for (const how of ["srst", "command"] as const) {
    const { drv, rig, disk } = diskRig();
    rig.work.immediate = false;
    rig.memory.write(0x10000, pattern(5, 0, 0x200));
    drv.writePrd(TABLE, [[0x10000, 0x200]]);
    drv.bmSetup(TABLE, false);
    drv.issue(0xca, { nsect: 1, lba: 9 });
    drv.bmStart();
    const before = disk.writes;
    if (how === "srst") drv.softreset();
    else drv.issue(0xe7); // FLUSH CACHE: a new command while DRQ is set
    rig.work.run();
    assert.equal(disk.writes, before, `${how}: the owed write never reached the disk`);
    assert.deepEqual(disk.bytes(9 * 512, 0x200), pattern(1, 9 * 512, 0x200), `${how}: disk unchanged`);
  }
});

test("deferred DMA: save() runs an owed transfer first, so the saved state holds its completion", () => {
  const { drv, rig, ide } = diskRig();
  rig.work.immediate = false;
  drv.writePrd(TABLE, [[0x10000, 0x200]]);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: 1, lba: 1 });
  drv.bmStart();
  const saved = ide.save();
  assert.equal(saved.channels[0]!.busMaster.status & 0x07, 0x04, "saved after completion: Interrupt, not Active");
  assert.equal(saved.channels[0]!.devices[0]!.dmaPending, false);
  assert.deepEqual(rig.memory.bytes(0x10000, 0x200), pattern(1, 512, 0x200));
  assert.equal(drv.irq.level, true);
  assert.equal(rig.work.run(), 1, "the scheduled turn still comes");
  assert.equal(drv.bmRead(2) & 0x07, 0x04, "and finds nothing left to do");
});

test("DMA into host-mapped guest RAM from a raw image: one scatter/gather call for the whole PRD table, reads and writes", () => {
  const dir = mkdtempSync(join(tmpdir(), "partis-ide-host-"));
  const path = join(dir, "disk.raw");
  writeFileSync(path, pattern(3, 0, 2 * MiB));
  const disk = openRaw(path);
  try {
    const memory = makeServices(MiB, 1 << 30, true).memory;
    const rig = makeRig([{ channel: 0, unit: 0, kind: "disk", device: disk }], memory);
    const drv = new AtaDriver(rig, 0);
    const bm = rig.ide.channels[0].busMaster;
    // Read 8 sectors into four regions, one of them an odd split of a sector.
    drv.writePrd(TABLE, [[0x20000, 0x300], [0x30000, 0x500], [0x40000, 0x200], [0x50000, 0x600]]);
    drv.bmSetup(TABLE, true);
    drv.issue(0xc8, { nsect: 6, lba: 100 });
    drv.bmStart();
    assert.equal(drv.bmRead(2) & 0x07, 0x05, "Interrupt; Active: the table is longer than the transfer");
    drv.bmStop();
    assert.equal(drv.status(), 0x50);
    const expect = pattern(3, 100 * 512, 0xc00);
    assert.deepEqual(memory.read(0x20000, 0x300), expect.subarray(0, 0x300));
    assert.deepEqual(memory.read(0x30000, 0x500), expect.subarray(0x300, 0x800));
    assert.deepEqual(memory.read(0x40000, 0x200), expect.subarray(0x800, 0xa00));
    assert.deepEqual(memory.read(0x50000, 0x200), expect.subarray(0xa00, 0xc00), "the last region is cut to the transfer");
    assert.equal(bm.hostTransfers, 1);
    assert.equal(bm.viewTransfers, 0);
    // Write them back elsewhere, gathered from the same regions.
    drv.bmSetup(TABLE, false);
    drv.issue(0xca, { nsect: 6, lba: 2000 });
    drv.bmStart();
    drv.bmStop();
    assert.equal(drv.status(), 0x50);
    assert.equal(bm.hostTransfers, 2);
    disk.flush();
    assert.deepEqual(new Uint8Array(readFileSync(path).subarray(2000 * 512, 2000 * 512 + 0xc00)), expect);
    // A transfer past the end of the disk: IDNF before any data moves (the range check comes first).
    drv.issue(0xc8, { nsect: 1, lba: 4096 });
    assert.equal(drv.status() & ATA.ERR_BIT, 1);
  } finally {
    disk.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

// DMA on the controller's io_uring: the device thread never waits for the disk --------------

/** The raw image, but every transfer goes on the ring (as when the page cache cannot take it at once), on `fd`. */
function alwaysQueued(disk: BlockDevice, fd: number): BlockDevice {
  return Object.assign(Object.create(disk) as BlockDevice, {
    queueHost: (queue: HostIoQueue, write: boolean, offset: number, a: Float64Array, l: Uint32Array, n: number, token: number) =>
      queue.prepareVectored(write, fd, offset, a, l, n, token) ? ("queued" as const) : false,
  });
}

function withRawImage(fn: (disk: BlockDevice, path: string) => void): void {
  const dir = mkdtempSync(join(tmpdir(), "partis-ide-ring-"));
  const path = join(dir, "disk.raw");
  writeFileSync(path, pattern(3, 0, 2 * MiB));
  const disk = openRaw(path);
  try {
    fn(disk, path);
  } finally {
    disk.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A controller on a scripted ring (completions when the test says), its disk always queueing, RAM host-mapped; a READ DMA started. */
function ringRig(disk: BlockDevice, read: { bytes: number; lba: number }) {
  const ring = new ScriptedRing();
  const memory = makeServices(MiB, 1 << 30, true).memory;
  const rig = makeRig([{ channel: 0, unit: 0, kind: "disk", device: alwaysQueued(disk, -1) }], memory, ring);
  const drv = new AtaDriver(rig, 0);
  drv.writePrd(TABLE, [[0x20000, read.bytes]]);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: read.bytes / 512, lba: read.lba });
  drv.bmStart();
  return { ring, memory, rig, drv, bm: rig.ide.channels[0].busMaster };
}

test("DMA on the ring: the drive stays mid-transfer until the completion, which ends it as a synchronous transfer ends; a short one is redone, a failed one is UNC", () => {
  withRawImage((disk) => {
    const { ring, memory, rig, drv, bm } = ringRig(disk, { bytes: 0x800, lba: 10 });
    assert.equal(bm.queuedTransfers, 1, "on the ring");
    assert.deepEqual(ring.prepared, [0], "token: channel 0");
    assert.equal(drv.altStatus(), 0x58, "mid-transfer: DRDY DSC DRQ");
    assert.equal(drv.bmRead(2) & 0x07, 0x01, "Active, no Interrupt");
    assert.equal(drv.irq.level, false);
    assert.deepEqual(memory.read(0x20000, 0x800), new Uint8Array(0x800));
    assert.equal(checkPortShadow(rig.ide, rig.shadow, rig.irq, "in flight"), 8);
    assert.equal(rig.shadow.values.get(0x1f7), 0x58, "Status published as mid-transfer");
    assert.match(rig.ide.describeState()[0]!, /ide0 channel 0: disk 0 status 0x58, control 0x0, bus master command 0x9 status 0x1 table 0x1000, a transfer on the ring/);

    // The completion comes back short: redone synchronously from the same spans.
    ring.ready = true;
    ring.results = [512];
    rig.ide.completeQueued();
    assert.equal(bm.shortCompletions, 1);
    assert.deepEqual(memory.read(0x20000, 0x800), pattern(3, 10 * 512, 0x800), "all four sectors");
    assert.equal(drv.irq.level, true);
    assert.equal(drv.bmRead(2) & 0x07, 0x04, "Interrupt; Active clear (the table ended with the transfer)");
    assert.equal(rig.shadow.values.has(0x1f7), false, "Status withdrawn: it would acknowledge the interrupt");
    assert.equal(checkPortShadow(rig.ide, rig.shadow, rig.irq, "completed"), 7);
    drv.bmStop();
    assert.equal(drv.status(), 0x50);

    // A completion that failed: UNC, as a synchronous read failure.
    ring.ready = false;
    drv.issue(0xc8, { nsect: 4, lba: 20 });
    drv.bmSetup(TABLE, true);
    drv.bmStart();
    assert.equal(bm.queuedTransfers, 2);
    ring.ready = true;
    ring.results = [-5];
    rig.ide.completeQueued();
    assert.equal(drv.status(), 0x51);
    assert.equal(drv.inb(ATA.ERR), ATA.UNC);
    const cause = (rig.ide.drive(0, 0) as { lastBackendError?: unknown }).lastBackendError;
    assert.match(String(cause), /read of 2048 bytes at 10240 failed \(errno 5\)/);
  });
});

test("DMA on the ring: a register write, a save or a reset first waits for the transfer in flight (a drive finishes its DMA before it takes a write); reads do not wait", () => {
  withRawImage((disk) => {
    for (const how of ["command-block", "device-control", "bus-master", "save", "reset"] as const) {
      const { ring, memory, rig, drv, bm } = ringRig(disk, { bytes: 0x200, lba: 5 });
      assert.equal(bm.inFlightNow, true, how);
      ring.results = [512];
      drv.altStatus();
      drv.bmRead(2);
      assert.equal(bm.inFlightNow, true, `${how}: reads do not wait`);
      const rises = drv.irq.calls.filter((c) => c).length;
      if (how === "command-block") drv.outb(ATA.NSECT, 1);
      else if (how === "device-control") drv.writeCtl(ATA.OBS | ATA.NIEN);
      else if (how === "bus-master") drv.bmStop();
      else if (how === "save") {
        const saved = rig.ide.save();
        assert.equal(saved.channels[0]!.busMaster.status & 0x07, 0x04, "saved after the completion");
      } else rig.ide.reset();
      assert.equal(bm.inFlightNow, false, `${how}: the transfer ended first`);
      assert.equal(ring.prepared.length, 0, `${how}: drained`);
      if (how !== "reset") {
        assert.equal(drv.irq.calls.filter((c) => c).length, rises + 1, `${how}: its interrupt rose before the write took effect`);
        assert.deepEqual(memory.read(0x20000, 4), new Uint8Array(4), `${how}: (the scripted ring moves no data)`);
      }
    }
  });
});

test("DMA on a real io_uring: reads and writes through the ring land whole, in guest RAM and in the file", () => {
  withRawImage((disk, path) => {
    const fd = openSync(path, "r+");
    const ring = IoUring.open(8);
    try {
      const memory = makeServices(MiB, 1 << 30, true).memory;
      const rig = makeRig([{ channel: 0, unit: 0, kind: "disk", device: alwaysQueued(disk, fd) }], memory, ring);
      const drv = new AtaDriver(rig, 0);
      const bm = rig.ide.channels[0].busMaster;
      const fds = new Int32Array([ring.eventFd, 0]);
      const finish = (): void => {
        // As the device thread's poll loop: completeQueued only once the ring's eventfd is readable (the kernel
        // signals only completions that came after submitting: those during it the engine reaps itself).
        for (let i = 0; bm.inFlightNow && i < 1000; i++) {
          fds[1] = 1; // POLLIN
          if (poll(fds, 1, 5) > 0) rig.ide.completeQueued();
        }
        assert.equal(bm.inFlightNow, false, "completed");
      };
      drv.writePrd(TABLE, [[0x20000, 0x300], [0x30000, 0x500], [0x40000, 0x200]]);
      drv.bmSetup(TABLE, true);
      drv.issue(0xc8, { nsect: 5, lba: 100 });
      drv.bmStart();
      finish();
      assert.equal(bm.queuedTransfers, 1);
      assert.equal(drv.irq.level, true);
      drv.bmStop();
      assert.equal(drv.status(), 0x50);
      const expect = pattern(3, 100 * 512, 0xa00);
      assert.deepEqual(Buffer.concat([memory.read(0x20000, 0x300), memory.read(0x30000, 0x500), memory.read(0x40000, 0x200)]), Buffer.from(expect));
      drv.bmSetup(TABLE, false);
      drv.issue(0xca, { nsect: 5, lba: 3000 });
      drv.bmStart();
      finish();
      drv.bmStop();
      assert.equal(drv.status(), 0x50);
      assert.equal(bm.queuedTransfers, 2);
      assert.deepEqual(new Uint8Array(readFileSync(path).subarray(3000 * 512, 3000 * 512 + 0xa00)), expect);
      assert.deepEqual(rig.ide.dmaStats(), { dmaQueued: 2, dmaShortCompletions: 0, dmaHost: 0, dmaViews: 0 });
      rig.ide.quiesce();
    } finally {
      ring.close();
      closeSync(fd);
    }
  });
});

test("bus-master registers: PRD pointer dword aligned, status bits write-one-to-clear, drive DMA bits stored", () => {
  const { drv } = diskRig();
  drv.bmWrite(4, 4, 0x1234_5677);
  assert.equal(drv.bmRead(4, 4), 0x1234_5674);
  drv.bmWrite(2, 1, 0x60);
  assert.equal(drv.bmRead(2), 0x60);
  drv.bmWrite(0, 1, 0xff);
  assert.equal(drv.bmRead(0), 0x09);
  drv.bmWrite(0, 1, 0x01); // direction is kept while started
  assert.equal(drv.bmRead(0), 0x09);
  drv.bmWrite(0, 1, 0x00);
  assert.equal(drv.bmRead(2) & 0x01, 0);
  assert.equal(drv.ide.barRead(4, 8, 1), 0, "secondary channel registers are separate");
  assert.equal(drv.ide.barRead(0, 0, 4), 0xffff_ffff);
});

test("save(): plain data with kind and version; transfer position included", () => {
  const { drv, ide } = diskRig();
  drv.issue(0x20, { nsect: 2, lba: 0 });
  drv.readData(100);
  const s = ide.save();
  assert.equal(s.kind, "piix-ide");
  assert.equal(s.version, 1);
  const dev = s.channels[0]!.devices[0]!;
  assert.equal(dev.pos, 100);
  assert.equal(dev.end, 512);
  assert.equal(dev.buffer.length, 512);
  assert.deepEqual(JSON.parse(JSON.stringify(s)), s, "JSON round trip");
  assert.equal(s.channels[0]!.disks[0]!.left, 2);
});

test("libata probe and first I/O, end to end: prereset, devchk, SRST, classify, IDENTIFY (polled), SET FEATURES XFER, revalidate, DMA and PIO32 reads", () => {
  const { drv, ide, rig, disk } = diskRig({ slave: true });
  // piix_pata_prereset: both channels enabled in IDETIM.
  assert.equal(ide.pci.configRead(0x41, 1) & 0x80, 0x80);
  assert.equal(ide.pci.configRead(0x43, 1) & 0x80, 0x80);
  // ata_pci_bmdma_init: BAR4 assigned, simplex clear.
  assert.equal(ide.pci.configRead(0x20, 4) & ~3, 0xc000);
  assert.equal(drv.bmRead(2) & 0x80, 0);
  drv.ctlValue = ATA.OBS | ATA.NIEN; // probing runs polled
  const devmask = [drv.devchk(0), drv.devchk(1)];
  assert.deepEqual(devmask, [true, true]);
  drv.softreset();
  assert.deepEqual([drv.classify(0), drv.classify(1)], ["ata", "ata"]);
  for (const unit of [0, 1] as const) {
    const id = drv.identify(unit);
    assert.equal(idString(id, 10, 10), unit === 0 ? "SN-0001" : "SN-0002");
    // piix_set_piomode / set_dmamode write the timing registers.
    ide.pci.configWrite(0x40, 2, 0xe3f7);
    ide.pci.configWrite(0x44, 1, 0x0b);
    drv.issue(0xef, { feature: 0x03, nsect: 0x0c, device: 0xa0, unit });
    assert.equal(drv.status() & ATA.ERR_BIT, 0);
    drv.issue(0xef, { feature: 0x03, nsect: 0x22, device: 0xa0, unit });
    assert.equal(drv.status() & ATA.ERR_BIT, 0);
    const again = drv.identify(unit);
    assert.equal(again[63], 0x0407, "MWDMA2 selected");
    assert.deepEqual(again.subarray(10, 47), id.subarray(10, 47), "revalidate: same identity");
  }
  assert.equal(drv.irq.calls.filter((l) => l).length, 0, "nothing interrupted while nIEN was set");
  // Interrupt-driven DMA of the partition table sector, as the block layer does next.
  drv.ctlValue = ATA.OBS;
  drv.writeCtl(drv.ctlValue);
  drv.writePrd(TABLE, [[0x50000, 512]]);
  drv.select(0);
  drv.bmSetup(TABLE, true);
  drv.issue(0xc8, { nsect: 1, lba: 0 });
  drv.bmStart();
  assert.equal(drv.irq.level, true);
  const bmst = drv.bmRead(2);
  assert.equal(bmst & 0x04, 0x04);
  drv.bmStop();
  drv.altStatus();
  assert.equal(drv.status(), 0x50);
  drv.bmWrite(2, 1, bmst);
  assert.equal(drv.irq.level, false);
  assert.deepEqual(rig.memory.bytes(0x50000, 512), disk.bytes(0, 512));
  // ata_sff_data_xfer32: 32-bit PIO data reads.
  drv.issue(0x20, { nsect: 1, lba: 1 });
  assert.equal(drv.status() & ATA.DRQ, ATA.DRQ);
  assert.deepEqual(drv.readData(512, 4), disk.bytes(512, 512));
});

test("SET FEATURES look-ahead and revert-to-defaults; 4 KiB physical sectors in word 106", () => {
  const { drv } = diskRig();
  for (const f of [0x55, 0xaa, 0x66, 0xcc, 0x02]) {
    drv.issue(0xef, { feature: f, device: 0xa0 });
    assert.equal(drv.status() & ATA.ERR_BIT, 0, `feature 0x${f.toString(16)}`);
  }
  drv.issue(0xef, { feature: 0x55, device: 0xa0 });
  assert.equal(drv.identify(0)[85]! & 0x40, 0, "look-ahead disabled");
  const rig = makeRig([{ channel: 0, unit: 0, kind: "disk", device: new MemoryDisk(MiB, false, 4096) }]);
  assert.equal(new AtaDriver(rig, 0).identify(0)[106], 0x6003);
});

test("back-end write and flush failures abort the command (PIO and DMA)", () => {
  const { drv, disk, ide } = diskRig();
  disk.failWrites = true;
  drv.issue(0x30, { nsect: 2, lba: 4 });
  drv.writeData(new Uint8Array(512));
  assert.equal(drv.status() & (ATA.ERR_BIT | ATA.DRQ), ATA.ERR_BIT);
  assert.equal(drv.inb(ATA.ERR), ATA.ABRT);
  drv.writePrd(TABLE, [[0x10000, 0x200]]);
  drv.bmSetup(TABLE, false);
  drv.issue(0xca, { nsect: 1, lba: 0 });
  drv.bmStart();
  assert.equal(drv.status(), 0x51);
  drv.bmStop();
  disk.failWrites = false;
  disk.flush = () => {
    throw new Error("flush failed");
  };
  drv.issue(0xe7, { device: 0xa0 });
  assert.equal(drv.inb(ATA.ERR), ATA.ABRT);
  assert.ok(ide.drive(0, 0)?.lastBackendError instanceof Error);
  assert.throws(() => ide.changeMedium(0, 0, undefined), IdeConfigError);
});
