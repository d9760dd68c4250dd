/**
 * Builds the device models of a VM from its device list, on the device thread:
 * opens the back ends (disk images, network ports, console sockets) and hands
 * each model its services. The resolver from configuration to a live device,
 * in one place.
 *
 * IDE positions: disks take primary master, primary slave, then the secondary
 * channel; CD-ROMs prefer the secondary master (where installers look first).
 */
import type { IrqLine } from "../devices/dependencies.js";
import type { PciDevice } from "../devices/pci/pci-config.js";
import type { PciDeviceServices } from "../devices/pci/device-thread-services.js";
import { openDisk } from "../storage/open.js";
import { cacheOpenOptions, type BlockDevice } from "../storage/block-device.js";
import { createVirtioBlk, type VirtioBlk } from "../devices/virtio/virtio-blk.js";
import { createVirtioRng } from "../devices/virtio/virtio-rng.js";
import { HostEntropy } from "../hypervisor/host-entropy.js";
import { IoUring } from "../hypervisor/io-uring.js";
import { createVirtioConsole, type HostByteStream } from "../devices/virtio/virtio-console.js";
import { createVirtioVsock, type VirtioVsockDevice } from "../devices/virtio/virtio-vsock.js";
import { VsockHostSockets } from "./vsock-host.js";
import { createVirtioNet } from "../devices/net/virtio-net.js";
import { Ne2kPci } from "../devices/net/ne2k-pci.js";
import { DatagramPairPort, TapPort, type NetworkPort } from "../devices/net/network-port.js";
import { PiixIde, type IdeDriveConfig } from "../devices/emulated/ide/piix-ide.js";
import { acceptStream, closeDescriptor, listenStream, readFrame, receiveStreamHost, removeSocketPath, sendStream, sendStreamHost } from "../hypervisor/host-network.js";
import { DevicePlanError, parseMac, type DeviceSpec, type DiskSpec, type NicBackendSpec, type PlannedFunction } from "./device-plan.js";

export interface AssembledDevice {
  readonly device: PciDevice;
  /** Release back ends (close files, sockets). */
  close(): void;
  /** Counters for PARTIS_STATS (requests, bytes, time in the back end). */
  stats?(): Readonly<Record<string, number>>;
}

export interface AssemblyContext {
  readonly vmName: string;
  readonly vcpus: number;
  /** An ISA interrupt line (IDE compatibility mode: 14 and 15). */
  isaIrq(irq: number): IrqLine;
  /** Tell the user something once (a back end runs degraded). */
  warn?(message: string): void;
}

/** Requests a virtio-blk disk may have in flight on its io_uring (more wait in the virtqueue or run synchronously). */
const DISK_RING_ENTRIES = 128;

/**
 * A disk's io_uring, or undefined (requests then run synchronously on the
 * device thread) where the host refuses one (no io_uring, a seccomp policy,
 * kernel.io_uring_disabled) or PARTIS_BLOCK_IO=sync asks for that.
 */
function openRing(id: string, warn: ((message: string) => void) | undefined): IoUring | undefined {
  if (process.env["PARTIS_BLOCK_IO"] === "sync") return undefined;
  try {
    return IoUring.open(DISK_RING_ENTRIES);
  } catch (e) {
    warn?.(`${id}: no io_uring here (${(e as Error).message}); disk requests run synchronously on the device thread`);
    return undefined;
  }
}

/** Whether a drive's writes are stable when they complete (its cache mode opens it O_DSYNC): no volatile write cache to show the guest. */
function writesStable(spec: DiskSpec): boolean {
  return cacheOpenOptions(spec.cache ?? "writeback").writeThrough === true;
}

/** A drive's disk, opened with its cache mode; what runs other than asked (O_DIRECT refused, say) is told once. */
function open(spec: DiskSpec, id: string, warn: ((message: string) => void) | undefined): BlockDevice {
  try {
    const disk = openDisk(spec.path, { readOnly: spec.readOnly, ...cacheOpenOptions(spec.cache ?? "writeback") });
    for (const note of disk.notes ?? []) warn?.(`${id} (${spec.path}): ${note}`);
    return disk;
  } catch (e) {
    throw new DevicePlanError("DISK_OPEN_FAILED", `${id}: ${(e as Error).message}`, { device: id, path: spec.path });
  }
}

/**
 * A NIC's ports: one, or one per queue of a multi-queue TAP (`queues` > 1),
 * or none. `vnetHeader`: the NIC is virtio-net, so a TAP carries the
 * virtio-net header (checksum and segmentation offloads).
 */
function openPorts(backend: NicBackendSpec, id: string, vnetHeader: boolean, queues: number): NetworkPort[] {
  try {
    if (backend.kind === "tap") return TapPort.openQueues(backend.ifname, queues, { vnetHeader });
    if (backend.kind === "dgram") return [DatagramPairPort.open(backend.local, backend.peer)];
    return [];
  } catch (e) {
    throw new DevicePlanError("NIC_OPEN_FAILED", `${id}: ${(e as Error).message}`, { device: id });
  }
}

