/**
 * The device thread's view of PCI bus 0: the functions it owns, where their
 * BARs decode now (read from each function's own config space on every access,
 * so a guest that moves a BAR is followed at once), the ISA ports some of them
 * also decode (IDE compatibility mode), and the servicing of mailbox requests.
 *
 * Unclaimed reads return all-ones, unclaimed writes are dropped and counted,
 * as on a real bus (master abort). After each request a function took, the
 * bus calls its afterAccess once (a string access's elements are one request).
 */
import type { PciDevice } from "../devices/pci/pci-config.js";
import { MAILBOX_OP, getLe, putLe, type MailboxRequest } from "./device-mailbox.js";

/** A device that also decodes fixed ISA ports. */
export interface IsaPortDecoder {
  readonly isaRegions: readonly { readonly name: string; readonly start: number; readonly length: number }[];
  isaRead(region: string, offset: number, size: 1 | 2 | 4): number;
  isaWrite(region: string, offset: number, size: 1 | 2 | 4, value: number): void;
  /**
   * Optional: a string read of `count` elements into `into` at `at`, as many
   * at once as the device can; returns how many (0: the bus reads the next
   * one element by element).
   */
  isaReadString?(region: string, offset: number, size: 1 | 2 | 4, count: number, into: Uint8Array, at: number): number;
}

export function decodesIsaPorts(d: object): d is IsaPortDecoder {
  return "isaRegions" in d && "isaRead" in d && "isaWrite" in d;
}

interface IsaClaim {
  readonly device: IsaPortDecoder & PciDevice;
  readonly name: string;
  readonly start: number;
  readonly length: number;
}

const ONES = [0, 0xff, 0xffff, 0, 0xffff_ffff] as const;

export interface BarWindows {
  /** Memory window for 32-bit BARs (guest-physical). */
  readonly mmioStart: number;
  readonly mmioSize: number;
  /** I/O window for I/O BARs. */
  readonly ioStart: number;
  readonly ioEnd: number;
}

export class DeviceBus {
  private readonly functions = new Map<number, PciDevice>();
  private readonly list: PciDevice[] = [];
  private readonly isa: IsaClaim[] = [];
  unclaimedAccesses = 0;

  attach(bdf: number, device: PciDevice): void {
    if (this.functions.has(bdf)) throw new Error(`PCI function ${bdf} attached twice`);
    this.functions.set(bdf, device);
    this.list.push(device);
    if (decodesIsaPorts(device)) for (const r of device.isaRegions) this.isa.push({ device, name: r.name, start: r.start, length: r.length });
  }

  get devices(): readonly PciDevice[] {
    return this.list;
  }

  /** Firmware's job: give every BAR an address inside the host bridge windows, then enable decoding. */
  assignBars(w: BarWindows): void {
    type Want = { device: PciDevice; index: number; size: number; io: boolean };
    const wants: Want[] = [];
    for (const d of this.list) for (const b of d.pci.barSpecs()) wants.push({ device: d, index: b.index, size: b.size, io: b.kind === "io" });
    // Largest first keeps natural alignment without holes.
    wants.sort((a, b) => b.size - a.size);
    let mmio = w.mmioStart;
    let io = w.ioStart;
    for (const want of wants) {
      if (want.io) {
        io = Math.ceil(io / want.size) * want.size;
        if (io + want.size > w.ioEnd) throw new Error("PCI I/O window exhausted");
        want.device.pci.assignBar(want.index, io);
        io += want.size;
      } else {
        mmio = Math.ceil(mmio / want.size) * want.size;
        if (mmio + want.size > w.mmioStart + w.mmioSize) throw new Error("PCI memory window exhausted");
        want.device.pci.assignBar(want.index, mmio);
        mmio += want.size;
      }
    }
    for (const d of this.list) d.pci.enableDecoding();
  }

  configRead(bdf: number, offset: number, size: 1 | 2 | 4): number {
    const d = this.functions.get(bdf);
    if (d === undefined) return ONES[size];
    return d.pci.configRead(offset, size);
  }

  configWrite(bdf: number, offset: number, size: 1 | 2 | 4, value: number): void {
    const d = this.functions.get(bdf);
    if (d === undefined) return;
    try {
      d.pci.configWrite(offset, size, value);
    } finally {
      d.afterAccess?.();
    }
  }

  // The target `resolve` found last: fields, not an object per access.
  private hitIsa: IsaClaim | undefined;
  private hitDevice: PciDevice | undefined;
  private hitBar = 0;
  private hitOffset = 0;

