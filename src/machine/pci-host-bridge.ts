/**
 * The PCI host bridge: configuration mechanism #1 (PCI Local Bus spec 3.0, 3.2.2.3.2)
 * at ports 0xCF8 (CONFIG_ADDRESS, dword) and 0xCFC-0xCFF (CONFIG_DATA, any width),
 * and bus 0 function 00:00.0, the host bridge itself (Intel 440FX ids, class 0x0600).
 *
 * CONFIG_ADDRESS: bit 31 enable, 23:16 bus, 15:11 device, 10:8 function, 7:2 register.
 * A data access at 0xCFC+k reaches register (address & 0xFC) + k. Absent functions
 * (or a disabled address) read all-ones and ignore writes. Port 0xCF9 (reset control)
 * is not ours. The bus routes an access by its first port, so the address register
 * claims the single port 0xCF8 and still receives the dword accesses made there;
 * 0xCF9 (reset control) and 0xCFA-0xCFB stay free for other devices. Byte or word
 * accesses to 0xCF8 read all-ones and are ignored on write.
 *
 * State (the address latch and the host bridge's own configuration bytes) is declared
 * with structLayout so every thread's PciHostBridge over the same arena sees one latch.
 */
import { PartisError } from "../errors.js";
import type { AccessSize, BusDevice, IoRegion } from "./bus.js";
import { structLayout, type Bound, type SharedStateArena } from "./shared-state.js";

export class PciConfigError extends PartisError {}

/** One PCI function's configuration space (256 bytes, conventional). */
export interface PciFunction {
  /** Read `size` (1, 2, 4) bytes at `offset` (0..255, naturally aligned). */
  configRead(offset: number, size: 1 | 2 | 4): number;
  configWrite(offset: number, size: 1 | 2 | 4, value: number): void;
}

/** Bus/device/function as one number: bus << 8 | device << 3 | function. */
export type Bdf = number;

export function bdf(bus: number, device: number, fn: number): Bdf {
  if (bus < 0 || bus > 255 || device < 0 || device > 31 || fn < 0 || fn > 7 || ![bus, device, fn].every(Number.isInteger))
    throw new PciConfigError("PCI_BAD_BDF", `invalid PCI address ${bus}:${device}.${fn}`);
  return (bus << 8) | (device << 3) | fn;
}

export function formatBdf(b: Bdf): string {
  const h = (v: number, w: number) => v.toString(16).padStart(w, "0");
  return `${h(b >> 8, 2)}:${h((b >> 3) & 31, 2)}.${b & 7}`;
}

export const HOST_BRIDGE_VENDOR = 0x8086;
export const HOST_BRIDGE_DEVICE = 0x1237;

/**
 * A 256-byte configuration space with a write mask: the simplest PciFunction, used
 * by the host bridge and handy for functions whose registers are all plain storage.
 */
export class PciConfigSpace implements PciFunction {
  /** 1 bits are guest-writable. */
  readonly writeMask = new Uint8Array(256);
  /** @param bytes the 256 configuration bytes (e.g. a shared-state field); fresh zeros by default. */
  constructor(readonly bytes: Uint8Array = new Uint8Array(256)) {
    if (bytes.length !== 256) throw new PciConfigError("PCI_BAD_CONFIG_SPACE", "a configuration space is 256 bytes");
  }

  configRead(offset: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.bytes[offset + i]!;
    return v >>> 0;
  }

  configWrite(offset: number, size: 1 | 2 | 4, value: number): void {
    for (let i = 0; i < size; i++) {
      const m = this.writeMask[offset + i]!;
      const b = (value >>> (8 * i)) & 0xff;
      this.bytes[offset + i] = (this.bytes[offset + i]! & ~m) | (b & m);
    }
  }
}

/** 00:00.0: a host bridge with no BARs; command register writable (memory/IO/master bits). */
export function hostBridgeFunction(bytes?: Uint8Array, initialise = true): PciConfigSpace {
  const s = new PciConfigSpace(bytes);
  s.writeMask[0x04] = 0x07;
  s.writeMask[0x0d] = 0xff; // latency timer
  if (!initialise) return s;
  s.bytes.fill(0);
  const dv = new DataView(s.bytes.buffer, s.bytes.byteOffset, 256);
  dv.setUint16(0x00, HOST_BRIDGE_VENDOR, true);
  dv.setUint16(0x02, HOST_BRIDGE_DEVICE, true);
  dv.setUint16(0x04, 0x0006, true); // memory + bus master enabled
  dv.setUint16(0x06, 0x0000, true);
  s.bytes[0x08] = 0x02; // revision
  s.bytes[0x09] = 0x00; // prog-if
  s.bytes[0x0a] = 0x00; // subclass: host bridge
  s.bytes[0x0b] = 0x06; // class: bridge
  s.bytes[0x0e] = 0x00; // header type 0, single function
  return s;
}

export const PciHostBridgeLayout = structLayout({ configAddress: "u32", hostConfig: { bytes: 256 } });

// Bound<> inherits `readonly` from the const-inferred field record; the fields are writable.
type HostBridgeBound = Bound<typeof PciHostBridgeLayout.fields>;