/**
 * The host end of a console channel: a UNIX stream socket; the newest client
 * wins. A client that hangs up is closed once the device has seen it go, on
 * a read (end of stream) or on a write (EPIPE: the device does not read a
 * port the guest has closed), by a task deferred on the device thread's loop
 * (that loop is synchronous, so a microtask would wait until the thread ends).
 */
export class ChannelSocket {
  private readonly listenFd: number;
  private client: number | undefined;
  private readonly listenWatch: { close(): void };
  private readonly loop: PciDeviceServices["loop"];

  constructor(private readonly path: string, private readonly device: { connect(s: HostByteStream | undefined): void }, services: Pick<PciDeviceServices, "loop">) {
    this.loop = services.loop;
    this.listenFd = listenStream(path);
    this.listenWatch = this.loop.watch(this.listenFd, () => this.accept());
  }

  /** The connected client's descriptor, if any. */
  get clientFd(): number | undefined {
    return this.client;
  }

  private accept(): void {
    for (;;) {
      const fd = acceptStream(this.listenFd);
      if (fd === undefined) return;
      this.dropClient();
      this.client = fd;
      // Peer closed: forget it once the device has seen the -1.
      const gone = (): number => {
        this.loop.defer(() => {
          if (this.client === fd) this.dropClient();
        });
        return -1;
      };
      // read() results: > 0 bytes, -1 nothing pending (0 for the device), 0 the peer closed (-1 for the device).
      const received = (n: number): number => (n > 0 ? n : n < 0 ? 0 : gone());
      const stream: HostByteStream = {
        fd,
        read: (buf) => {
          try {
            return received(readFrame(fd, buf));
          } catch {
            return received(0); // ECONNRESET and the like: treat as closed
          }
        },
        readHost: (addresses, lengths, count) => {
          try {
            return received(receiveStreamHost(fd, addresses, lengths, count));
          } catch (e) {
            if (e instanceof RangeError) throw e; // not the peer's doing: the device falls back to views
            return received(0);
          }
        },
        write: (bytes) => {
          try {
            const n = sendStream(fd, bytes, bytes.length);
            return n < 0 ? 0 : n;
          } catch {
            return gone(); // EPIPE, ECONNRESET: a client that hung up while the device was not reading
          }
        },
        writeHost: (addresses, lengths, count) => {
          try {
            const n = sendStreamHost(fd, addresses, lengths, count);
            return n < 0 ? 0 : n;
          } catch (e) {
            if (e instanceof RangeError) throw e;
            return gone();
          }
        },
      };
      this.device.connect(stream);
    }
  }

  private dropClient(): void {
    if (this.client === undefined) return;
    this.device.connect(undefined);
    closeDescriptor(this.client);
    this.client = undefined;
  }

  close(): void {
    this.dropClient();
    this.listenWatch.close();
    closeDescriptor(this.listenFd);
    try {
      removeSocketPath(this.path);
    } catch {
      /* already gone */
    }
  }
}

