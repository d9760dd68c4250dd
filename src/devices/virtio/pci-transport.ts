/**
 * virtio over PCI, modern interface only (virtio 1.1 spec 4.1): a PCI function
 * with vendor 0x1af4, device 0x1040 + virtio device id, revision 1, whose
 * vendor capabilities (4.1.4) point into BAR0, and MSI-X (table and PBA in
 * BAR1) with INTx + the ISR register as the fallback (4.1.4.5, 4.1.5.3-4).
 *
 * BAR0 (32-bit memory, 16 KiB):
 *   0x0000 common configuration (struct virtio_pci_common_cfg, 4.1.4.3, 0x38 bytes)
 *   0x1000 ISR status (1 byte, read clears, 4.1.4.5)
 *   0x2000 device-specific configuration (the back end's, 4.1.4.6)
 *   0x3000 notifications: queue q at 0x3000 + 4 * q (notify_off_multiplier 4, 4.1.4.4)
 * BAR1: MSI-X table at 0, PBA after it; vectors = queues + 1.
 * Capabilities: COMMON(1), NOTIFY(2), ISR(3), DEVICE(4), PCI_CFG(5) then MSI-X.
 *
 * API (stable):
 *   new VirtioPciDevice(name, backend: VirtioBackend, services: PciDeviceServices, opts?)
 *   A back end (virtio-blk, -net, -rng, -console) implements VirtioBackend; the
 *   transport hands itself to backend.attach() as a VirtioTransport, calls
 *   activate(queues, features) on DRIVER_OK, queueNotified(q) on every
 *   notification (doorbell or BAR write) while active, reset() on device reset.
 *   The back end calls transport.signalUsed(q) after a batch (interrupt if the
 *   driver wants one), configChanged() when its config changes, and
 *   deviceError() for a fatal protocol error (DEVICE_NEEDS_RESET).
 *
 * Notifications: while BAR0 decodes, each queue's notify address is handed to
 * services.doorbells (ioeventfd); a write that still exits reaches barWrite and
 * works the same.
 *
 * DEVNOTE: a malformed ring never throws: the queue reports its error, the
 * transport sets DEVICE_NEEDS_RESET (0x40) and raises the configuration
 * interrupt (after DRIVER_OK), and the device does no more work until the
 * driver resets it by writing 0 to device_status.
 */
import type { SavedDeviceState } from "../dependencies.js";
import type { GuestMemory } from "../../machine/guest-memory.js";
import type { IoEventLoop, PciDeviceServices } from "../pci/device-thread-services.js";
import { MsixTable } from "../pci/msix.js";
import { PCI_CAP_ID, PciConfig, type PciBarSpec, type PciDevice, type PciIdentity } from "../pci/pci-config.js";
import { VirtQueue, VirtioError, type VirtQueueState } from "./queue.js";

export { VirtioError } from "./queue.js";

export const VIRTIO_PCI_VENDOR = 0x1af4;
/** Modern-only PCI device id = 0x1040 + virtio device id (4.1.2). */
export const VIRTIO_PCI_DEVICE_BASE = 0x1040;
/** Subsystem id for non-transitional devices (>= 0x40, 4.1.2.1). */
export const VIRTIO_PCI_SUBSYSTEM_ID = 0x1100;

/** device_status bits (2.1). */
export const VIRTIO_STATUS = {
  acknowledge: 1,
  driver: 2,
  driverOk: 4,
  featuresOk: 8,
  needsReset: 0x40,
  failed: 0x80,
} as const;

/** Transport / ring feature bit numbers (6). */
export const VIRTIO_F = {
  indirectDesc: 28,
  eventIdx: 29,
  version1: 32,
  accessPlatform: 33,
  ringPacked: 34,
} as const;

export const VIRTIO_MSI_NO_VECTOR = 0xffff;

/** virtio_pci_cap cfg_type values (4.1.4). */
export const VIRTIO_PCI_CAP = { common: 1, notify: 2, isr: 3, device: 4, pciCfg: 5 } as const;

/** BAR0 layout. */
export const VIRTIO_BAR0 = {
  size: 0x4000,
  common: 0x0000,
  commonLength: 0x38,
  isr: 0x1000,
  device: 0x2000,
  notify: 0x3000,
  notifyMultiplier: 4,
} as const;

/** Common configuration field offsets (4.1.4.3). */
export const VIRTIO_COMMON = {
  deviceFeatureSelect: 0x00,
  deviceFeature: 0x04,
  driverFeatureSelect: 0x08,
  driverFeature: 0x0c,
  msixConfig: 0x10,
  numQueues: 0x12,
  deviceStatus: 0x14,
  configGeneration: 0x15,
  queueSelect: 0x16,
  queueSize: 0x18,
  queueMsixVector: 0x1a,
  queueEnable: 0x1c,
  queueNotifyOff: 0x1e,
  queueDesc: 0x20,
  queueDriver: 0x28,
  queueDevice: 0x30,
} as const;

