/**
 * Test support for the PIIX IDE model: an in-memory sparse BlockDevice, the
 * PCI services fake, and a driver that talks to the controller the way Linux
 * ata_piix + libata-sff do (register order, SRST protocol, PIO data moved with
 * repeated 16- or 32-bit data port accesses, BMDMA setup/start/stop).
 */
import assert from "node:assert/strict";
import type { BlockDevice, AllocationExtent, BlockRequestRing } from "../../../src/storage/block-device.js";
import { DiskError } from "../../../src/storage/block-device.js";
import { ChunkedGuestMemory, type GuestMemory } from "../../../src/machine/guest-memory.js";
import type { PciDeviceServices, PortReadShadow, PostedWritePorts } from "../../../src/devices/pci/device-thread-services.js";
import { PiixIde, type IdeDriveConfig } from "../../../src/devices/emulated/ide/piix-ide.js";
import { DeferredWork, RecordingIrqLine, RecordingPortShadow, RecordingPostedWritePorts } from "../device-fakes.js";

const PAGE = 4096;

/** A sparse in-memory disk (4 KiB pages on demand); reads of unwritten space return zeros. */
export class MemoryDisk implements BlockDevice {
  readonly format = "raw" as const;
  readonly type = "raw" as const;
  readonly logicalSectorSize = 512;
  readonly parent = undefined;
  private readonly pages = new Map<number, Uint8Array>();
  flushes = 0;
  reads = 0;
  writes = 0;
  failReads = false;
  failWrites = false;

  constructor(
    readonly size: number,
    readonly readOnly = false,
    readonly physicalSectorSize = 512,
    readonly path = "memory-disk",
  ) {}

  private check(offset: number, length: number): void {
    if (offset < 0 || offset + length > this.size)
      throw new DiskError("DISK_RANGE", `range ${offset}+${length} is past the end`, this.path, { offset, length });
  }

  read(offset: number, buf: Uint8Array): void {
    this.check(offset, buf.length);
    if (this.failReads) throw new DiskError("DISK_IO", "injected read failure", this.path, { offset });
    this.reads++;
    let done = 0;
    while (done < buf.length) {
      const at = offset + done;
      const page = Math.floor(at / PAGE);
      const within = at - page * PAGE;
      const n = Math.min(PAGE - within, buf.length - done);
      const p = this.pages.get(page);
      if (p === undefined) buf.fill(0, done, done + n);
      else buf.set(p.subarray(within, within + n), done);
      done += n;
    }
  }

  write(offset: number, buf: Uint8Array): void {
    this.check(offset, buf.length);
    if (this.readOnly) throw new DiskError("DISK_READ_ONLY", "read-only", this.path);
    if (this.failWrites) throw new DiskError("DISK_IO", "injected write failure", this.path, { offset });
    this.writes++;
    let done = 0;
    while (done < buf.length) {
      const at = offset + done;
      const page = Math.floor(at / PAGE);
      const within = at - page * PAGE;
      const n = Math.min(PAGE - within, buf.length - done);
      let p = this.pages.get(page);
      if (p === undefined) {
        p = new Uint8Array(PAGE);
        this.pages.set(page, p);
      }
      p.set(buf.subarray(done, done + n), within);
      done += n;
    }
  }

  /** Test set-up write that ignores readOnly. */
  fill(offset: number, data: Uint8Array): void {
    const ro = this.readOnly;
    (this as { readOnly: boolean }).readOnly = false;
    try {
      this.write(offset, data);
    } finally {
      (this as { readOnly: boolean }).readOnly = ro;
    }
  }

  bytes(offset: number, length: number): Uint8Array {
    const out = new Uint8Array(length);
    this.read(offset, out);
    return out;
  }

  flush(): void {
    this.flushes++;
  }
  discard(): void {}
  allocation(offset: number, length: number): AllocationExtent[] {
    return [{ offset, length, state: "allocated" }];
  }
  close(): void {}
}

/** A byte pattern that identifies (disk, offset). */
export function pattern(seed: number, offset: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) {
    const x = offset + i;
    out[i] = (Math.imul(x >>> 1, 2654435761) >>> 24) ^ (x & 0xff) ^ seed;
  }
  return out;
}