export function assembleDevice(f: PlannedFunction, devices: readonly DeviceSpec[], services: PciDeviceServices, ctx: AssemblyContext): AssembledDevice {
  const spec = devices[f.specIndex]!;
  switch (spec.kind) {
    case "ide-disk":
    case "ide-cdrom": {
      const ide = devices.filter((d): d is Extract<DeviceSpec, { kind: "ide-disk" | "ide-cdrom" }> => d.kind === "ide-disk" || d.kind === "ide-cdrom");
      const free: [0 | 1, 0 | 1][] = [[0, 0], [0, 1], [1, 0], [1, 1]];
      const take = (prefer: [0 | 1, 0 | 1]): [0 | 1, 0 | 1] => {
        const i = free.findIndex((p) => p[0] === prefer[0] && p[1] === prefer[1]);
        return free.splice(i >= 0 ? i : 0, 1)[0]!;
      };
      const opened: BlockDevice[] = [];
      const drives: IdeDriveConfig[] = [];
      let ring: IoUring | undefined;
      let controller: PiixIde | undefined;
      try {
        // CD-ROMs first claim the secondary master; disks then fill from the primary master.
        for (const d of ide.filter((x) => x.kind === "ide-cdrom")) {
          const [channel, unit] = take([1, 0]);
          const dev = d.disk === undefined ? undefined : open(d.disk, d.id, ctx.warn);
          if (dev !== undefined) opened.push(dev);
          drives.push({ channel, unit, kind: "cdrom", device: dev });
        }
        for (const d of ide.filter((x) => x.kind === "ide-disk")) {
          const [channel, unit] = take(free[0]!);
          const dev = open(d.disk, d.id, ctx.warn);
          opened.push(dev);
          drives.push({ channel, unit, kind: "disk", device: dev, writeThrough: writesStable(d.disk), ...(d.disk.serial !== undefined ? { serial: d.disk.serial } : {}), ...(d.limits !== undefined ? { limits: d.limits } : {}) });
        }
        // One ring for the controller (each channel has one transfer at a time) when any disk can queue.
        ring = drives.some((d) => d.kind === "disk" && d.device?.queueHost !== undefined) ? openRing("ide0", ctx.warn) : undefined;
        const device = (controller = new PiixIde("ide0", services, { primaryIrq: ctx.isaIrq(14), secondaryIrq: ctx.isaIrq(15), drives, ...(ring !== undefined ? { ring } : {}) }));
        const watch = ring === undefined ? undefined : services.loop.watch(ring.eventFd, () => device.completeQueued());
        return {
          device,
          close: () => {
            if (ring !== undefined) device.quiesce();
            device.close();
            watch?.close();
            ring?.close();
            opened.forEach((d) => d.close());
          },
          stats: () => ({ ...device.dmaStats(), throttled: device.throttled }),
        };
      } catch (e) {
        controller?.close(); // its rate-limit alarms' timers
        ring?.close();
        opened.forEach((d) => d.close());
        throw e;
      }
    }
    case "virtio-blk": {
      const disk = open(spec.disk, spec.id, ctx.warn);
      let ring: IoUring | undefined;
      let blk: VirtioBlk | undefined;
      try {
        ring = disk.queueHost !== undefined ? openRing(spec.id, ctx.warn) : undefined;
        const device = createVirtioBlk(spec.id, disk, services, { queues: Math.max(1, Math.min(spec.queues, 16)), serial: spec.disk.serial ?? spec.id, ringPacked: spec.ringPacked === true, writeThrough: writesStable(spec.disk), ...(ring !== undefined ? { ring } : {}), ...(spec.limits !== undefined ? { limits: spec.limits } : {}) });
        const backend = (blk = device.backend as VirtioBlk);
        const watch = ring === undefined ? undefined : services.loop.watch(ring.eventFd, () => backend.completeQueued());
        return {
          device,
          close: () => {
            backend.closeQueue();
            watch?.close();
            ring?.close();
            disk.close();
          },
          stats: () => ({ ...backend.stats, queuedNow: backend.queued, heldNow: backend.heldRequests }),
        };
      } catch (e) {
        blk?.closeQueue(); // its rate-limit alarm's timer
        ring?.close();
        disk.close();
        throw e;
      }
    }
    case "virtio-rng":
      const entropy = HostEntropy.open();
      return { device: createVirtioRng(spec.id, services, { entropy }), close: () => entropy.close() };
    case "virtio-console": {
      const device = createVirtioConsole(spec.id, services);
      const channel = new ChannelSocket(spec.socketPath, device, services);
      return { device, close: () => channel.close(), stats: () => ({ ...device.console.counters }) };
    }
    case "virtio-serial": {
      const device = createVirtioConsole(spec.id, services, { ports: spec.ports.map((p) => p.name) });
      const sockets: ChannelSocket[] = [];
      const close = (): void => {
        for (const s of sockets) s.close();
      };
      try {
        spec.ports.forEach((p, i) => sockets.push(new ChannelSocket(p.socketPath, { connect: (s) => device.connectPort(i + 1, s) }, services)));
      } catch (e) {
        close();
        throw e;
      }
      return {
        device,
        close,
        stats: () => ({ ...device.console.counters, guestOpen: spec.ports.filter((_, i) => device.console.guestOpen(i + 1)).length }),
      };
    }
    case "virtio-vsock": {
      const host = new VsockHostSockets(spec.socketPath, services);
      let device: VirtioVsockDevice;
      try {
        device = createVirtioVsock(spec.id, host, services, { guestCid: spec.cid });
      } catch (e) {
        host.close();
        throw e;
      }
      host.attach(device.vsock);
      return {
        device,
        close: () => {
          device.vsock.close();
          host.close();
        },
        stats: () => ({ ...device.vsock.counters, open: device.vsock.connections, badHostRequests: host.badRequests, refusedHostPrograms: host.refusedPrograms, hostLineTimeouts: host.lineTimeouts, draining: device.vsock.drainingConnections }),
      };
    }
    case "virtio-net":
    case "ne2k": {
      const ports = openPorts(spec.backend, spec.id, spec.kind === "virtio-net" && spec.offloads !== false, spec.queues ?? 1);
      const closePorts = (): void => {
        for (const p of ports) p.close();
      };
      const mac = parseMac(spec.mac);
      try {
        if (spec.kind === "virtio-net") {
          const device = createVirtioNet(spec.id, ports, services, {
            mac,
            ringPacked: spec.ringPacked === true,
            ...(spec.mtu !== undefined ? { mtu: spec.mtu } : {}),
            ...(spec.rateBytesPerSecond !== undefined ? { rateBytesPerSecond: spec.rateBytesPerSecond } : {}),
          });
          return {
            device,
            close: () => {
              device.net.close();
              closePorts();
            },
          };
        }
        const device = new Ne2kPci(spec.id, services, ports[0], { mac, ...(spec.rateBytesPerSecond !== undefined ? { rateBytesPerSecond: spec.rateBytesPerSecond } : {}) });
        return {
          device,
          close: () => {
            device.close();
            closePorts();
          },
          stats: () => ({ ...device.stats }),
        };
      } catch (e) {
        closePorts();
        throw e;
      }
    }
  }
}