  /** Who decodes [address, address+size) now (ISA ports first, then BARs); false, hit fields cleared, when nobody does. */
  private resolve(address: number, size: number, io: boolean): boolean {
    this.hitIsa = undefined;
    this.hitDevice = undefined;
    if (io) {
      for (const c of this.isa) {
        if (address >= c.start && address < c.start + c.length) {
          this.hitIsa = c;
          this.hitDevice = c.device;
          this.hitOffset = address - c.start;
          return true;
        }
      }
    }
    for (const d of this.list) {
      const pci = d.pci;
      for (let i = 0; i < 6; i++) {
        const spec = pci.bar(i);
        if (spec === undefined || spec.index !== i || (spec.kind === "io") !== io) continue;
        const base = pci.mappedAddress(i);
        if (base === undefined) continue;
        if (address >= base && address + size <= base + spec.size) {
          this.hitDevice = d;
          this.hitBar = i;
          this.hitOffset = address - base;
          return true;
        }
      }
    }
    return false;
  }

  private readHit(size: 1 | 2 | 4): number {
    const isa = this.hitIsa;
    if (isa !== undefined) return isa.device.isaRead(isa.name, this.hitOffset, size);
    return this.hitDevice!.barRead(this.hitBar, this.hitOffset, size);
  }

  private writeHit(size: 1 | 2 | 4, value: number): void {
    const isa = this.hitIsa;
    if (isa !== undefined) isa.device.isaWrite(isa.name, this.hitOffset, size, value);
    else this.hitDevice!.barWrite(this.hitBar, this.hitOffset, size, value);
  }

  /** One access (read when `value` is undefined); the device hears afterAccess once it is done. */
  private access(address: number, size: 1 | 2 | 4, io: boolean, value: number | undefined): number {
    if (!this.resolve(address, size, io)) {
      this.unclaimedAccesses++;
      return value === undefined ? ONES[size] : 0;
    }
    const device = this.hitDevice!;
    try {
      if (value === undefined) return this.readHit(size);
      this.writeHit(size, value);
      return 0;
    } finally {
      device.afterAccess?.();
    }
  }

  pioRead(port: number, size: 1 | 2 | 4): number {
    return this.access(port, size, true, undefined);
  }

  pioWrite(port: number, size: 1 | 2 | 4, value: number): void {
    this.access(port, size, true, value);
  }

  mmioRead(gpa: number, size: 1 | 2 | 4): number {
    return this.access(gpa, size, false, undefined);
  }

  mmioWrite(gpa: number, size: 1 | 2 | 4, value: number): void {
    this.access(gpa, size, false, value);
  }

  /**
   * A port access of `count` elements (string I/O: `rep insw` reads a sector
   * in one request): the target is looked up once, every element goes to it,
   * and it hears afterAccess once, after the last.
   */
  private portString(read: boolean, port: number, size: 1 | 2 | 4, count: number, data: Uint8Array): void {
    if (!this.resolve(port, size, true)) {
      this.unclaimedAccesses += count;
      if (read) data.fill(0xff, 0, count * size);
      return;
    }
    const device = this.hitDevice!;
    const isa = this.hitIsa;
    const bulk = read && isa !== undefined && isa.device.isaReadString !== undefined;
    try {
      for (let i = 0, off = 0; i < count; ) {
        if (bulk) {
          const k = isa.device.isaReadString!(isa.name, this.hitOffset, size, count - i, data, off);
          if (k > 0) {
            i += k;
            off += k * size;
            continue;
          }
        }
        if (read) putLe(data, off, size, this.readHit(size));
        else this.writeHit(size, getLe(data, off, size));
        i++;
        off += size;
      }
    } finally {
      device.afterAccess?.();
    }
  }

  /** Service one mailbox request in place (read results go into `r.data`). */
  service(r: MailboxRequest): void {
    const data = r.data;
    switch (r.op) {
      case MAILBOX_OP.pioRead:
      case MAILBOX_OP.pioWrite: {
        const size = r.size as 1 | 2 | 4;
        this.portString(r.op === MAILBOX_OP.pioRead, r.address, size, Math.min(r.count, Math.floor(data.length / size)), data);
        return;
      }
      case MAILBOX_OP.mmioRead:
      case MAILBOX_OP.mmioWrite: {
        // 8-byte accesses are two 4-byte ones, low half first.
        const step = r.size === 8 ? 4 : (r.size as 1 | 2 | 4);
        for (let at = 0; at < r.size; at += step) {
          if (r.op === MAILBOX_OP.mmioRead) putLe(data, at, step, this.mmioRead(r.address + at, step));
          else this.mmioWrite(r.address + at, step, getLe(data, at, step));
        }
        return;
      }
      case MAILBOX_OP.configRead:
        putLe(data, 0, r.size as 1 | 2 | 4, this.configRead(Math.floor(r.address / 256), r.address & 0xff, r.size as 1 | 2 | 4));
        return;
      case MAILBOX_OP.configWrite:
        this.configWrite(Math.floor(r.address / 256), r.address & 0xff, r.size as 1 | 2 | 4, getLe(data, 0, r.size as 1 | 2 | 4));
        return;
    }
  }
}
