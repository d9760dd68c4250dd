/**
 * Interrupt delivery for the device thread's PCI functions.
 *
 * INTx: functions that share a GSI (the _PRT folds 32 slots onto GSI 16-19) are
 * wired-OR: the line is high while any of them asserts it. A function whose
 * command register has INTx disabled never drives its line.
 *
 * MSI/MSI-X: each (function, vector) gets a GSI of its own above the IOAPIC's
 * pins, a KVM MSI route carrying the message the guest programmed, and an irqfd.
 * Raising the vector is then one eventfd write: KVM injects the interrupt in the
 * kernel. Routes are rewritten (KVM_SET_GSI_ROUTING replaces the whole table,
 * the in-kernel irqchip's default routes included) only when a message changes.
 */
import { EventFd } from "../hypervisor/eventfd.js";
import type { GsiRoute, Partition } from "../hypervisor/partition.js";
import type { IrqLine } from "../devices/dependencies.js";
import type { MsiSink } from "../devices/pci/msix.js";
import type { PciConfig } from "../devices/pci/pci-config.js";

/**
 * KVM's default routes (kvm_setup_default_irq_routing), reproduced exactly so
 * adding MSI routes changes nothing else: GSI 0-15 to the PIC pin and the
 * IOAPIC pin of the same number, 16-23 to the IOAPIC.
 */
function irqchipRoutes(): GsiRoute[] {
  const r: GsiRoute[] = [];
  for (let gsi = 0; gsi < 24; gsi++) {
    if (gsi < 8) r.push({ gsi, kind: "irqchip", irqchip: 0, pin: gsi });
    else if (gsi < 16) r.push({ gsi, kind: "irqchip", irqchip: 1, pin: gsi - 8 });
    r.push({ gsi, kind: "irqchip", irqchip: 2, pin: gsi });
  }
  return r;
}

export class IntxRouter {
  private readonly asserted = new Map<number, Set<string>>();
  constructor(private readonly partition: Partition) {}

  line(owner: string, gsi: number, pci: PciConfig | undefined): IrqLine {
    return {
      setLevel: (level) => {
        pci?.setInterruptStatus(level);
        const effective = level && !(pci?.intxDisabled ?? false);
        let set = this.asserted.get(gsi);
        if (set === undefined) this.asserted.set(gsi, (set = new Set()));
        const before = set.size > 0;
        if (effective) set.add(owner);
        else set.delete(owner);
        const after = set.size > 0;
        if (before !== after || effective) this.partition.setIrqLine(gsi, after);
      },
    };
  }
}

interface MsiRoute {
  readonly gsi: number;
  readonly eventfd: EventFd;
  addressLo: number;
  addressHi: number;
  data: number;
}

const FIRST_MSI_GSI = 24;

export class MsiRouter {
  /** Every route, in GSI order (the routing table is rebuilt from it). */
  private readonly routes: MsiRoute[] = [];
  private nextGsi = FIRST_MSI_GSI;
  /** Set when KVM refused routing or irqfds: fall back to KVM_SIGNAL_MSI. */
  private direct = false;
  private readonly base = irqchipRoutes();

  constructor(private readonly partition: Partition) {}

  /** One function's vectors: a raise finds its route by vector index, allocating nothing. */
  sink(): MsiSink {
    const byVector: (MsiRoute | undefined)[] = [];
    return { signal: (address, addressHigh, data, vector) => this.signal(byVector, vector, address, addressHigh, data) };
  }

  private signal(byVector: (MsiRoute | undefined)[], vector: number, address: number, addressHigh: number, data: number): void {
    if (this.direct) {
      this.partition.signalMsi(addressHigh * 2 ** 32 + address, data);
      return;
    }
    let r = byVector[vector];
    try {
      if (r === undefined) {
        r = { gsi: this.nextGsi++, eventfd: EventFd.create({ nonBlocking: true }), addressLo: address, addressHi: addressHigh, data };
        byVector[vector] = r;
        this.routes.push(r);
        this.commit();
        this.partition.irqfd(r.gsi, r.eventfd);
      } else if (r.addressLo !== address || r.addressHi !== addressHigh || r.data !== data) {
        r.addressLo = address;
        r.addressHi = addressHigh;
        r.data = data;
        this.commit();
      }
    } catch {
      // Routing refused (an old or unusual KVM): deliver directly from now on.
      this.direct = true;
      this.partition.signalMsi(addressHigh * 2 ** 32 + address, data);
      return;
    }
    r.eventfd.signal();
  }

  private commit(): void {
    const table: GsiRoute[] = [...this.base];
    for (const r of this.routes) table.push({ gsi: r.gsi, kind: "msi", addressLo: r.addressLo, addressHi: r.addressHi, data: r.data });
    this.partition.setGsiRouting(table);
  }

  close(): void {
    for (const r of this.routes) {
      try {
        this.partition.removeIrqfd(r.gsi, r.eventfd);
      } catch {
        /* the partition may be gone already */
      }
      r.eventfd.close();
    }
    this.routes.length = 0;
  }
}