export function fakeServices(memory: GuestMemory, work = new DeferredWork(), portShadow?: PortReadShadow, postedWrites?: PostedWritePorts): PciDeviceServices {
  return {
    memory,
    intx: new RecordingIrqLine(),
    msi: { signal() {} },
    loop: { watch: () => ({ close() {} }), watchWritable: () => ({ close() {} }), defer: (task) => work.defer(task) },
    doorbells: { mapDoorbell() {} },
    ...(portShadow !== undefined ? { portShadow } : {}),
    ...(postedWrites !== undefined ? { postedWrites } : {}),
  };
}

export interface Rig {
  ide: PiixIde;
  memory: ChunkedGuestMemory;
  irq: [RecordingIrqLine, RecordingIrqLine];
  /** The device thread's deferred work (DMA transfers); run at once unless `work.immediate` is turned off. */
  work: DeferredWork;
  /** What the controller published for the vCPUs to answer themselves (port read shadow). */
  shadow: RecordingPortShadow;
  /** The ports it takes posted writes on. */
  posted: RecordingPostedWritePorts;
}

/** RAM: [0, 1 MiB) by default. `ring`: where DMA transfers go when the disk can queue them. */
export function makeRig(drives: IdeDriveConfig[], memory?: ChunkedGuestMemory, ring?: BlockRequestRing): Rig {
  const mem = memory ?? ChunkedGuestMemory.anonymous([{ gpa: 0, length: 1 << 20, fileOffset: 0 }]);
  const irq: [RecordingIrqLine, RecordingIrqLine] = [new RecordingIrqLine(), new RecordingIrqLine()];
  const work = new DeferredWork();
  const shadow = new RecordingPortShadow();
  const posted = new RecordingPostedWritePorts();
  const ide = new PiixIde("ide0", fakeServices(mem, work, shadow, posted), { primaryIrq: irq[0], secondaryIrq: irq[1], drives, ...(ring !== undefined ? { ring } : {}) });
  ide.pci.assignBar(4, 0xc000);
  ide.pci.enableDecoding();
  ide.afterAccess(); // as the device thread's bus does after firmware set-up
  return { ide, memory: mem, irq, work, shadow, posted };
}

/**
 * Every port the controller published in the read shadow reads back, for
 * real, as published, and that read changes nothing (no interrupt line
 * moves): a vCPU answering it itself is indistinguishable from forwarding it.
 * Published ports must be the channels' Status / Alternate Status or the
 * bus-master registers at BAR4's current address. Returns how many were checked.
 */
export function checkPortShadow(ide: PiixIde, shadow: RecordingPortShadow, irq: readonly RecordingIrqLine[], where: string): number {
  const base = ide.pci.mappedAddress(4);
  let checked = 0;
  for (const [port, value] of [...shadow.values]) {
    const calls = irq.map((l) => l.calls.length);
    let actual: number;
    if (port === 0x1f7) actual = ide.isaRead("primary", 7, 1);
    else if (port === 0x177) actual = ide.isaRead("secondary", 7, 1);
    else if (port === 0x3f6) actual = ide.isaRead("primary-control", 0, 1);
    else if (port === 0x376) actual = ide.isaRead("secondary-control", 0, 1);
    else {
      assert.ok(base !== undefined && [0, 2, 8, 10].includes(port - base), `${where}: port 0x${port.toString(16)} is published but is not the controller's now`);
      actual = ide.barRead(4, port - base, 1);
    }
    assert.equal(actual, value, `${where}: port 0x${port.toString(16)} published as 0x${value.toString(16)} reads 0x${actual.toString(16)}`);
    assert.deepEqual(irq.map((l) => l.calls.length), calls, `${where}: reading published port 0x${port.toString(16)} moved an interrupt line`);
    checked++;
  }
  return checked;
}

// Register offsets / bits used by the driver.
export const ATA = {
  DATA: 0, ERR: 1, FEAT: 1, NSECT: 2, LBAL: 3, LBAM: 4, LBAH: 5, DEVICE: 6, STATUS: 7, CMD: 7,
  BSY: 0x80, DRDY: 0x40, DRQ: 0x08, ERR_BIT: 0x01,
  NIEN: 0x02, SRST: 0x04, HOB: 0x80, OBS: 0x08,
  ABRT: 0x04, IDNF: 0x10, UNC: 0x40,
} as const;

