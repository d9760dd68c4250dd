/**
 * The device thread's view of PCI bus 0: the functions it owns, where their
 * BARs decode now (read from each function's own config space on every access,
 * so a guest that moves a BAR is followed at once), the ISA ports some of them
 * also decode (IDE compatibility mode), and the servicing of mailbox requests.
 *
 * Unclaimed reads return all-ones, unclaimed writes are dropped and counted,
 * as on a real bus (master abort).
 */
import type { PciDevice } from "../devices/pci/pci-config.js";
import { MAILBOX_OP, getLe, putLe, type MailboxRequest } from "./device-mailbox.js";

/** A device that also decodes fixed ISA ports. */
export interface IsaPortDecoder {
  readonly isaRegions: readonly { readonly name: string; readonly start: number; readonly length: number }[];
  isaRead(region: string, offset: number, size: 1 | 2 | 4): number;
  isaWrite(region: string, offset: number, size: 1 | 2 | 4, value: number): void;
}

export function decodesIsaPorts(d: object): d is IsaPortDecoder {
  return "isaRegions" in d && "isaRead" in d && "isaWrite" in d;
}

interface IsaClaim {
  readonly device: IsaPortDecoder;
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
    d.pci.configWrite(offset, size, value);
    d.afterConfigWrite?.();
  }

  private findBar(address: number, size: number, io: boolean): { device: PciDevice; bar: number; offset: number } | undefined {
    for (const d of this.list) {
      const pci = d.pci;
      for (let i = 0; i < 6; i++) {
        const spec = pci.bar(i);
        if (spec === undefined || spec.index !== i || (spec.kind === "io") !== io) continue;
        const base = pci.mappedAddress(i);
        if (base === undefined) continue;
        if (address >= base && address + size <= base + spec.size) return { device: d, bar: i, offset: address - base };
      }
    }
    return undefined;
  }

  pioRead(port: number, size: 1 | 2 | 4): number {
    for (const c of this.isa) if (port >= c.start && port < c.start + c.length) return c.device.isaRead(c.name, port - c.start, size);
    const t = this.findBar(port, size, true);
    if (t === undefined) {
      this.unclaimedAccesses++;
      return ONES[size];
    }
    return t.device.barRead(t.bar, t.offset, size);
  }

  pioWrite(port: number, size: 1 | 2 | 4, value: number): void {
    for (const c of this.isa) {
      if (port >= c.start && port < c.start + c.length) {
        c.device.isaWrite(c.name, port - c.start, size, value);
        return;
      }
    }
    const t = this.findBar(port, size, true);
    if (t === undefined) {
      this.unclaimedAccesses++;
      return;
    }
    t.device.barWrite(t.bar, t.offset, size, value);
  }

  mmioRead(gpa: number, size: 1 | 2 | 4): number {
    const t = this.findBar(gpa, size, false);
    if (t === undefined) {
      this.unclaimedAccesses++;
      return ONES[size];
    }
    return t.device.barRead(t.bar, t.offset, size);
  }

  mmioWrite(gpa: number, size: 1 | 2 | 4, value: number): void {
    const t = this.findBar(gpa, size, false);
    if (t === undefined) {
      this.unclaimedAccesses++;
      return;
    }
    t.device.barWrite(t.bar, t.offset, size, value);
  }

  /** Service one mailbox request in place (read results go into `r.data`). */
  service(r: MailboxRequest): void {
    const data = r.data;
    switch (r.op) {
      case MAILBOX_OP.pioRead:
      case MAILBOX_OP.pioWrite: {
        const size = r.size as 1 | 2 | 4;
        const count = Math.min(r.count, Math.floor(data.length / size));
        for (let i = 0, off = 0; i < count; i++, off += size) {
          if (r.op === MAILBOX_OP.pioRead) putLe(data, off, size, this.pioRead(r.address, size));
          else this.pioWrite(r.address, size, getLe(data, off, size));
        }
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
