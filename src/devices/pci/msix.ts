/**
 * MSI-X (PCI Local Bus spec 3.0, 6.8.2): the capability in config space, the
 * vector table (16 bytes per entry: address low/high, data, vector control) and
 * the pending bit array, both inside one of the device's BARs. A device calls
 * `notify(vector)`; a masked vector (per-entry mask or the function mask) sets
 * its pending bit instead and fires when unmasked.
 *
 * Delivery goes through an injected MsiSink (the device thread's irqfd routes,
 * or a recording fake in tests).
 */
import { PCI_CAP_ID, PciDeviceError, type PciConfig } from "./pci-config.js";

/** Where MSI messages go. */
export interface MsiSink {
  /** Deliver one message (`vector` identifies the source entry, for irqfd routing). */
  signal(address: number, addressHigh: number, data: number, vector: number): void;
}

export interface MsixLayout {
  readonly vectors: number;
  readonly tableBar: number;
  readonly tableOffset: number;
  readonly pbaBar: number;
  readonly pbaOffset: number;
}

const CTRL_ENABLE = 0x8000;
const CTRL_FUNCTION_MASK = 0x4000;
const ENTRY_MASKED = 1;

export class MsixTable {
  /** 16 bytes per vector. */
  readonly table: Uint8Array;
  private readonly tableView: DataView;
  readonly pending: Uint8Array;
  readonly capOffset: number;

  constructor(private readonly pci: PciConfig, readonly layout: MsixLayout, private readonly sink: MsiSink) {
    const n = layout.vectors;
    if (!Number.isInteger(n) || n < 1 || n > 2048) throw new PciDeviceError("MSIX_BAD_LAYOUT", `MSI-X vector count ${n} is out of range`);
    if (layout.tableOffset % 8 !== 0 || layout.pbaOffset % 8 !== 0) throw new PciDeviceError("MSIX_BAD_LAYOUT", "MSI-X table and PBA must be 8-byte aligned");
    this.table = new Uint8Array(16 * n);
    this.tableView = new DataView(this.table.buffer);
    this.pending = new Uint8Array(Math.ceil(n / 64) * 8);
    const body = new Uint8Array(10);
    const dv = new DataView(body.buffer);
    dv.setUint16(0, n - 1, true);
    dv.setUint32(2, (layout.tableOffset | layout.tableBar) >>> 0, true);
    dv.setUint32(6, (layout.pbaOffset | layout.pbaBar) >>> 0, true);
    const writable = new Uint8Array(10);
    writable[1] = 0xc0; // enable + function mask
    this.capOffset = pci.addCapability(PCI_CAP_ID.msix, body, writable, () => this.deliverPending());
    this.reset();
  }

  get tableBytes(): number {
    return this.table.length;
  }
  get pbaBytes(): number {
    return this.pending.length;
  }

  private get control(): number {
    return this.pci.configRead(this.capOffset + 2, 2);
  }
  get enabled(): boolean {
    return (this.control & CTRL_ENABLE) !== 0;
  }
  get functionMasked(): boolean {
    return (this.control & CTRL_FUNCTION_MASK) !== 0;
  }

  reset(): void {
    // Every entry starts masked (6.8.2.9); the control word's enable/mask bits clear.
    this.table.fill(0);
    for (let v = 0; v < this.layout.vectors; v++) this.tableView.setUint32(v * 16 + 12, ENTRY_MASKED, true);
    this.pending.fill(0);
    const c = this.pci.bytes;
    c[this.capOffset + 3] = c[this.capOffset + 3]! & ~0xc0;
  }

  /** Read inside the table (offset relative to the table start); 4- or 8-byte accesses per spec, smaller tolerated. */
  tableRead(offset: number, size: 1 | 2 | 4): number {
    if (offset < 0 || offset + size > this.table.length) return 0;
    if (size === 4) return this.tableView.getUint32(offset, true);
    if (size === 2) return this.tableView.getUint16(offset, true);
    return this.table[offset]!;
  }

  tableWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    if (offset < 0 || offset + size > this.table.length) return;
    const vector = offset >> 4;
    const wasMasked = this.entryMasked(vector);
    if (size === 4) this.tableView.setUint32(offset, value >>> 0, true);
    else if (size === 2) this.tableView.setUint16(offset, value & 0xffff, true);
    else this.table[offset] = value & 0xff;
    // Only the mask bit of vector control is defined; the rest reads as zero.
    const ctl = vector * 16 + 12;
    this.tableView.setUint32(ctl, this.tableView.getUint32(ctl, true) & ENTRY_MASKED, true);
    if (wasMasked && !this.entryMasked(vector)) this.deliverIfPending(vector);
  }

  pbaRead(offset: number, size: 1 | 2 | 4): number {
    if (offset < 0 || offset + size > this.pending.length) return 0;
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.pending[offset + i]!;
    return v >>> 0;
  }

  /** A vector's state for a report: "masked", "pending" (masked with a message waiting), "unmasked", "unprogrammed". */
  vectorState(vector: number): string {
    if (!Number.isInteger(vector) || vector < 0 || vector >= this.layout.vectors) return "none";
    const pending = (this.pending[vector >> 3]! & (1 << (vector & 7))) !== 0;
    const masked = this.functionMasked || this.entryMasked(vector);
    if (pending) return masked ? "masked+pending" : "pending";
    if (masked) return "masked";
    return this.tableView.getUint32(vector * 16, true) === 0 ? "unprogrammed" : "unmasked";
  }

  private entryMasked(vector: number): boolean {
    return (this.tableView.getUint32(vector * 16 + 12, true) & ENTRY_MASKED) !== 0;
  }

  /** Raise `vector`. Out-of-range vectors (e.g. VIRTIO_MSI_NO_VECTOR) are ignored and return false. */
  notify(vector: number): boolean {
    if (!Number.isInteger(vector) || vector < 0 || vector >= this.layout.vectors) return false;
    if (!this.enabled) return false;
    if (this.functionMasked || this.entryMasked(vector)) {
      this.pending[vector >> 3] = this.pending[vector >> 3]! | (1 << (vector & 7));
      return true;
    }
    this.fire(vector);
    return true;
  }

  private fire(vector: number): void {
    const o = vector * 16;
    const address = this.tableView.getUint32(o, true);
    // An entry the driver never programmed points nowhere: drop the message (a real bus would master-abort).
    if (address === 0) return;
    this.sink.signal(address, this.tableView.getUint32(o + 4, true), this.tableView.getUint32(o + 8, true), vector);
  }

  private deliverIfPending(vector: number): void {
    const bit = 1 << (vector & 7);
    if ((this.pending[vector >> 3]! & bit) === 0) return;
    if (!this.enabled || this.functionMasked || this.entryMasked(vector)) return;
    this.pending[vector >> 3] = this.pending[vector >> 3]! & ~bit;
    this.fire(vector);
  }

  private deliverPending(): void {
    for (let v = 0; v < this.layout.vectors; v++) this.deliverIfPending(v);
  }

  /** The programmed message of `vector` (for irqfd routes). */
  message(vector: number): { address: number; addressHigh: number; data: number } {
    if (!Number.isInteger(vector) || vector < 0 || vector >= this.layout.vectors) return { address: 0, addressHigh: 0, data: 0 };
    const o = vector * 16;
    return { address: this.tableView.getUint32(o, true), addressHigh: this.tableView.getUint32(o + 4, true), data: this.tableView.getUint32(o + 8, true) };
  }
}
