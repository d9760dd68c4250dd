/**
 * A PCI function's type-0 configuration header (PCI Local Bus spec 3.0, 6.1-6.2):
 * identity registers, the command/status pair, up to six BARs with the sizing
 * protocol (write all-ones, read back the size mask), the interrupt line/pin and a
 * capability list (6.7) that devices extend (MSI-X, virtio vendor capabilities).
 *
 * DEVNOTE: every PCI device model runs on the worker's device thread, a single
 * thread that owns all of them (see src/worker/device-thread.ts): config space is
 * plain memory here, not shared state. The board pre-assigns BAR addresses the way
 * firmware would (`assignBar`), and Linux keeps them when they sit inside the host
 * bridge's _CRS windows.
 */
import { PartisError } from "../../errors.js";
import type { SavedDeviceState } from "../dependencies.js";

export class PciDeviceError extends PartisError {}

export type PciBarKind = "io" | "mmio32" | "mmio64";

export interface PciBarSpec {
  /** BAR number 0..5 (a 64-bit BAR also uses index+1). */
  readonly index: number;
  readonly kind: PciBarKind;
  /** Bytes, a power of two (>= 16 for memory BARs, >= 4 for I/O BARs). */
  readonly size: number;
  readonly prefetchable?: boolean;
}

export interface PciIdentity {
  readonly vendorId: number;
  readonly deviceId: number;
  /** class << 16 | subclass << 8 | prog-if. */
  readonly classCode: number;
  readonly revision?: number;
  readonly subsystemVendorId?: number;
  readonly subsystemId?: number;
  /** 0 none, 1 INTA .. 4 INTD. */
  readonly interruptPin?: number;
}

/** Command register bits. */
export const PCI_COMMAND = { io: 1 << 0, memory: 1 << 1, busMaster: 1 << 2, intxDisable: 1 << 10 } as const;
/** Status register bits. */
export const PCI_STATUS = { interrupt: 1 << 3, capabilities: 1 << 4 } as const;
/** Capability ids (PCI spec appendix H). */
export const PCI_CAP_ID = { msi: 0x05, vendor: 0x09, pciExpress: 0x10, msix: 0x11 } as const;

/**
 * A PCI device model. Runs on the device thread only: accesses arrive one at a
 * time, so a model is a plain single-threaded object. BAR accesses are 1, 2 or 4
 * bytes (8-byte MMIO accesses are split by the caller), `offset` relative to the BAR.
 */
export interface PciDevice {
  /** Instance name, unique in a VM ("virtio-blk0", "ide0", "ne2k0"). */
  readonly name: string;
  readonly pci: PciConfig;
  barRead(bar: number, offset: number, size: 1 | 2 | 4): number;
  barWrite(bar: number, offset: number, size: 1 | 2 | 4, value: number): void;
  /** Power-on / board reset. */
  reset(): void;
  /**
   * Called by the device bus once after each request it routed here: a port or
   * MMIO access (every element of a string access in one request) or a config
   * write. A device that publishes state for other threads to read (the port
   * read shadow) publishes it here: once per request, not once per element.
   */
  afterAccess?(): void;
  save?(): SavedDeviceState;
  /** Lines for a state report of a running VM (`kill -QUIT` on `partis run`): what a stuck guest waits for. */
  describeState?(): string[];
}

interface Capability {
  readonly offset: number;
  readonly length: number;
  readonly onWrite: ((capOffset: number, size: 1 | 2 | 4) => void) | undefined;
}

const CAP_START = 0x40;

export class PciConfig {
  readonly bytes = new Uint8Array(256);
  /** 1 bits are guest-writable (BARs are handled separately). */
  readonly writeMask = new Uint8Array(256);
  private readonly bars: (PciBarSpec | undefined)[] = [undefined, undefined, undefined, undefined, undefined, undefined];
  /** BAR addresses as programmed (the low flag bits excluded). */
  private readonly barAddress = [0, 0, 0, 0, 0, 0];
  private readonly capabilities: Capability[] = [];
  private capEnd = CAP_START;
  private readonly dv: DataView;
  /** Called after the command register or a BAR changes (mapping may have moved). */
  onMappingChanged: (() => void) | undefined;
  /** Called after a guest write to the command register. */
  onCommandWrite: (() => void) | undefined;

  constructor(readonly identity: PciIdentity, bars: readonly PciBarSpec[]) {
    this.dv = new DataView(this.bytes.buffer);
    for (const b of bars) {
      if (!Number.isInteger(b.index) || b.index < 0 || b.index > 5 || (b.kind === "mmio64" && b.index > 4))
        throw new PciDeviceError("PCI_BAD_BAR", `BAR ${b.index} is not a valid BAR number for a ${b.kind} BAR`);
      const min = b.kind === "io" ? 4 : 16;
      if (b.size < min || (b.size & (b.size - 1)) !== 0 || (b.kind === "io" && b.size > 256) || b.size > 2 ** 31)
        throw new PciDeviceError("PCI_BAD_BAR", `BAR ${b.index}: size ${b.size} is not a valid power of two`);
      if (this.bars[b.index] !== undefined || (b.kind === "mmio64" && this.bars[b.index + 1] !== undefined))
        throw new PciDeviceError("PCI_BAD_BAR", `BAR ${b.index} is declared twice or overlaps a 64-bit BAR`);
      this.bars[b.index] = b;
      // A 64-bit BAR's upper dword is the next register.
      if (b.kind === "mmio64") this.bars[b.index + 1] = b;
    }
    this.resetRegisters();
  }

