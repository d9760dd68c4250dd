/**
 * The I/O bus of the virtual motherboard: port I/O (16-bit port space) and
 * MMIO (guest-physical). Devices declare named static regions; the bus claims
 * them and refuses overlaps. Devices see (region, offset), never absolute
 * addresses. Failed or unclaimed reads return all-ones; unclaimed writes are
 * dropped and counted.
 */
import { PartisError } from "../errors.js";

export type AddressSpace = "pio" | "mmio";

export interface IoRegion {
  readonly name: string;
  readonly space: AddressSpace;
  /** Port number (pio) or guest-physical address (mmio). */
  readonly start: number;
  readonly length: number;
}

/** Access size in bytes: 1, 2, 4 or 8 (8 only for MMIO). */
export type AccessSize = 1 | 2 | 4 | 8;

/**
 * A device model reachable through the bus. `read` returns the value (only the
 * low `size` bytes are used); `write` receives the value. Values are numbers:
 * 8-byte MMIO accesses are split into two 4-byte accesses by the bus.
 */
export interface BusDevice {
  /** Instance name, unique on a board (e.g. "com1", "i8042"). */
  readonly name: string;
  readonly regions: readonly IoRegion[];
  read(region: string, offset: number, size: AccessSize): number;
  write(region: string, offset: number, size: AccessSize, value: number): void;
}

export class BusConflictError extends PartisError {}

interface Claim {
  readonly device: BusDevice;
  readonly region: IoRegion;
}

const ALL_ONES = [0, 0xff, 0xffff, 0, 0xffffffff] as const;

export class IoBus {
  /** Port → index into `portClaims` (+1; 0 = unclaimed). */
  private readonly portMap = new Uint16Array(0x10000);
  private readonly portClaims: Claim[] = [];
  private readonly mmioClaims: Claim[] = [];
  /** Accesses that hit no device (reads and writes). */
  unclaimedAccesses = 0;

  attach(device: BusDevice): void {
    for (const region of device.regions) this.claim(device, region);
  }

  private claim(device: BusDevice, region: IoRegion): void {
    if (region.length <= 0) throw new BusConflictError("BUS_BAD_REGION", `${device.name}/${region.name}: empty region`);
    if (region.space === "pio") {
      if (region.start < 0 || region.start + region.length > 0x10000)
        throw new BusConflictError("BUS_BAD_REGION", `${device.name}/${region.name}: ports out of range`);
      for (let p = region.start; p < region.start + region.length; p++) {
        const other = this.portMap[p]!;
        if (other !== 0) {
          const o = this.portClaims[other - 1]!;
          throw new BusConflictError(
            "BUS_CONFLICT",
            `${device.name}/${region.name} overlaps ${o.device.name}/${o.region.name} at port 0x${p.toString(16)}`,
          );
        }
      }
      this.portClaims.push({ device, region });
      const index = this.portClaims.length;
      this.portMap.fill(index, region.start, region.start + region.length);
    } else {
      for (const o of this.mmioClaims) {
        if (region.start < o.region.start + o.region.length && o.region.start < region.start + region.length)
          throw new BusConflictError(
            "BUS_CONFLICT",
            `${device.name}/${region.name} overlaps ${o.device.name}/${o.region.name} at 0x${region.start.toString(16)}`,
          );
      }
      this.mmioClaims.push({ device, region });
      this.mmioClaims.sort((a, b) => a.region.start - b.region.start);
    }
  }

  /** Whether a device on this bus decodes `port`. */
  claimsPort(port: number): boolean {
    return this.portMap[port] !== 0;
  }

  /** Whether a device on this bus decodes guest-physical `gpa`. */
  claimsMmio(gpa: number): boolean {
    return this.findMmio(gpa) !== undefined;
  }

  pioRead(port: number, size: AccessSize): number {
    const index = this.portMap[port]!;
    if (index === 0) {
      this.unclaimedAccesses++;
      return ALL_ONES[size as 1 | 2 | 4];
    }
    const c = this.portClaims[index - 1]!;
    return c.device.read(c.region.name, port - c.region.start, size);
  }

  pioWrite(port: number, size: AccessSize, value: number): void {
    const index = this.portMap[port]!;
    if (index === 0) {
      this.unclaimedAccesses++;
      return;
    }
    const c = this.portClaims[index - 1]!;
    c.device.write(c.region.name, port - c.region.start, size, value);
  }

  private findMmio(gpa: number): Claim | undefined {
    const claims = this.mmioClaims;
    let lo = 0;
    let hi = claims.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      const c = claims[mid]!;
      if (gpa < c.region.start) hi = mid - 1;
      else if (gpa >= c.region.start + c.region.length) lo = mid + 1;
      else return c;
    }
    return undefined;
  }

  /** MMIO read of 1, 2, 4 or 8 bytes into `data` (little-endian); 8-byte accesses are two 4-byte ones. */
  mmioRead(gpa: number, data: Uint8Array): void {
    const c = this.findMmio(gpa);
    const len = data.length;
    if (c === undefined || (len !== 1 && len !== 2 && len !== 4 && len !== 8)) {
      this.unclaimedAccesses++;
      data.fill(0xff);
      return;
    }
    const off = gpa - c.region.start;
    const step = len === 8 ? 4 : len;
    for (let at = 0; at < len; at += step) {
      const v = c.device.read(c.region.name, off + at, step as AccessSize);
      for (let b = 0; b < step; b++) data[at + b] = (v >>> (8 * b)) & 0xff;
    }
  }

  /** MMIO write of 1, 2, 4 or 8 bytes from `data` (little-endian); 8-byte accesses are two 4-byte ones. */
  mmioWrite(gpa: number, data: Uint8Array): void {
    const c = this.findMmio(gpa);
    const len = data.length;
    if (c === undefined || (len !== 1 && len !== 2 && len !== 4 && len !== 8)) {
      this.unclaimedAccesses++;
      return;
    }
    const off = gpa - c.region.start;
    const step = len === 8 ? 4 : len;
    for (let at = 0; at < len; at += step) {
      let v = 0;
      for (let b = step - 1; b >= 0; b--) v = (v << 8) | data[at + b]!;
      c.device.write(c.region.name, off + at, step as AccessSize, v >>> 0);
    }
  }
}