/** Feature bit `n` as a bigint mask. */
export function featureBit(n: number): bigint {
  return 1n << BigInt(n);
}

/** What a virtio device type implements; the transport does the rest. */
export interface VirtioBackend {
  /** Virtio device id (1 net, 2 block, 3 console, 4 entropy...). */
  readonly deviceId: number;
  /** PCI class code (class << 16 | subclass << 8 | prog-if). */
  readonly classCode: number;
  /** Device-type feature bits offered; the transport adds VERSION_1, INDIRECT_DESC and EVENT_IDX. */
  readonly features: bigint;
  /** Maximum size of each queue (powers of two); the length is the queue count. */
  readonly queueMaxSizes: readonly number[];
  /** Bytes of device-specific configuration. */
  readonly configSize: number;
  readConfig(offset: number, size: 1 | 2 | 4): number;
  writeConfig(offset: number, size: 1 | 2 | 4, value: number): void;
  /** Called once, from the transport's constructor. */
  attach(transport: VirtioTransport): void;
  /** Extra feature check at FEATURES_OK (the transport already refuses bits not offered). */
  validateFeatures?(features: bigint): boolean;
  /** DRIVER_OK: the driver is ready; `features` are the negotiated ones. */
  activate(queues: readonly VirtQueue[], features: bigint): void;
  /** Device reset (driver wrote 0 to device_status, or board reset): drop all queue state. */
  reset(): void;
  /** The driver notified queue `index` (only while active). */
  queueNotified(index: number): void;
  save?(): SavedDeviceState;
  /**
   * After the transport restored its own state and the queues, before it
   * activates the back end (when the driver was running; every queue is then
   * notified once): the back end's saved state.
   */
  restore?(s: SavedDeviceState): void;
  /** Before the transport saves the queues: finish requests still in flight (they complete into the used rings). */
  quiesce?(): void;
}

/** What the transport offers its back end. */
export interface VirtioTransport {
  readonly name: string;
  readonly memory: GuestMemory;
  readonly loop: IoEventLoop;
  readonly queues: readonly VirtQueue[];
  /** Negotiated features (valid once FEATURES_OK is set). */
  readonly negotiatedFeatures: bigint;
  /** DRIVER_OK set, not failed or needing reset, bus mastering on: the device may do DMA. */
  readonly active: boolean;
  /** After a batch of used buffers: raise the queue's interrupt if the driver wants one. */
  signalUsed(index: number): void;
  /** The device configuration changed: new config_generation and a configuration interrupt. */
  configChanged(): void;
  /** Fatal protocol error: DEVICE_NEEDS_RESET and a configuration interrupt. */
  deviceError(code: string, message: string): void;
}

export interface VirtioPciOptions {
  /** Largest total length of one descriptor chain (default 2^32-1). */
  readonly maxChainBytes?: number;
  readonly interruptPin?: number;
  /** Offer VIRTIO_F_RING_PACKED: the driver may choose packed virtqueues (default: split only, as QEMU's packed=off). */
  readonly ringPacked?: boolean;
}

export interface VirtioPciSavedState extends SavedDeviceState {
  readonly kind: "virtio-pci";
  readonly version: 1;
  readonly deviceId: number;
  readonly pci: { bytes: number[]; barAddress: number[] };
  readonly msixTable: number[];
  readonly msixPending: number[];
  readonly status: number;
  readonly deviceFeatureSelect: number;
  readonly driverFeatureSelect: number;
  readonly driverFeatures: [number, number];
  readonly msixConfig: number;
  readonly queueSelect: number;
  readonly configGeneration: number;
  readonly isr: number;
  readonly queues: readonly {
    readonly sizeRegister: number;
    readonly msixVector: number;
    readonly enabled: boolean;
    readonly desc: number;
    readonly driver: number;
    readonly device: number;
    readonly queue: VirtQueueState;
  }[];
  readonly backend: SavedDeviceState | undefined;
}

/** PciConfig with a hook before reads (the PCI_CFG window reads through to the BARs). */
class VirtioPciConfig extends PciConfig {
  beforeRead: ((offset: number, size: 1 | 2 | 4) => void) | undefined;
  override configRead(offset: number, size: 1 | 2 | 4): number {
    this.beforeRead?.(offset, size);
    return super.configRead(offset, size);
  }
}