  /** Restore the header to its power-on values (capabilities keep their layout; their bodies are the device's job). */
  resetRegisters(): void {
    const id = this.identity;
    this.dv.setUint16(0x00, id.vendorId, true);
    this.dv.setUint16(0x02, id.deviceId, true);
    this.dv.setUint16(0x04, 0, true);
    this.dv.setUint16(0x06, this.capabilities.length > 0 ? PCI_STATUS.capabilities : 0, true);
    this.bytes[0x08] = id.revision ?? 0;
    this.bytes[0x09] = id.classCode & 0xff;
    this.bytes[0x0a] = (id.classCode >> 8) & 0xff;
    this.bytes[0x0b] = (id.classCode >> 16) & 0xff;
    this.bytes[0x0e] = 0x00;
    this.dv.setUint16(0x2c, id.subsystemVendorId ?? 0, true);
    this.dv.setUint16(0x2e, id.subsystemId ?? 0, true);
    this.bytes[0x34] = this.capabilities.length > 0 ? CAP_START : 0;
    this.bytes[0x3d] = id.interruptPin ?? 0;
    this.writeMask[0x04] = 0x07; // io, memory, bus master
    this.writeMask[0x05] = 0x04; // INTx disable
    this.writeMask[0x0c] = 0xff; // cache line size
    this.writeMask[0x0d] = 0xff; // latency timer
    this.writeMask[0x3c] = 0xff; // interrupt line
    for (let i = 0; i < 6; i++) this.barAddress[i] = 0;
    this.refreshBars();
  }

  /**
   * Append a capability. `body` is the capability after its id and next bytes;
   * `writable` (same length as body) marks guest-writable bits. Returns the
   * capability's offset in config space.
   */
  addCapability(id: number, body: Uint8Array, writable?: Uint8Array, onWrite?: (capOffset: number, size: 1 | 2 | 4) => void): number {
    const length = 2 + body.length;
    const offset = (this.capEnd + 3) & ~3;
    if (offset + length > 256) throw new PciDeviceError("PCI_CONFIG_FULL", "capabilities do not fit in configuration space");
    const prev = this.capabilities[this.capabilities.length - 1];
    if (prev !== undefined) this.bytes[prev.offset + 1] = offset;
    this.bytes[offset] = id;
    this.bytes[offset + 1] = 0;
    this.bytes.set(body, offset + 2);
    if (writable !== undefined) this.writeMask.set(writable.subarray(0, body.length), offset + 2);
    this.capabilities.push({ offset, length, onWrite });
    this.capEnd = offset + length;
    this.bytes[0x34] = CAP_START;
    this.dv.setUint16(0x06, this.dv.getUint16(0x06, true) | PCI_STATUS.capabilities, true);
    return offset;
  }

  get command(): number {
    return this.dv.getUint16(0x04, true);
  }
  get ioEnabled(): boolean {
    return (this.command & PCI_COMMAND.io) !== 0;
  }
  get memoryEnabled(): boolean {
    return (this.command & PCI_COMMAND.memory) !== 0;
  }
  get busMaster(): boolean {
    return (this.command & PCI_COMMAND.busMaster) !== 0;
  }
  get intxDisabled(): boolean {
    return (this.command & PCI_COMMAND.intxDisable) !== 0;
  }

  /** Set or clear the status register's interrupt bit (the device's INTx level). */
  setInterruptStatus(asserted: boolean): void {
    const s = this.dv.getUint16(0x06, true);
    this.dv.setUint16(0x06, asserted ? s | PCI_STATUS.interrupt : s & ~PCI_STATUS.interrupt, true);
  }

  bar(index: number): PciBarSpec | undefined {
    return this.bars[index];
  }

  /** The BARs this function declares. */
  barSpecs(): PciBarSpec[] {
    return this.bars.filter((b, i): b is PciBarSpec => b !== undefined && b.index === i);
  }

  /** Where BAR `index` decodes now: undefined when unassigned or its space is disabled. */
  mappedAddress(index: number): number | undefined {
    const b = this.bars[index];
    if (b === undefined || b.index !== index) return undefined;
    const enabled = b.kind === "io" ? this.ioEnabled : this.memoryEnabled;
    const a = this.barAddress[index]!;
    if (!enabled || a === 0) return undefined;
    return a;
  }

