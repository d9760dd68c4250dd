/**
 * The receive filter a NIC's driver programs (virtio-net's control queue,
 * virtio 1.2 spec 5.1.6.5.1-5.1.6.5.3): which received Ethernet frames the
 * guest gets.
 *
 *  - promiscuous: every frame (the state after reset, as a NIC whose driver
 *    has said nothing yet; Linux sets its real mode as it opens the interface);
 *  - broadcast: unless `noBroadcast`;
 *  - multicast: none with `noMulticast`, all with `allMulticast` (or a table
 *    that overflowed), else those in the multicast table;
 *  - unicast: none with `noUnicast`, all with `allUnicast` (or an overflowed
 *    table), else the device's own address and those in the unicast table;
 *  - with VLAN filtering on (VIRTIO_NET_F_CTRL_VLAN negotiated), an 802.1Q
 *    tagged frame only when its VLAN id is in the VLAN table (empty after
 *    reset; untagged frames are not affected).
 *
 * Tables hold up to MAC_TABLE_ENTRIES addresses each; a driver that sets more
 * gets that kind of traffic unfiltered (the spec's footnote allows it: the
 * filter is best effort, never stricter than asked).
 *
 * `accepts` runs once per received frame: no allocation, no views.
 */
import { PciDeviceError } from "../pci/pci-config.js";

/** Addresses each of the unicast and the multicast table holds before it overflows to "all". */
export const MAC_TABLE_ENTRIES = 64;
const VLAN_IDS = 4096;
const TPID_8021Q = 0x8100;

export interface ReceiveFilterState {
  readonly promiscuous: boolean;
  readonly allMulticast: boolean;
  readonly allUnicast: boolean;
  readonly noMulticast: boolean;
  readonly noUnicast: boolean;
  readonly noBroadcast: boolean;
  readonly mac: number[];
  /** Addresses, 6 bytes each; undefined: overflowed (all of that kind pass). */
  readonly unicast: number[] | undefined;
  readonly multicast: number[] | undefined;
  readonly vlanFiltering: boolean;
  readonly vlans: number[];
}

/** The on/off modes a driver switches (VIRTIO_NET_CTRL_RX_* 0..5, in that order). */
export type ReceiveMode = "promiscuous" | "allMulticast" | "allUnicast" | "noMulticast" | "noUnicast" | "noBroadcast";
export const RECEIVE_MODES: readonly ReceiveMode[] = ["promiscuous", "allMulticast", "allUnicast", "noMulticast", "noUnicast", "noBroadcast"];

export class ReceiveFilter {
  promiscuous = true;
  allMulticast = false;
  allUnicast = false;
  noMulticast = false;
  noUnicast = false;
  noBroadcast = false;
  /** Tagged frames are checked against the VLAN table. */
  vlanFiltering = false;
  /** The address the device answers to (the driver may change it). */
  readonly mac = new Uint8Array(6);
  private readonly unicast = new Uint8Array(6 * MAC_TABLE_ENTRIES);
  private unicastCount = 0;
  private unicastOverflow = false;
  private readonly multicast = new Uint8Array(6 * MAC_TABLE_ENTRIES);
  private multicastCount = 0;
  private multicastOverflow = false;
  private readonly vlans = new Uint32Array(VLAN_IDS / 32);

  constructor(mac: Uint8Array) {
    this.reset(mac);
  }

  /** The state after a device reset: promiscuous, tables empty, address `mac`. */
  reset(mac: Uint8Array): void {
    this.promiscuous = true;
    this.allMulticast = this.allUnicast = this.noMulticast = this.noUnicast = this.noBroadcast = false;
    this.vlanFiltering = false;
    this.mac.set(mac.subarray(0, 6));
    this.unicastCount = this.multicastCount = 0;
    this.unicastOverflow = this.multicastOverflow = false;
    this.vlans.fill(0);
  }

  setMode(mode: ReceiveMode, on: boolean): void {
    this[mode] = on;
  }

  /**
   * Replace one table with `count` addresses (6 bytes each, from `addresses`).
   * More than MAC_TABLE_ENTRIES: the table overflows and all frames of that
   * kind pass (`addresses` is not read).
   */
  setTable(kind: "unicast" | "multicast", addresses: Uint8Array, count: number): void {
    const overflow = count > MAC_TABLE_ENTRIES;
    const n = overflow ? 0 : count;
    if (n * 6 > addresses.length) throw new PciDeviceError("NET_FILTER_TABLE_SHORT", `${count} ${kind} addresses need ${count * 6} bytes, ${addresses.length} given`);
    if (kind === "unicast") {
      this.unicast.set(addresses.subarray(0, n * 6));
      this.unicastCount = n;
      this.unicastOverflow = overflow;
    } else {
      this.multicast.set(addresses.subarray(0, n * 6));
      this.multicastCount = n;
      this.multicastOverflow = overflow;
    }
  }

  /** Add or remove VLAN id `vid` (0-4095) of the VLAN table. False for an id out of range. */
  setVlan(vid: number, member: boolean): boolean {
    if (!Number.isInteger(vid) || vid < 0 || vid >= VLAN_IDS) return false;
    const bit = 1 << (vid & 31);
    if (member) this.vlans[vid >>> 5] = this.vlans[vid >>> 5]! | bit;
    else this.vlans[vid >>> 5] = this.vlans[vid >>> 5]! & ~bit;
    return true;
  }