/** One channel, driven the libata-sff way. */
export class AtaDriver {
  readonly cmd: string;
  readonly ctl: string;
  readonly bmBase: number;
  /** Device Control as the driver keeps it (ap->ctl). */
  ctlValue: number = ATA.OBS;

  constructor(readonly rig: Rig, readonly channel: 0 | 1) {
    this.cmd = channel === 0 ? "primary" : "secondary";
    this.ctl = channel === 0 ? "primary-control" : "secondary-control";
    this.bmBase = channel * 8;
  }

  get ide(): PiixIde {
    return this.rig.ide;
  }
  get irq(): RecordingIrqLine {
    return this.rig.irq[this.channel];
  }

  // Every access ends as the device bus ends a request: with afterAccess.
  private read(region: string, reg: number, size: 1 | 2 | 4): number {
    const v = this.ide.isaRead(region, reg, size);
    this.ide.afterAccess();
    return v;
  }
  private write(region: string, reg: number, size: 1 | 2 | 4, v: number): void {
    this.ide.isaWrite(region, reg, size, v);
    this.ide.afterAccess();
  }

  outb(reg: number, v: number): void {
    this.write(this.cmd, reg, 1, v);
  }
  inb(reg: number): number {
    return this.read(this.cmd, reg, 1);
  }
  status(): number {
    return this.inb(ATA.STATUS);
  }
  altStatus(): number {
    return this.read(this.ctl, 0, 1);
  }
  writeCtl(v: number): void {
    this.write(this.ctl, 0, 1, v);
  }
  select(unit: 0 | 1, extra = 0): void {
    this.outb(ATA.DEVICE, 0xa0 | (unit << 4) | extra);
  }

  /** ata_devchk: does a device latch nsect/lbal? */
  devchk(unit: 0 | 1): boolean {
    this.select(unit);
    this.outb(ATA.NSECT, 0x55);
    this.outb(ATA.LBAL, 0xaa);
    this.outb(ATA.NSECT, 0xaa);
    this.outb(ATA.LBAL, 0x55);
    this.outb(ATA.NSECT, 0x55);
    this.outb(ATA.LBAL, 0xaa);
    return this.inb(ATA.NSECT) === 0x55 && this.inb(ATA.LBAL) === 0xaa;
  }

  /** ata_bus_softreset. */
  softreset(): void {
    this.writeCtl(this.ctlValue);
    this.writeCtl(this.ctlValue | ATA.SRST);
    assert.ok((this.altStatus() & ATA.BSY) !== 0, "BSY while SRST is held");
    this.writeCtl(this.ctlValue);
  }

  /** ata_sff_dev_classify: "ata", "atapi" or "none". */
  classify(unit: 0 | 1): "ata" | "atapi" | "none" {
    this.select(unit);
    const err = this.inb(ATA.ERR);
    if (!(err === 0 || err === 1 || (unit === 0 && err === 0x81))) return "none";
    const lbam = this.inb(ATA.LBAM);
    const lbah = this.inb(ATA.LBAH);
    if (lbam === 0 && lbah === 0) return this.status() === 0 ? "none" : "ata";
    if (lbam === 0x14 && lbah === 0xeb) return "atapi";
    return "none";
  }

  /** Issue a command through the taskfile (ata_sff_tf_load + exec_command). */
  issue(command: number, tf: { feature?: number; nsect?: number; lba?: number; device?: number; lba48?: boolean; unit?: 0 | 1 } = {}): void {
    const unit = tf.unit ?? 0;
    const lba = tf.lba ?? 0;
    if (tf.lba48 === true) {
      const nsect = tf.nsect ?? 0;
      this.outb(ATA.FEAT, 0);
      this.outb(ATA.NSECT, (nsect >>> 8) & 0xff);
      this.outb(ATA.LBAL, Math.floor(lba / 2 ** 24) & 0xff);
      this.outb(ATA.LBAM, Math.floor(lba / 2 ** 32) & 0xff);
      this.outb(ATA.LBAH, Math.floor(lba / 2 ** 40) & 0xff);
    }
    this.outb(ATA.FEAT, tf.feature ?? 0);
    this.outb(ATA.NSECT, (tf.nsect ?? 0) & 0xff);
    this.outb(ATA.LBAL, lba & 0xff);
    this.outb(ATA.LBAM, (lba >>> 8) & 0xff);
    this.outb(ATA.LBAH, (lba >>> 16) & 0xff);
    const dev = tf.device ?? (0xe0 | (tf.lba48 === true ? 0 : Math.floor(lba / 2 ** 24) & 0x0f));
    this.outb(ATA.DEVICE, dev | (unit << 4));
    this.outb(ATA.CMD, command);
  }