export interface PciHostBridgeState {
  readonly kind: "pci-host-bridge";
  readonly version: 1;
  readonly configAddress: number;
  /** The host bridge's 256 configuration bytes. */
  readonly hostConfig: number[];
}

export class PciHostBridge implements BusDevice {
  readonly name: string;
  readonly regions: readonly IoRegion[] = [
    { name: "config-address", space: "pio", start: 0xcf8, length: 1 },
    { name: "config-data", space: "pio", start: 0xcfc, length: 4 },
  ];
  private readonly functions = new Map<Bdf, PciFunction>();
  private readonly state: { -readonly [K in keyof HostBridgeBound]: HostBridgeBound[K] };

  /**
   * @param opts.arena where the state lives; the first thread to build the board passes
   *   `initialise: true` (default), the others bind the same arena slot with false.
   */
  constructor(opts: { name?: string; arena?: SharedStateArena; initialise?: boolean } = {}) {
    this.name = opts.name ?? "pci-host-bridge";
    this.state = opts.arena !== undefined
      ? opts.arena.allocate(PciHostBridgeLayout)
      : PciHostBridgeLayout.bind(new ArrayBuffer(PciHostBridgeLayout.size), 0);
    const init = opts.initialise ?? true;
    if (init) this.state.configAddress = 0;
    this.attach(bdf(0, 0, 0), hostBridgeFunction(this.state.hostConfig, init));
  }

  private get configAddress(): number {
    return this.state.configAddress;
  }

  private set configAddress(v: number) {
    this.state.configAddress = v;
  }

  /** Register a function; refuses a slot already taken. */
  attach(address: Bdf, fn: PciFunction): void {
    if (this.functions.has(address))
      throw new PciConfigError("PCI_SLOT_TAKEN", `PCI function ${formatBdf(address)} is already attached`, { bdf: formatBdf(address) });
    this.functions.set(address, fn);
  }

  /** The function at `address`, if any. */
  functionAt(address: Bdf): PciFunction | undefined {
    return this.functions.get(address);
  }

  read(region: string, offset: number, size: AccessSize): number {
    if (region === "config-address") {
      if (offset === 0 && size === 4) return this.configAddress >>> 0;
      return ones(size);
    }
    const target = this.target(offset, size);
    if (target === undefined) return ones(size);
    return target.fn.configRead(target.offset, size as 1 | 2 | 4) >>> 0;
  }

  write(region: string, offset: number, size: AccessSize, value: number): void {
    if (region === "config-address") {
      // Only a dword write at 0xCF8 latches the address (byte writes there are other chipset registers).
      if (offset === 0 && size === 4) this.configAddress = (value & 0x80ff_fffc) >>> 0;
      return;
    }
    const target = this.target(offset, size);
    if (target === undefined) return;
    target.fn.configWrite(target.offset, size as 1 | 2 | 4, value >>> 0);
  }

  private target(dataOffset: number, size: AccessSize): { fn: PciFunction; offset: number } | undefined {
    if (size !== 1 && size !== 2 && size !== 4) return undefined;
    if (dataOffset + size > 4 || dataOffset % size !== 0) return undefined; // misaligned: unsupported
    const a = this.configAddress;
    if ((a & 0x8000_0000) === 0) return undefined;
    const fn = this.functions.get((a >>> 8) & 0xffff);
    if (fn === undefined) return undefined;
    return { fn, offset: (a & 0xfc) + dataOffset };
  }

  save(): PciHostBridgeState {
    return { kind: "pci-host-bridge", version: 1, configAddress: this.configAddress, hostConfig: Array.from(this.state.hostConfig) };
  }

  restore(state: unknown): void {
    const s = state as Partial<PciHostBridgeState> | null;
    if (s === null || typeof s !== "object" || s.kind !== "pci-host-bridge" || s.version !== 1)
      throw new PciConfigError("PCI_BAD_SAVED_STATE", "saved state is not a version 1 PCI host bridge state");
    const a = s.configAddress;
    if (typeof a !== "number" || !Number.isInteger(a) || a < 0 || a > 0xffff_ffff || (a & ~0x80ff_fffc) !== 0)
      throw new PciConfigError("PCI_BAD_SAVED_STATE", "saved PCI config address is invalid");
    const h = s.hostConfig;
    if (!Array.isArray(h) || h.length !== 256 || !h.every((b) => Number.isInteger(b) && b >= 0 && b <= 255))
      throw new PciConfigError("PCI_BAD_SAVED_STATE", "saved host bridge configuration space is invalid");
    const fresh = hostBridgeFunction();
    // Identity registers come from this build, never from the file; only writable bits are restored.
    for (let i = 0; i < 256; i++) {
      const m = fresh.writeMask[i]!;
      this.state.hostConfig[i] = (fresh.bytes[i]! & ~m) | (h[i]! & m);
    }
    this.configAddress = a >>> 0;
  }
}

function ones(size: AccessSize): number {
  return size === 4 ? 0xffff_ffff : size === 2 ? 0xffff : 0xff;
}