  hasVlan(vid: number): boolean {
    return vid >= 0 && vid < VLAN_IDS && (this.vlans[vid >>> 5]! & (1 << (vid & 31))) !== 0;
  }

  /** Whether the Ethernet frame at b[at..at+length) passes. */
  accepts(b: Uint8Array, at: number, length: number): boolean {
    if (this.promiscuous) return true;
    if (length < 14) return false;
    if (this.vlanFiltering && length >= 18 && ((b[at + 12]! << 8) | b[at + 13]!) === TPID_8021Q) {
      if (!this.hasVlan(((b[at + 14]! & 0x0f) << 8) | b[at + 15]!)) return false;
    }
    if ((b[at]! & 1) !== 0) {
      if ((b[at]! & b[at + 1]! & b[at + 2]! & b[at + 3]! & b[at + 4]! & b[at + 5]!) === 0xff) return !this.noBroadcast;
      if (this.noMulticast) return false;
      if (this.allMulticast || this.multicastOverflow) return true;
      return inTable(this.multicast, this.multicastCount, b, at);
    }
    if (this.noUnicast) return false;
    if (this.allUnicast || this.unicastOverflow) return true;
    return sameAddress(this.mac, 0, b, at) || inTable(this.unicast, this.unicastCount, b, at);
  }

  save(): ReceiveFilterState {
    const vlans: number[] = [];
    for (let v = 0; v < VLAN_IDS; v++) if (this.hasVlan(v)) vlans.push(v);
    return {
      promiscuous: this.promiscuous,
      allMulticast: this.allMulticast,
      allUnicast: this.allUnicast,
      noMulticast: this.noMulticast,
      noUnicast: this.noUnicast,
      noBroadcast: this.noBroadcast,
      mac: Array.from(this.mac),
      unicast: this.unicastOverflow ? undefined : Array.from(this.unicast.subarray(0, this.unicastCount * 6)),
      multicast: this.multicastOverflow ? undefined : Array.from(this.multicast.subarray(0, this.multicastCount * 6)),
      vlanFiltering: this.vlanFiltering,
      vlans,
    };
  }

  /** Re-establish a saved filter (one of the wrong shape: PciDeviceError, nothing changed). */
  restore(s: ReceiveFilterState): void {
    checkReceiveFilterState(s);
    this.reset(Uint8Array.from(s.mac));
    for (const m of RECEIVE_MODES) this[m] = s[m] === true;
    this.vlanFiltering = s.vlanFiltering === true;
    const table = (t: number[] | undefined): [Uint8Array, number] => (t === undefined ? [new Uint8Array(0), MAC_TABLE_ENTRIES + 1] : [Uint8Array.from(t), t.length / 6]);
    this.setTable("unicast", ...table(s.unicast));
    this.setTable("multicast", ...table(s.multicast));
    for (const v of s.vlans) this.setVlan(v, true);
  }
}

/** Whether `v` is an array of `min`..`max` whole numbers 0-255. */
export function isByteArray(v: unknown, min: number, max: number): v is number[] {
  return Array.isArray(v) && v.length >= min && v.length <= max && v.every((b) => Number.isInteger(b) && b >= 0 && b <= 255);
}

/** A saved filter as restore() takes it: PciDeviceError for anything else (a corrupt or hostile saved state). */
export function checkReceiveFilterState(s: unknown): asserts s is ReceiveFilterState {
  const bad = (why: string): PciDeviceError => new PciDeviceError("NET_FILTER_RESTORE", `saved receive filter: ${why}`);
  if (typeof s !== "object" || s === null) throw bad("not an object");
  const f = s as Partial<Record<keyof ReceiveFilterState, unknown>>;
  if (!isByteArray(f.mac, 6, 6)) throw bad("the MAC address is not 6 bytes");
  for (const key of ["unicast", "multicast"] as const) {
    const t = f[key];
    if (t !== undefined && (!isByteArray(t, 0, 6 * MAC_TABLE_ENTRIES) || t.length % 6 !== 0)) throw bad(`the ${key} table is not whole addresses, at most ${MAC_TABLE_ENTRIES}`);
  }
  for (const key of [...RECEIVE_MODES, "vlanFiltering"] as const) if (f[key] !== undefined && typeof f[key] !== "boolean") throw bad(`${key} is not a boolean`);
  const vlans = f.vlans;
  if (!Array.isArray(vlans) || vlans.length > VLAN_IDS || !vlans.every((v) => Number.isInteger(v) && v >= 0 && v < VLAN_IDS)) throw bad("the VLAN ids are not a list of ids 0-4095");
}

function sameAddress(a: Uint8Array, ai: number, b: Uint8Array, bi: number): boolean {
  return a[ai] === b[bi] && a[ai + 1] === b[bi + 1] && a[ai + 2] === b[bi + 2] && a[ai + 3] === b[bi + 3] && a[ai + 4] === b[bi + 4] && a[ai + 5] === b[bi + 5];
}

function inTable(table: Uint8Array, count: number, b: Uint8Array, at: number): boolean {
  for (let i = 0; i < count; i++) if (sameAddress(table, i * 6, b, at)) return true;
  return false;
}