  /**
   * Read n bytes of the current DRQ block(s) with 16-bit (or 32-bit) data port
   * reads: one string access (`rep insw`, which KVM hands over whole), so one
   * afterAccess at the end.
   */
  readData(n: number, width: 2 | 4 = 2): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i += width) {
      const v = this.ide.isaRead(this.cmd, ATA.DATA, width);
      for (let k = 0; k < width && i + k < n; k++) out[i + k] = (v >>> (8 * k)) & 0xff;
    }
    this.ide.afterAccess();
    return out;
  }

  /** Writes go one element per request (KVM exits for each element of `rep outsw`). */
  writeData(data: Uint8Array, width: 2 | 4 = 2): void {
    for (let i = 0; i < data.length; i += width) {
      let v = 0;
      for (let k = 0; k < width && i + k < data.length; k++) v |= data[i + k]! << (8 * k);
      this.write(this.cmd, ATA.DATA, width, v >>> 0);
    }
  }

  /** IDENTIFY (DEVICE or PACKET DEVICE) words. */
  identify(unit: 0 | 1, command = 0xec): Uint16Array {
    this.issue(command, { unit, device: 0xa0 });
    const st = this.status();
    assert.equal(st & (ATA.BSY | ATA.DRQ | ATA.ERR_BIT), ATA.DRQ, `IDENTIFY status 0x${st.toString(16)}`);
    const bytes = this.readData(512);
    assert.equal(this.altStatus() & ATA.DRQ, 0);
    return new Uint16Array(bytes.buffer);
  }

  // Bus master (BAR4) ----------------------------------------------------------

  bmRead(reg: number, size: 1 | 4 = 1): number {
    const v = this.ide.barRead(4, this.bmBase + reg, size);
    this.ide.afterAccess();
    return v;
  }
  bmWrite(reg: number, size: 1 | 4, v: number): void {
    this.ide.barWrite(4, this.bmBase + reg, size, v);
    this.ide.afterAccess();
  }

  /** ata_bmdma_setup: table address, direction, clear interrupt/error. */
  bmSetup(prdTable: number, toMemory: boolean): void {
    this.bmWrite(4, 4, prdTable);
    this.bmWrite(0, 1, toMemory ? 0x08 : 0x00);
    this.bmWrite(2, 1, this.bmRead(2) | 0x06);
  }
  bmStart(): void {
    this.bmWrite(0, 1, this.bmRead(0) | 0x01);
  }
  bmStop(): void {
    this.bmWrite(0, 1, this.bmRead(0) & ~0x01);
  }

  /** Write a PRD table at `table`: entries of [address, byteCount(0 = 64 KiB)], EOT on the last. */
  writePrd(table: number, entries: readonly (readonly [number, number])[], eotOnLast = true): void {
    const m = this.rig.memory;
    entries.forEach(([addr, count], i) => {
      const e = m.bytes(table + i * 8, 8);
      const dv = new DataView(e.buffer, e.byteOffset, 8);
      dv.setUint32(0, addr, true);
      dv.setUint16(4, count & 0xffff, true);
      dv.setUint16(6, eotOnLast && i === entries.length - 1 ? 0x8000 : 0, true);
    });
  }
}

export function drivesOf(...d: IdeDriveConfig[]): IdeDriveConfig[] {
  return d;
}

/** Decode an ATA IDENTIFY string (two characters a word, first in the high byte). */
export function idString(id: Uint16Array, first: number, words: number): string {
  let s = "";
  for (let i = first; i < first + words; i++) s += String.fromCharCode(id[i]! >>> 8, id[i]! & 0xff);
  return s.trimEnd();
}