  /** Firmware-style assignment (before the guest runs). */
  assignBar(index: number, address: number): void {
    const b = this.bars[index];
    if (b === undefined || b.index !== index) throw new PciDeviceError("PCI_BAD_BAR", `BAR ${index} is not declared`);
    if (address % b.size !== 0) throw new PciDeviceError("PCI_BAD_BAR", `BAR ${index}: 0x${address.toString(16)} is not aligned to its size`);
    const limit = b.kind === "io" ? 0x1_0000 : b.kind === "mmio32" ? 2 ** 32 : 2 ** 52;
    if (address < 0 || address + b.size > limit) throw new PciDeviceError("PCI_BAD_BAR", `BAR ${index}: 0x${address.toString(16)} is outside the ${b.kind} address space`);
    this.barAddress[index] = address;
    this.refreshBars();
  }

  /** Enable decoding as firmware leaves it (I/O and memory as declared, bus mastering). */
  enableDecoding(): void {
    let c = 0;
    for (const b of this.barSpecs()) c |= b.kind === "io" ? PCI_COMMAND.io : PCI_COMMAND.memory;
    this.dv.setUint16(0x04, this.command | c | PCI_COMMAND.busMaster, true);
  }

  private refreshBars(): void {
    for (let i = 0; i < 6; i++) {
      const b = this.bars[i];
      let v = 0;
      if (b === undefined) v = 0;
      else if (b.index !== i) {
        // Upper half of a 64-bit BAR.
        v = Math.floor(this.barAddress[b.index]! / 2 ** 32) >>> 0;
      } else {
        const a = this.barAddress[i]!;
        if (b.kind === "io") v = ((a & 0xffff_fffc) | 1) >>> 0;
        else v = ((a % 2 ** 32) & 0xffff_fff0) | (b.kind === "mmio64" ? 4 : 0) | (b.prefetchable === true ? 8 : 0);
      }
      this.dv.setUint32(0x10 + i * 4, v >>> 0, true);
    }
  }

  configRead(offset: number, size: 1 | 2 | 4): number {
    if (offset < 0 || offset + size > 256) return size === 4 ? 0xffff_ffff : size === 2 ? 0xffff : 0xff;
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.bytes[offset + i]!;
    return v >>> 0;
  }

  configWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    if (offset < 0 || offset + size > 256) return;
    if (offset >= 0x10 && offset < 0x28) {
      this.writeBar(offset, size, value);
      return;
    }
    const commandBefore = this.command;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      const m = this.writeMask[at]!;
      const b = (value >>> (8 * i)) & 0xff;
      this.bytes[at] = (this.bytes[at]! & ~m) | (b & m);
    }
    // Status bits are read-only or write-one-to-clear; none is guest-writable here.
    if (offset <= 0x05 && offset + size > 0x04) {
      this.onCommandWrite?.();
      if (((commandBefore ^ this.command) & (PCI_COMMAND.io | PCI_COMMAND.memory)) !== 0) this.onMappingChanged?.();
    }
    for (const c of this.capabilities) {
      if (offset < c.offset + c.length && offset + size > c.offset) c.onWrite?.(offset - c.offset, size);
    }
  }

  private writeBar(offset: number, size: 1 | 2 | 4, value: number): void {
    const reg = (offset - 0x10) >> 2;
    // Merge a partial write into the register's current value.
    const shift = (offset & 3) * 8;
    const mask = size === 4 ? 0xffff_ffff : ((size === 2 ? 0xffff : 0xff) << shift) >>> 0;
    const cur = this.dv.getUint32(0x10 + reg * 4, true);
    const v = ((cur & ~mask) | ((value << shift) & mask)) >>> 0;
    const b = this.bars[reg];
    if (b === undefined) return;
    const before = this.barAddress[b.index]!;
    if (b.index !== reg) {
      // Upper dword of a 64-bit BAR: sizing reads back all-ones (sizes < 4 GiB).
      // Only this register changes: a size read-back pending in the lower one stays (PCI 3.0 6.2.5.1).
      const low = this.barAddress[b.index]! % 2 ** 32;
      this.barAddress[b.index] = (v === 0xffff_ffff ? 0 : v) * 2 ** 32 + low;
      this.dv.setUint32(0x10 + reg * 4, v, true);
    } else {
      const flagsMask = b.kind === "io" ? 0x3 : 0xf;
      const high = b.kind === "mmio64" ? Math.floor(this.barAddress[reg]! / 2 ** 32) * 2 ** 32 : 0;
      const addr = (v & ~(b.size - 1) & ~flagsMask) >>> 0;
      this.barAddress[reg] = high + (b.kind === "io" ? addr & 0xffff : addr);
      this.refreshBars();
      // The sizing protocol: all-ones reads back the size mask.
      if ((v | flagsMask) >>> 0 === 0xffff_ffff) {
        const sizeMask = (~(b.size - 1) >>> 0) & ~flagsMask;
        const flags = this.dv.getUint32(0x10 + reg * 4, true) & flagsMask;
        this.dv.setUint32(0x10 + reg * 4, ((b.kind === "io" ? sizeMask & 0xffff : sizeMask) | flags) >>> 0, true);
        this.barAddress[reg] = high;
      }
    }
    if (this.barAddress[b.index] !== before) this.onMappingChanged?.();
  }

  /** Plain-data copy for saved state. */
  saveRegisters(): { bytes: number[]; barAddress: number[] } {
    return { bytes: Array.from(this.bytes), barAddress: [...this.barAddress] };
  }
}