const COMMON_WIDTH = new Uint8Array(VIRTIO_BAR0.commonLength);
const COMMON_START = new Uint8Array(VIRTIO_BAR0.commonLength);
{
  const fields: [number, number][] = [
    [0x00, 4], [0x04, 4], [0x08, 4], [0x0c, 4], [0x10, 2], [0x12, 2], [0x14, 1], [0x15, 1], [0x16, 2], [0x18, 2],
    [0x1a, 2], [0x1c, 2], [0x1e, 2], [0x20, 4], [0x24, 4], [0x28, 4], [0x2c, 4], [0x30, 4], [0x34, 4],
  ];
  for (const [o, w] of fields) for (let i = 0; i < w; i++) {
    COMMON_START[o + i] = o;
    COMMON_WIDTH[o + i] = w;
  }
}

function pow2AtLeast(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

export class VirtioPciDevice implements PciDevice, VirtioTransport {
  readonly pci: PciConfig;
  readonly msix: MsixTable;
  readonly queues: VirtQueue[];
  readonly memory: GuestMemory;
  readonly loop: IoEventLoop;
  /** Last fatal error (code: message), for diagnostics. */
  lastError: string | undefined;

  private readonly numQueues: number;
  private readonly offeredLo: number;
  private readonly offeredHi: number;
  private readonly pbaOffset: number;
  private readonly pciCfgCap: number;

  // Common configuration state.
  private status = 0;
  private deviceFeatureSelect = 0;
  private driverFeatureSelect = 0;
  private driverFeatureLo = 0;
  private driverFeatureHi = 0;
  private features = 0n;
  private msixConfig = VIRTIO_MSI_NO_VECTOR;
  private queueSelect = 0;
  private configGeneration = 0;
  private isr = 0;
  private intxLevel = false;
  private readonly qSize: number[];
  private readonly qVector: number[];
  private readonly qEnabled: boolean[];
  private readonly qDesc: number[];
  private readonly qDriver: number[];
  private readonly qDevice: number[];

  private doorbellBase: number | undefined;
  private readonly ringers: (() => void)[];

  constructor(
    readonly name: string,
    readonly backend: VirtioBackend,
    private readonly services: PciDeviceServices,
    opts: VirtioPciOptions = {},
  ) {
    const n = backend.queueMaxSizes.length;
    if (n < 1 || n > 1024) throw new VirtioError("VIRTIO_BAD_QUEUES", `${name}: ${n} queues (1..1024 supported)`, { name });
    if (backend.configSize > 0x1000) throw new VirtioError("VIRTIO_BAD_CONFIG", `${name}: device configuration of ${backend.configSize} bytes`, { name });
    this.numQueues = n;
    this.memory = services.memory;
    this.loop = services.loop;
    const offered =
      backend.features | featureBit(VIRTIO_F.version1) | featureBit(VIRTIO_F.indirectDesc) | featureBit(VIRTIO_F.eventIdx) | (opts.ringPacked === true ? featureBit(VIRTIO_F.ringPacked) : 0n);
    this.offeredLo = Number(offered & 0xffff_ffffn);
    this.offeredHi = Number((offered >> 32n) & 0xffff_ffffn);

    const vectors = n + 1;
    const tableBytes = 16 * vectors;
    this.pbaOffset = Math.ceil(tableBytes / 0x800) * 0x800;
    const bar1Size = pow2AtLeast(Math.max(0x1000, this.pbaOffset + Math.ceil(vectors / 64) * 8));
    const identity: PciIdentity = {
      vendorId: VIRTIO_PCI_VENDOR,
      deviceId: VIRTIO_PCI_DEVICE_BASE + backend.deviceId,
      classCode: backend.classCode,
      revision: 1,
      subsystemVendorId: VIRTIO_PCI_VENDOR,
      subsystemId: VIRTIO_PCI_SUBSYSTEM_ID,
      interruptPin: opts.interruptPin ?? 1,
    };
    const bars: PciBarSpec[] = [
      { index: 0, kind: "mmio32", size: VIRTIO_BAR0.size },
      { index: 1, kind: "mmio32", size: bar1Size },
    ];
    const pci = new VirtioPciConfig(identity, bars);
    this.pci = pci;
    this.addVendorCap(VIRTIO_PCI_CAP.common, VIRTIO_BAR0.common, VIRTIO_BAR0.commonLength);
    this.addVendorCap(VIRTIO_PCI_CAP.notify, VIRTIO_BAR0.notify, n * VIRTIO_BAR0.notifyMultiplier, VIRTIO_BAR0.notifyMultiplier);
    this.addVendorCap(VIRTIO_PCI_CAP.isr, VIRTIO_BAR0.isr, 1);
    if (backend.configSize > 0) this.addVendorCap(VIRTIO_PCI_CAP.device, VIRTIO_BAR0.device, backend.configSize);
    this.pciCfgCap = this.addPciCfgCap();
    this.msix = new MsixTable(pci, { vectors, tableBar: 1, tableOffset: 0, pbaBar: 1, pbaOffset: this.pbaOffset }, services.msi);
    pci.beforeRead = (o, s) => this.pciCfgBeforeRead(o, s);
    pci.onMappingChanged = () => this.syncDoorbells();
    pci.onCommandWrite = () => this.commandWritten();

    const onError = (_q: VirtQueue, code: string, message: string): void => this.deviceError(code, message);
    this.queues = backend.queueMaxSizes.map((max, i) => {
      const q = new VirtQueue(services.memory, i, max, onError);
      if (opts.maxChainBytes !== undefined) q.maxChainBytes = opts.maxChainBytes;
      return q;
    });
    this.qSize = backend.queueMaxSizes.slice();
    this.qVector = new Array<number>(n).fill(VIRTIO_MSI_NO_VECTOR);
    this.qEnabled = new Array<boolean>(n).fill(false);
    this.qDesc = new Array<number>(n).fill(0);
    this.qDriver = new Array<number>(n).fill(0);
    this.qDevice = new Array<number>(n).fill(0);
    this.ringers = this.queues.map((_q, i) => () => this.notifyQueue(i));
    backend.attach(this);
    this.syncDoorbells();
  }

  private addVendorCap(type: number, offset: number, length: number, multiplier?: number): number {
    const body = new Uint8Array(multiplier === undefined ? 14 : 18);
    const dv = new DataView(body.buffer);
    body[0] = 2 + body.length; // cap_len
    body[1] = type;
    body[2] = 0; // bar
    body[3] = 0; // id
    dv.setUint32(6, offset, true);
    dv.setUint32(10, length, true);
    if (multiplier !== undefined) dv.setUint32(14, multiplier, true);
    return this.pci.addCapability(PCI_CAP_ID.vendor, body);
  }

  private addPciCfgCap(): number {
    const body = new Uint8Array(18);
    body[0] = 20;
    body[1] = VIRTIO_PCI_CAP.pciCfg;
    const writable = new Uint8Array(18);
    writable[2] = 0xff; // bar
    writable.fill(0xff, 6, 18); // offset, length, pci_cfg_data
    return this.pci.addCapability(PCI_CAP_ID.vendor, body, writable, (capOffset, size) => this.pciCfgWritten(capOffset, size));
  }

  // ---- VirtioTransport ----

  get negotiatedFeatures(): bigint {
    return this.features;
  }

  get active(): boolean {
    return (this.status & (VIRTIO_STATUS.driverOk | VIRTIO_STATUS.needsReset | VIRTIO_STATUS.failed)) === VIRTIO_STATUS.driverOk && this.pci.busMaster;
  }

  /** Current device_status. */
  get deviceStatus(): number {
    return this.status;
  }

  describeState(): string[] {
    const msix = this.msix.enabled ? `MSI-X on${this.msix.functionMasked ? " (function masked)" : ""}, config vector ${this.msixConfig} ${this.msix.vectorState(this.msixConfig)}` : `INTx, isr ${this.isr}`;
    const lines = [`${this.name}: status 0x${this.status.toString(16)}${this.active ? " active" : ""}, features 0x${this.features.toString(16)}, ${msix}${this.lastError !== undefined ? `, error ${this.lastError}` : ""}`];
    this.queues.forEach((q, i) => {
      const v = this.qVector[i]!;
      lines.push(`  ${q.describe()}; vector ${v === VIRTIO_MSI_NO_VECTOR ? "none" : `${v} ${this.msix.vectorState(v)}`}`);
    });
    return lines;
  }

  signalUsed(index: number): void {
    const q = this.queues[index];
    if (q === undefined || !q.needsInterrupt()) return;
    if (this.msix.enabled) {
      const v = this.qVector[index]!;
      if (v !== VIRTIO_MSI_NO_VECTOR) this.msix.notify(v);
      return;
    }
    this.raiseIsr(1);
  }

  configChanged(): void {
    this.configGeneration = (this.configGeneration + 1) & 0xff;
    if ((this.status & VIRTIO_STATUS.driverOk) !== 0) this.configInterrupt();
  }

  deviceError(code: string, message: string): void {
    if ((this.status & VIRTIO_STATUS.needsReset) !== 0) return;
    this.lastError = `${code}: ${message}`;
    this.status |= VIRTIO_STATUS.needsReset;
    if ((this.status & VIRTIO_STATUS.driverOk) !== 0) this.configInterrupt();
  }

  private configInterrupt(): void {
    if (this.msix.enabled) {
      if (this.msixConfig !== VIRTIO_MSI_NO_VECTOR) this.msix.notify(this.msixConfig);
      return;
    }
    this.raiseIsr(2);
  }

  private raiseIsr(bits: number): void {
    this.isr |= bits;
    this.updateIntx();
  }

  private updateIntx(): void {
    const level = this.isr !== 0;
    this.pci.setInterruptStatus(level);
    const drive = level && !this.pci.intxDisabled;
    if (drive !== this.intxLevel) {
      this.intxLevel = drive;
      this.services.intx.setLevel(drive);
    }
  }

  private commandWritten(): void {
    this.updateIntx();
    // Bus mastering may just have been turned on: look at the queues.
    if (this.active) for (let i = 0; i < this.numQueues; i++) this.notifyQueue(i);
  }

  /** A queue notification (doorbell or BAR write). */
  notifyQueue(index: number): void {
    if (!this.active) return;
    const q = this.queues[index];
    if (q === undefined || !q.ready) return;
    this.backend.queueNotified(index);
  }

  /** Map the notify addresses where BAR0 decodes now (called on mapping changes; idempotent). */
  syncDoorbells(force = false): void {
    const base = this.pci.mappedAddress(0);
    if (base === this.doorbellBase && !force) return;
    this.doorbellBase = base;
    for (let i = 0; i < this.numQueues; i++) {
      const gpa = base === undefined ? undefined : base + VIRTIO_BAR0.notify + i * VIRTIO_BAR0.notifyMultiplier;
      this.services.doorbells.mapDoorbell(i, gpa, 2, this.ringers[i]!);
    }
  }

  // ---- PciDevice ----

  barRead(bar: number, offset: number, size: 1 | 2 | 4): number {
    if (bar === 1) {
      const tb = this.msix.tableBytes;
      if (offset < tb) return this.msix.tableRead(offset, size);
      if (offset >= this.pbaOffset) return this.msix.pbaRead(offset - this.pbaOffset, size);
      return 0;
    }
    if (bar !== 0 || offset < 0) return 0;
    if (offset < VIRTIO_BAR0.isr) return this.commonRead(offset, size);
    if (offset < VIRTIO_BAR0.device) {
      if (offset !== VIRTIO_BAR0.isr) return 0;
      const v = this.isr;
      this.isr = 0;
      this.updateIntx();
      return v;
    }
    if (offset < VIRTIO_BAR0.notify) {
      const o = offset - VIRTIO_BAR0.device;
      if (o + size > this.backend.configSize) return 0;
      return this.backend.readConfig(o, size) >>> 0;
    }
    return 0;
  }

  barWrite(bar: number, offset: number, size: 1 | 2 | 4, value: number): void {
    if (bar === 1) {
      if (offset < this.msix.tableBytes) this.msix.tableWrite(offset, size, value);
      return;
    }
    if (bar !== 0 || offset < 0) return;
    if (offset >= VIRTIO_BAR0.notify) {
      const o = offset - VIRTIO_BAR0.notify;
      if (o % VIRTIO_BAR0.notifyMultiplier === 0) this.notifyQueue(o / VIRTIO_BAR0.notifyMultiplier);
      return;
    }
    if (offset < VIRTIO_BAR0.isr) this.commonWrite(offset, size, value >>> 0);
    else if (offset >= VIRTIO_BAR0.device) {
      const o = offset - VIRTIO_BAR0.device;
      if (o + size <= this.backend.configSize) this.backend.writeConfig(o, size, value >>> 0);
    }
  }

  reset(): void {
    this.pci.resetRegisters();
    this.msix.reset();
    this.resetDevice();
    this.syncDoorbells();
  }

  // ---- common configuration ----

  private commonField(start: number): number {
    const sel = this.queueSelect;
    const qv = sel < this.numQueues;
    switch (start) {
      case VIRTIO_COMMON.deviceFeatureSelect:
        return this.deviceFeatureSelect;
      case VIRTIO_COMMON.deviceFeature:
        return this.deviceFeatureSelect === 0 ? this.offeredLo : this.deviceFeatureSelect === 1 ? this.offeredHi : 0;
      case VIRTIO_COMMON.driverFeatureSelect:
        return this.driverFeatureSelect;
      case VIRTIO_COMMON.driverFeature:
        return this.driverFeatureSelect === 0 ? this.driverFeatureLo : this.driverFeatureSelect === 1 ? this.driverFeatureHi : 0;
      case VIRTIO_COMMON.msixConfig:
        return this.msixConfig;
      case VIRTIO_COMMON.numQueues:
        return this.numQueues;
      case VIRTIO_COMMON.deviceStatus:
        return this.status;
      case VIRTIO_COMMON.configGeneration:
        return this.configGeneration;
      case VIRTIO_COMMON.queueSelect:
        return sel;
      case VIRTIO_COMMON.queueSize:
        return qv ? this.qSize[sel]! : 0;
      case VIRTIO_COMMON.queueMsixVector:
        return qv ? this.qVector[sel]! : VIRTIO_MSI_NO_VECTOR;
      case VIRTIO_COMMON.queueEnable:
        return qv && this.qEnabled[sel]! ? 1 : 0;
      case VIRTIO_COMMON.queueNotifyOff:
        return qv ? sel : 0;
      case VIRTIO_COMMON.queueDesc:
        return qv ? this.qDesc[sel]! % 2 ** 32 : 0;
      case VIRTIO_COMMON.queueDesc + 4:
        return qv ? Math.floor(this.qDesc[sel]! / 2 ** 32) : 0;
      case VIRTIO_COMMON.queueDriver:
        return qv ? this.qDriver[sel]! % 2 ** 32 : 0;
      case VIRTIO_COMMON.queueDriver + 4:
        return qv ? Math.floor(this.qDriver[sel]! / 2 ** 32) : 0;
      case VIRTIO_COMMON.queueDevice:
        return qv ? this.qDevice[sel]! % 2 ** 32 : 0;
      case VIRTIO_COMMON.queueDevice + 4:
        return qv ? Math.floor(this.qDevice[sel]! / 2 ** 32) : 0;
      default:
        return 0;
    }
  }

  private commonRead(offset: number, size: 1 | 2 | 4): number {
    if (offset >= VIRTIO_BAR0.commonLength) return 0;
    if (COMMON_START[offset] === offset && COMMON_WIDTH[offset] === size) return this.commonField(offset) >>> 0;
    // Odd-sized or straddling access: assemble byte by byte.
    let v = 0;
    for (let i = size - 1; i >= 0; i--) {
      const o = offset + i;
      let b = 0;
      if (o < VIRTIO_BAR0.commonLength) {
        const start = COMMON_START[o]!;
        b = Math.floor(this.commonField(start) / 2 ** (8 * (o - start))) & 0xff;
      }
      v = v * 256 + b;
    }
    return v >>> 0;
  }

  private commonWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    // Fields are written with their natural width (4.1.3.1); anything else is ignored.
    if (offset >= VIRTIO_BAR0.commonLength || COMMON_START[offset] !== offset || COMMON_WIDTH[offset] !== size) return;
    const sel = this.queueSelect;
    const qv = sel < this.numQueues;
    const queueWritable = qv && !this.qEnabled[sel]!;
    switch (offset) {
      case VIRTIO_COMMON.deviceFeatureSelect:
        this.deviceFeatureSelect = value;
        return;
      case VIRTIO_COMMON.driverFeatureSelect:
        this.driverFeatureSelect = value;
        return;
      case VIRTIO_COMMON.driverFeature:
        if ((this.status & (VIRTIO_STATUS.featuresOk | VIRTIO_STATUS.failed)) !== 0) return;
        if (this.driverFeatureSelect === 0) this.driverFeatureLo = value;
        else if (this.driverFeatureSelect === 1) this.driverFeatureHi = value;
        return;
      case VIRTIO_COMMON.msixConfig:
        this.msixConfig = value < this.msix.layout.vectors ? value : VIRTIO_MSI_NO_VECTOR;
        return;
      case VIRTIO_COMMON.deviceStatus:
        this.writeStatus(value & 0xff);
        return;
      case VIRTIO_COMMON.queueSelect:
        this.queueSelect = value & 0xffff;
        return;
      case VIRTIO_COMMON.queueSize:
        if (queueWritable) this.qSize[sel] = value & 0xffff;
        return;
      case VIRTIO_COMMON.queueMsixVector:
        if (qv) this.qVector[sel] = value < this.msix.layout.vectors ? value : VIRTIO_MSI_NO_VECTOR;
        return;
      case VIRTIO_COMMON.queueEnable:
        if (qv && value === 1 && !this.qEnabled[sel]!) this.enableQueue(sel);
        return;
      case VIRTIO_COMMON.queueDesc:
      case VIRTIO_COMMON.queueDesc + 4:
        if (queueWritable) this.qDesc[sel] = setHalf(this.qDesc[sel]!, offset !== VIRTIO_COMMON.queueDesc, value);
        return;
      case VIRTIO_COMMON.queueDriver:
      case VIRTIO_COMMON.queueDriver + 4:
        if (queueWritable) this.qDriver[sel] = setHalf(this.qDriver[sel]!, offset !== VIRTIO_COMMON.queueDriver, value);
        return;
      case VIRTIO_COMMON.queueDevice:
      case VIRTIO_COMMON.queueDevice + 4:
        if (queueWritable) this.qDevice[sel] = setHalf(this.qDevice[sel]!, offset !== VIRTIO_COMMON.queueDevice, value);
        return;
      default:
        return; // read-only fields
    }
  }

  private enableQueue(i: number): void {
    this.qEnabled[i] = true;
    const q = this.queues[i]!;
    q.setFeatures({
      eventIdx: (this.features & featureBit(VIRTIO_F.eventIdx)) !== 0n,
      indirect: (this.features & featureBit(VIRTIO_F.indirectDesc)) !== 0n,
      packed: (this.features & featureBit(VIRTIO_F.ringPacked)) !== 0n,
    });
    // Errors (bad size, alignment, rings outside RAM) come back through the queue's error hook.
    if (q.configure(this.qSize[i]!, this.qDesc[i]!, this.qDriver[i]!, this.qDevice[i]!) && this.active) this.notifyQueue(i);
  }

  private writeStatus(v: number): void {
    if (v === 0) {
      this.resetDevice();
      return;
    }
    const before = this.status;
    let next = (v & ~VIRTIO_STATUS.needsReset) | (before & VIRTIO_STATUS.needsReset);
    if ((next & VIRTIO_STATUS.featuresOk) !== 0 && (before & VIRTIO_STATUS.featuresOk) === 0) {
      if (this.featuresAcceptable()) this.features = (BigInt(this.driverFeatureHi) << 32n) | BigInt(this.driverFeatureLo);
      else next &= ~VIRTIO_STATUS.featuresOk;
    }
    // FEATURES_OK, once accepted, stays until reset; DRIVER_OK needs it.
    if ((before & VIRTIO_STATUS.featuresOk) !== 0) next |= VIRTIO_STATUS.featuresOk;
    if ((next & VIRTIO_STATUS.featuresOk) === 0) next &= ~VIRTIO_STATUS.driverOk;
    this.status = next;
    if ((next & VIRTIO_STATUS.driverOk) !== 0 && (before & VIRTIO_STATUS.driverOk) === 0) {
      this.syncDoorbells();
      this.backend.activate(this.queues, this.features);
      // Buffers made available before DRIVER_OK (or kicks that came early) are looked at now.
      for (let i = 0; i < this.numQueues; i++) this.notifyQueue(i);
    }
  }

  private featuresAcceptable(): boolean {
    const lo = this.driverFeatureLo;
    const hi = this.driverFeatureHi;
    if ((lo & ~this.offeredLo) !== 0 || (hi & ~this.offeredHi) !== 0) return false;
    if ((hi & 1) === 0) return false; // VIRTIO_F_VERSION_1 is required by a modern-only device
    const f = (BigInt(hi) << 32n) | BigInt(lo);
    return this.backend.validateFeatures?.(f) ?? true;
  }

  /** Device reset (4.1.4.3.1): everything back to its initial state; reads 0 once done (synchronous here). */
  private resetDevice(): void {
    this.backend.reset();
    this.status = 0;
    this.deviceFeatureSelect = 0;
    this.driverFeatureSelect = 0;
    this.driverFeatureLo = 0;
    this.driverFeatureHi = 0;
    this.features = 0n;
    this.msixConfig = VIRTIO_MSI_NO_VECTOR;
    this.queueSelect = 0;
    this.lastError = undefined;
    for (let i = 0; i < this.numQueues; i++) {
      this.queues[i]!.reset();
      this.qSize[i] = this.queues[i]!.maxSize;
      this.qVector[i] = VIRTIO_MSI_NO_VECTOR;
      this.qEnabled[i] = false;
      this.qDesc[i] = this.qDriver[i] = this.qDevice[i] = 0;
    }
    this.isr = 0;
    this.updateIntx();
  }

  // ---- PCI_CFG capability window (4.1.4.7) ----

  private pciCfgTarget(): { bar: number; offset: number; length: 1 | 2 | 4 } | undefined {
    const b = this.pci.bytes;
    const c = this.pciCfgCap;
    const bar = b[c + 4]!;
    const offset = (b[c + 8]! | (b[c + 9]! << 8) | (b[c + 10]! << 16) | (b[c + 11]! << 24)) >>> 0;
    const length = (b[c + 12]! | (b[c + 13]! << 8) | (b[c + 14]! << 16) | (b[c + 15]! << 24)) >>> 0;
    if (length !== 1 && length !== 2 && length !== 4) return undefined;
    if (bar > 1 || offset % length !== 0) return undefined;
    return { bar, offset, length };
  }

  private pciCfgBeforeRead(offset: number, size: number): void {
    const data = this.pciCfgCap + 16;
    if (offset >= data + 4 || offset + size <= data) return;
    const t = this.pciCfgTarget();
    if (t === undefined) return;
    const v = this.barRead(t.bar, t.offset, t.length);
    for (let i = 0; i < 4; i++) this.pci.bytes[data + i] = i < t.length ? (v >>> (8 * i)) & 0xff : 0;
  }

  private pciCfgWritten(capOffset: number, size: number): void {
    if (capOffset + size <= 16) return;
    const t = this.pciCfgTarget();
    if (t === undefined) return;
    const b = this.pci.bytes;
    const data = this.pciCfgCap + 16;
    let v = 0;
    for (let i = t.length - 1; i >= 0; i--) v = v * 256 + b[data + i]!;
    this.barWrite(t.bar, t.offset, t.length, v);
  }

  // ---- saved state ----

  save(): VirtioPciSavedState {
    this.backend.quiesce?.();
    return {
      kind: "virtio-pci",
      version: 1,
      deviceId: this.backend.deviceId,
      pci: this.pci.saveRegisters(),
      msixTable: Array.from(this.msix.table),
      msixPending: Array.from(this.msix.pending),
      status: this.status,
      deviceFeatureSelect: this.deviceFeatureSelect,
      driverFeatureSelect: this.driverFeatureSelect,
      driverFeatures: [this.driverFeatureLo, this.driverFeatureHi],
      msixConfig: this.msixConfig,
      queueSelect: this.queueSelect,
      configGeneration: this.configGeneration,
      isr: this.isr,
      queues: this.queues.map((q, i) => ({
        sizeRegister: this.qSize[i]!,
        msixVector: this.qVector[i]!,
        enabled: this.qEnabled[i]!,
        desc: this.qDesc[i]!,
        driver: this.qDriver[i]!,
        device: this.qDevice[i]!,
        queue: q.save(),
      })),
      backend: this.backend.save?.(),
    };
  }

  /**
   * Re-establish a saved state taken from a device of the same shape (same
   * device id and queue count). Throws VirtioError when it does not fit;
   * rings are re-validated against guest RAM (a ring that no longer fits puts
   * the device in DEVICE_NEEDS_RESET, as at run time).
   */
  restore(s: VirtioPciSavedState): void {
    if (s.kind !== "virtio-pci" || s.version !== 1)
      throw new VirtioError("VIRTIO_RESTORE_VERSION", `${this.name}: saved state ${s.kind} v${s.version} is not virtio-pci v1`, { name: this.name });
    if (s.deviceId !== this.backend.deviceId || s.queues.length !== this.numQueues)
      throw new VirtioError("VIRTIO_RESTORE_SHAPE", `${this.name}: saved state is for device ${s.deviceId} with ${s.queues.length} queues`, { name: this.name });
    if (s.pci.bytes.length !== 256 || s.msixTable.length !== this.msix.table.length || s.msixPending.length !== this.msix.pending.length)
      throw new VirtioError("VIRTIO_RESTORE_SHAPE", `${this.name}: saved PCI / MSI-X state has the wrong size`, { name: this.name });
    this.pci.bytes.set(s.pci.bytes.map((b) => b & 0xff));
    for (const b of this.pci.barSpecs()) {
      const a = s.pci.barAddress[b.index] ?? 0;
      this.pci.assignBar(b.index, a - (a % b.size));
    }
    this.msix.table.set(s.msixTable.map((b) => b & 0xff));
    this.msix.pending.set(s.msixPending.map((b) => b & 0xff));
    this.status = s.status & 0xff;
    this.deviceFeatureSelect = s.deviceFeatureSelect >>> 0;
    this.driverFeatureSelect = s.driverFeatureSelect >>> 0;
    this.driverFeatureLo = s.driverFeatures[0] >>> 0;
    this.driverFeatureHi = s.driverFeatures[1] >>> 0;
    this.features = (this.status & VIRTIO_STATUS.featuresOk) !== 0 ? (BigInt(this.driverFeatureHi) << 32n) | BigInt(this.driverFeatureLo) : 0n;
    this.msixConfig = s.msixConfig & 0xffff;
    this.queueSelect = s.queueSelect & 0xffff;
    this.configGeneration = s.configGeneration & 0xff;
    this.isr = s.isr & 3;
    this.lastError = undefined;
    s.queues.forEach((q, i) => {
      this.qSize[i] = q.sizeRegister & 0xffff;
      this.qVector[i] = q.msixVector & 0xffff;
      this.qEnabled[i] = q.enabled;
      this.qDesc[i] = q.desc;
      this.qDriver[i] = q.driver;
      this.qDevice[i] = q.device;
      this.queues[i]!.restore(q.queue);
    });
    this.pci.setInterruptStatus(this.isr !== 0);
    this.intxLevel = this.isr !== 0 && !this.pci.intxDisabled;
    this.services.intx.setLevel(this.intxLevel);
    this.syncDoorbells(true);
    // The back end's own state first, so that it is in force when the device starts (a NIC's filter before its first frame).
    if (s.backend !== undefined) this.backend.restore?.(s.backend);
    if (this.active) {
      this.backend.activate(this.queues, this.features);
      // What the driver made available while the device was saved, or left waiting with notifications off, is looked at now.
      for (let i = 0; i < this.numQueues; i++) this.notifyQueue(i);
    }
  }
}

function setHalf(current: number, high: boolean, value: number): number {
  const lo = current % 2 ** 32;
  const hi = Math.floor(current / 2 ** 32);
  return high ? (value >>> 0) * 2 ** 32 + lo : hi * 2 ** 32 + (value >>> 0);
}
