/**
 * Fakes for NIC tests: a manual event loop (watches are fired by the test),
 * a recording MSI sink, doorbells that record mappings, and PciDeviceServices
 * over a small anonymous guest RAM.
 */
import { ChunkedGuestMemory } from "../../../src/machine/guest-memory.js";
import type { DoorbellMap, FdWatch, IoEventLoop, PciDeviceServices } from "../../../src/devices/pci/device-thread-services.js";
import type { MsiSink } from "../../../src/devices/pci/msix.js";
import { DeferredWork, RecordingIrqLine } from "../device-fakes.js";

interface Watch {
  fd: number;
  onReadable: () => void;
  open: boolean;
}

export class ManualLoop implements IoEventLoop {
  readonly watches: Watch[] = [];
  /** Deferred work (no such device defers any today): run inside the access that defers it. */
  readonly work = new DeferredWork();
  defer(task: () => void): void {
    this.work.defer(task);
  }
  watch(fd: number, onReadable: () => void): FdWatch {
    const w: Watch = { fd, onReadable, open: true };
    this.watches.push(w);
    return {
      close: () => {
        w.open = false;
      },
    };
  }
  /** Writability watches: NICs have none (frames that do not fit are dropped); kept for the interface. */
  watchWritable(fd: number, onWritable: () => void): FdWatch {
    const w: Watch = { fd: -1 - fd, onReadable: onWritable, open: true };
    this.watches.push(w);
    return { close: () => void (w.open = false) };
  }
  /** Open watches on `fd`. */
  watching(fd: number): number {
    return this.watches.filter((w) => w.open && w.fd === fd).length;
  }
  /** Call the callbacks of every open watch on `fd` (as poll reporting it readable). */
  fire(fd: number): void {
    for (const w of this.watches.slice()) if (w.open && w.fd === fd) w.onReadable();
  }
  /** Fire until `pending()` reports nothing left or `limit` rounds passed. */
  drain(fd: number, pending: () => boolean, limit = 1000): void {
    for (let i = 0; i < limit && pending() && this.watching(fd) > 0; i++) this.fire(fd);
  }
}

export class RecordingMsi implements MsiSink {
  readonly messages: { address: number; data: number; vector: number }[] = [];
  signal(address: number, _addressHigh: number, data: number, vector: number): void {
    this.messages.push({ address, data, vector });
  }
}

export class RecordingDoorbells implements DoorbellMap {
  readonly mapped = new Map<number, { gpa: number; length: number; onRing: () => void }>();
  mapDoorbell(key: number, gpa: number | undefined, length: number, onRing: () => void): void {
    if (gpa === undefined) this.mapped.delete(key);
    else this.mapped.set(key, { gpa, length, onRing });
  }
}

export interface FakeServices extends PciDeviceServices {
  readonly memory: ChunkedGuestMemory;
  readonly intx: RecordingIrqLine;
  readonly msi: RecordingMsi;
  readonly loop: ManualLoop;
  readonly doorbells: RecordingDoorbells;
}

export function fakeServices(ramBytes = 1 << 20): FakeServices {
  return {
    memory: ChunkedGuestMemory.anonymous([{ gpa: 0, length: ramBytes, fileOffset: 0 }]),
    intx: new RecordingIrqLine(),
    msi: new RecordingMsi(),
    loop: new ManualLoop(),
    doorbells: new RecordingDoorbells(),
  };
}
