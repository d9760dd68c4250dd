/**
 * The devices of a VM as plain data (part of VmConfig), and where they sit on
 * PCI bus 0. The plan is computed the same way by the main thread (which tells
 * the vCPU threads which functions to forward), the device thread (which builds
 * the models) and the CLI (which validates before anything starts).
 *
 *   00:00.0  host bridge (platform board, vCPU side)
 *   00:01.0  IDE controller (PIIX3), when any IDE drive or CD-ROM is attached
 *   00:02.0… the other devices, in the order given
 */
import { PartisError } from "../errors.js";
import type { CacheMode } from "../storage/block-device.js";
import type { DiskIoLimits } from "../devices/io-limits.js";

export class DevicePlanError extends PartisError {}

export interface DiskSpec {
  readonly path: string;
  readonly readOnly: boolean;
  /** How the disk uses the host's page cache (absent: writeback). */
  readonly cache?: CacheMode;
  /** The serial number the guest reads (virtio-blk GET_ID, ATA IDENTIFY): 1-20 printable ASCII characters; absent: derived from the drive. */
  readonly serial?: string;
}

/** Where a NIC's frames go on the host. */
export type NicBackendSpec =
  | { readonly kind: "tap"; readonly ifname: string }
  /** AF_UNIX datagram pair: this VM binds `local`, sends to `peer` (two VMs wired back to back). */
  | { readonly kind: "dgram"; readonly local: string; readonly peer: string }
  /** Cable unplugged. */
  | { readonly kind: "none" };

export type DeviceSpec =
  /** ringPacked: offer packed virtqueues (the guest's driver chooses); limits: the disk's IOPS and bandwidth limits. */
  | { readonly kind: "virtio-blk"; readonly id: string; readonly disk: DiskSpec; readonly queues: number; readonly ringPacked?: boolean; readonly limits?: DiskIoLimits }
  | { readonly kind: "ide-disk"; readonly id: string; readonly disk: DiskSpec; readonly limits?: DiskIoLimits }
  | { readonly kind: "ide-cdrom"; readonly id: string; readonly disk: DiskSpec | undefined }
  /**
   * offloads: false turns off a virtio NIC's checksum and segmentation offloads on a TAP (on by default there);
   * queues: receive/transmit queue pairs of a virtio NIC on a multi-queue TAP (default 1); mtu: the MTU a virtio NIC reports.
   */
  | {
      readonly kind: "virtio-net" | "ne2k";
      readonly id: string;
      readonly mac: string;
      readonly backend: NicBackendSpec;
      readonly ringPacked?: boolean;
      readonly offloads?: boolean;
      readonly queues?: number;
      readonly mtu?: number;
      /** Most bytes per second the NIC moves each way (a NE2000: NE2K_MIN_RATE_BYTES_PER_SECOND at least). */
      readonly rateBytesPerSecond?: number;
    }
  /** A host<->guest byte channel: a UNIX stream socket the worker listens on. */
  | { readonly kind: "virtio-console"; readonly id: string; readonly socketPath: string }
  /**
   * Named host<->guest byte channels on one virtio-console function with
   * MULTIPORT (QEMU's virtio-serial): port n is ports[n-1], each on its own
   * UNIX stream socket.
   */
  | { readonly kind: "virtio-serial"; readonly id: string; readonly ports: readonly { readonly name: string; readonly socketPath: string }[] }
  | { readonly kind: "virtio-rng"; readonly id: string }
  /**
   * Stream sockets between the guest (AF_VSOCK, CID `cid`) and host programs:
   * the guest's connections to port P go to the UNIX socket `<socketPath>_P`;
   * host programs connect to `socketPath` and ask with `CONNECT P`.
   */
  | { readonly kind: "virtio-vsock"; readonly id: string; readonly socketPath: string; readonly cid: number };

export interface PlannedFunction {
  /** bus << 8 | device << 3 | function */
  readonly bdf: number;
  readonly kind: "ide" | Exclude<DeviceSpec["kind"], "ide-disk" | "ide-cdrom">;
  /** Index into the device list (for IDE: the first IDE spec). */
  readonly specIndex: number;
}

export const MAX_IDE_DRIVES = 4;

export function planPci(devices: readonly DeviceSpec[]): PlannedFunction[] {
  const out: PlannedFunction[] = [];
  const ide = devices.findIndex((d) => d.kind === "ide-disk" || d.kind === "ide-cdrom");
  const ideCount = devices.filter((d) => d.kind === "ide-disk" || d.kind === "ide-cdrom").length;
  if (ideCount > MAX_IDE_DRIVES) throw new DevicePlanError("TOO_MANY_IDE_DRIVES", `${ideCount} IDE drives requested; the controller has ${MAX_IDE_DRIVES} positions`);
  if (ide >= 0) out.push({ bdf: 1 << 3, kind: "ide", specIndex: ide });
  let slot = 2;
  devices.forEach((d, i) => {
    if (d.kind === "ide-disk" || d.kind === "ide-cdrom") return;
    if (slot > 31) throw new DevicePlanError("TOO_MANY_DEVICES", "more PCI devices than bus 0 has slots (30)");
    out.push({ bdf: slot << 3, kind: d.kind, specIndex: i });
    slot++;
  });
  return out;
}

/** A MAC address "52:54:00:12:34:56" as bytes; throws on a malformed one. */
export function parseMac(mac: string): Uint8Array {
  const m = /^([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2})$/i.exec(mac);
  if (m === null) throw new DevicePlanError("BAD_MAC", `"${mac}" is not a MAC address (expected six hex pairs like 52:54:00:12:34:56)`);
  const bytes = Uint8Array.from(m.slice(1).map((h) => parseInt(h, 16)));
  if ((bytes[0]! & 1) !== 0) throw new DevicePlanError("BAD_MAC", `${mac} is a multicast address; a NIC needs a unicast one`);
  return bytes;
}
