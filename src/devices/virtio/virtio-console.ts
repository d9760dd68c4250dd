/**
 * virtio-console (virtio 1.1 spec 5.3). Two shapes:
 *
 *  - one port (no MULTIPORT), the default: receiveq0 (queue 0, host ->
 *    guest) and transmitq0 (queue 1, guest -> host). Linux binds it to
 *    /dev/hvcN. Its host stream is attached with connect().
 *  - named ports (MULTIPORT, `ports`): what QEMU calls virtio-serial with
 *    virtserialport devices, and Hyper-V a VMBus channel per integration
 *    service. Port n (1..N) is ports[n-1], with its queues at 2n+2 and 2n+3;
 *    the control queues are 2 (device -> driver) and 3 (driver -> device).
 *    Port 0 is kept for a console, as QEMU keeps it, and never announced.
 *    Linux shows a port as /dev/vportNpM with its name in
 *    /sys/class/virtio-ports/vportNpM/name (udev links /dev/virtio-ports/NAME).
 *    Host streams attach per port with connectPort().
 *
 * The control protocol (5.3.6.2), as Linux's virtio_console drives it:
 * the driver sends DEVICE_READY; the device answers DEVICE_ADD for each
 * port; the driver answers PORT_READY per port; the device then sends
 * PORT_NAME and, when a host stream is connected, PORT_OPEN(1) (the guest
 * blocks writes until the host side is open). The driver's PORT_OPEN says
 * whether a guest program has the port open: only then does the port read
 * its host stream (Linux drops bytes that arrive on a closed port). A host
 * stream that comes or goes later is announced with PORT_OPEN(1/0).
 * What the device still has to say is kept as a few bits per port, not a
 * queue of messages, so a driver that sends DEVICE_READY a thousand times
 * or posts no control buffers never makes it grow. A driver's control
 * message that is short, names no port of this device, or is not one a
 * driver sends is counted (`controlBad`) and ignored; a control buffer too
 * small for the message it should carry is returned empty (used length 0)
 * and the message dropped (`controlDropped`): Linux posts page-sized ones.
 *
 * Port I/O (polling, zero-copy readv/writev, the bounded pending output) is
 * console-port.ts.
 *
 * Features: VIRTIO_CONSOLE_F_SIZE when a size is given (cols/rows in the
 * configuration space, resize() updates it with a configuration interrupt),
 * VIRTIO_CONSOLE_F_EMERG_WRITE (a byte written to emerg_wr goes to port 0's
 * stream), VIRTIO_CONSOLE_F_MULTIPORT with named ports.
 *
 * API:
 *   createVirtioConsole(name, services, opts?): VirtioConsoleDevice
 *   device.connect(stream | undefined)              port 0
 *   device.connectPort(port, stream | undefined)    a named port (1..N)
 *   device.console (the back end: counters, resize(), port(n))
 */
import type { SavedDeviceState } from "../dependencies.js";
import { PciDeviceError } from "../pci/pci-config.js";
import type { PciDeviceServices } from "../pci/device-thread-services.js";
import { ConsolePort, type ConsolePortOwner, type HostByteStream, type VirtioConsoleCounters } from "./console-port.js";
import { DescriptorChain } from "./queue.js";
import { VirtioPciDevice, featureBit, type VirtioBackend, type VirtioTransport } from "./pci-transport.js";

export type { HostByteStream, VirtioConsoleCounters } from "./console-port.js";

export const VIRTIO_ID_CONSOLE = 3;
export const VIRTIO_CONSOLE_F = { size: 0, multiport: 1, emergWrite: 2 } as const;
/** Configuration layout (5.3.4). */
export const VIRTIO_CONSOLE_CONFIG = { cols: 0, rows: 2, maxNrPorts: 4, emergWr: 8, size: 12 } as const;
/** Control message events (5.3.6.2). */
export const VIRTIO_CONSOLE_EVENT = { deviceReady: 0, deviceAdd: 1, deviceRemove: 2, portReady: 3, consolePort: 4, resize: 5, portOpen: 6, portName: 7 } as const;
/** The id of a control message about the device, not a port. */
export const VIRTIO_CONSOLE_BAD_ID = 0xffffffff;
/** Most named ports one device has (QEMU's virtio-serial default: 31 besides port 0). */
export const VIRTIO_CONSOLE_MAX_NAMED_PORTS = 31;
/** A port name: what udev may put under /dev/virtio-ports/ (QEMU's guest agent: org.qemu.guest_agent.0). */
export const VIRTIO_CONSOLE_PORT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,126}$/;
/** Bytes of a control message's header: le32 id, le16 event, le16 value. */
const CONTROL_HEADER = 8;

/** What a named port still has to tell the driver, in this order. */
const SAY = { add: 1, name: 2, open: 4 } as const;

export interface VirtioConsoleOptions {
  /** Offer VIRTIO_CONSOLE_F_SIZE with this size. */
  readonly size?: { readonly cols: number; readonly rows: number };
  /** Bytes of guest output kept per port while its stream accepts less (default 64 KiB). */
  readonly pendingBytes?: number;
  /** Queue size (default 128). */
  readonly queueSize?: number;
  /**
   * Named ports (VIRTIO_CONSOLE_PORT_NAME each, distinct, at most
   * VIRTIO_CONSOLE_MAX_NAMED_PORTS): the device offers MULTIPORT and port n
   * is ports[n-1].
   */
  readonly ports?: readonly string[];
}

export interface VirtioConsoleDeviceCounters extends VirtioConsoleCounters {
  /** Control messages from the driver that were short, named no port here, or were not a driver's. */
  controlBad: number;
  /** Control messages that did not fit the driver's buffer. */
  controlDropped: number;
  /** PORT_READY with value 0: the driver could not set a port up. */
  portsFailed: number;
}

/** A named port's control state, as saved. */
interface SavedPort {
  readonly name: string;
  readonly ready: boolean;
  readonly guestOpen: boolean;
  readonly say: number;
}

export interface VirtioConsoleSaved extends SavedDeviceState, VirtioConsoleDeviceCounters {
  readonly kind: "virtio-console";
  readonly version: 2;
  /** MULTIPORT negotiated (named ports only). */
  readonly multiport: boolean;
  readonly ports: readonly SavedPort[];
}

export class VirtioConsole implements VirtioBackend, ConsolePortOwner {
  readonly deviceId = VIRTIO_ID_CONSOLE;
  readonly classCode = 0x078000; // simple communication controller, other
  readonly features: bigint;
  readonly queueMaxSizes: readonly number[];
  readonly configSize = VIRTIO_CONSOLE_CONFIG.size;
  readonly counters: VirtioConsoleDeviceCounters = { rxBytes: 0, txBytes: 0, txDropped: 0, peerClosed: 0, controlBad: 0, controlDropped: 0, portsFailed: 0 };
  /** Why the readv/writev path was given up, if it was. */
  readonly notes: string[] = [];
  hostPath = true;

  private attached: VirtioTransport | undefined;
  /** Port 0, then the named ports 1..N. */
  private readonly ports: ConsolePort[];
  /** Per port: the driver answered PORT_READY(1). */
  private readonly ready: boolean[];
  /** Per port: SAY bits still to send. */
  private readonly say: number[];
  /** MULTIPORT negotiated and the driver running. */
  private multiport = false;
  private readonly controlIn = new DescriptorChain();
  private readonly controlOut = new DescriptorChain();
  private readonly message: Uint8Array;
  private readonly messageView: DataView;
  private readonly config = new Uint8Array(VIRTIO_CONSOLE_CONFIG.size);
  private readonly emerg = new Uint8Array(1);

  constructor(opts: VirtioConsoleOptions = {}) {
    const names = opts.ports ?? [];
    if (names.length > VIRTIO_CONSOLE_MAX_NAMED_PORTS) throw new PciDeviceError("CONSOLE_PORTS", `${names.length} named ports; a console device has at most ${VIRTIO_CONSOLE_MAX_NAMED_PORTS}`);
    names.forEach((n, i) => {
      if (!VIRTIO_CONSOLE_PORT_NAME.test(n)) throw new PciDeviceError("CONSOLE_PORTS", `port name ${JSON.stringify(n)} is not 1-127 letters, digits, '.', '_' or '-' (starting with a letter or digit)`);
      if (names.indexOf(n) !== i) throw new PciDeviceError("CONSOLE_PORTS", `port name ${n} is given twice`);
    });
    const pendingBytes = opts.pendingBytes ?? 64 * 1024;
    const qs = opts.queueSize ?? 128;
    this.ports = [new ConsolePort(0, undefined, 0, 1, pendingBytes, true, this)];
    names.forEach((n, i) => this.ports.push(new ConsolePort(i + 1, n, 2 * (i + 1) + 2, 2 * (i + 1) + 3, pendingBytes, false, this)));
    this.ready = this.ports.map(() => false);
    this.say = this.ports.map(() => 0);
    this.queueMaxSizes = new Array<number>(names.length > 0 ? 2 * this.ports.length + 2 : 2).fill(qs);
    const longestName = names.reduce((m, n) => Math.max(m, n.length), 0);
    this.message = new Uint8Array(CONTROL_HEADER + longestName);
    this.messageView = new DataView(this.message.buffer);
    let f = featureBit(VIRTIO_CONSOLE_F.emergWrite);
    if (opts.size !== undefined) {
      f |= featureBit(VIRTIO_CONSOLE_F.size);
      this.setSize(opts.size.cols, opts.size.rows);
    }
    if (names.length > 0) {
      f |= featureBit(VIRTIO_CONSOLE_F.multiport);
      new DataView(this.config.buffer).setUint32(VIRTIO_CONSOLE_CONFIG.maxNrPorts, this.ports.length, true);
    }
    this.features = f;
  }

  get transport(): VirtioTransport {
    return this.attached!;
  }

  get active(): boolean {
    return this.attached?.active === true;
  }

  private setSize(cols: number, rows: number): void {
    this.config[0] = cols & 0xff;
    this.config[1] = (cols >> 8) & 0xff;
    this.config[2] = rows & 0xff;
    this.config[3] = (rows >> 8) & 0xff;
  }

  /** New terminal size (only with VIRTIO_CONSOLE_F_SIZE): configuration interrupt. */
  resize(cols: number, rows: number): void {
    if ((this.features & featureBit(VIRTIO_CONSOLE_F.size)) === 0n) return;
    this.setSize(cols, rows);
    this.attached?.configChanged();
  }

  /** Port 0 (the console), or a named port 1..N. */
  port(n: number): ConsolePort {
    const p = this.ports[n];
    if (p === undefined) throw new PciDeviceError("CONSOLE_PORTS", `no port ${n} (this device has ports 0-${this.ports.length - 1})`);
    return p;
  }

  /** The named ports' count. */
  get namedPorts(): number {
    return this.ports.length - 1;
  }

  /** Attach port 0's host stream (or detach with undefined). Pending output of the old stream is dropped. */
  connect(stream: HostByteStream | undefined): void {
    this.ports[0]!.connect(stream);
  }

  /** Whether the guest has named port `n` open, as its driver last said. */
  guestOpen(n: number): boolean {
    return n > 0 && this.port(n).guestOpen;
  }

  get connected(): boolean {
    return this.ports[0]!.connected;
  }

  /** Whether port 0 is polling its stream now (false while the guest has no receive buffer). */
  get polling(): boolean {
    return this.ports[0]!.polling;
  }

  /** Bytes of port 0's guest output waiting for the stream. */
  get pendingOutput(): number {
    return this.ports[0]!.pendingOutput;
  }

  attach(transport: VirtioTransport): void {
    this.attached = transport;
  }

  hostUnusable(e: RangeError): void {
    this.hostPath = false;
    this.notes.push(`guest RAM spans refused for vectored I/O (${e.message}); using views`);
  }

  connectionChanged(port: ConsolePort): void {
    if (port.id === 0 || !this.ready[port.id]) return;
    this.say[port.id]! |= SAY.open;
    this.sayControl();
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.config[offset + i]!;
    return v;
  }

  writeConfig(offset: number, _size: 1 | 2 | 4, value: number): void {
    if (offset !== VIRTIO_CONSOLE_CONFIG.emergWr) return;
    if ((this.transport.negotiatedFeatures & featureBit(VIRTIO_CONSOLE_F.emergWrite)) === 0n) return;
    this.emerg[0] = value & 0xff;
    this.ports[0]!.output(this.emerg);
  }

  activate(): void {
    this.multiport = this.namedPorts > 0 && (this.transport.negotiatedFeatures & featureBit(VIRTIO_CONSOLE_F.multiport)) !== 0n;
    this.ports[0]!.serviceStream();
  }

  reset(): void {
    for (const p of this.ports) {
      p.stop();
      if (p.id > 0) p.guestOpen = false;
    }
    this.ready.fill(false);
    this.say.fill(0);
    this.multiport = false;
  }

  queueNotified(index: number): void {
    if (index < 2) {
      const p = this.ports[0]!;
      if (index === 0) p.serviceStream();
      else p.transmit();
      return;
    }
    if (!this.multiport) return;
    if (index === 2) this.sayControl();
    else if (index === 3) this.hearControl();
    else {
      const p = this.ports[(index - 2) >> 1];
      if (p === undefined) return;
      if ((index & 1) === 0) p.serviceStream();
      else p.transmit();
    }
  }

  /** The driver's control messages (control transmitq, queue 3). */
  private hearControl(): void {
    const t = this.transport;
    const q = t.queues[3]!;
    const c = this.controlOut;
    const m = this.message;
    do {
      q.disableNotifications();
      while (q.pop(c)) {
        if (c.readableBytes < CONTROL_HEADER) this.counters.controlBad++;
        else {
          c.readFrom(0, m, 0, CONTROL_HEADER);
          const v = this.messageView;
          this.controlMessage(v.getUint32(0, true), v.getUint16(4, true), v.getUint16(6, true));
        }
        q.pushUsed(c.head, 0);
      }
    } while (!q.enableNotifications());
    t.signalUsed(3);
    this.sayControl();
  }

  private controlMessage(id: number, event: number, value: number): void {
    const E = VIRTIO_CONSOLE_EVENT;
    if (event === E.deviceReady) {
      // Linux sends it with id VIRTIO_CONSOLE_BAD_ID; the id is not looked at (nor by QEMU).
      // value 0: the driver failed to set the device up; nothing is announced then.
      if (value === 1) for (let n = 1; n < this.ports.length; n++) this.say[n]! |= SAY.add;
      return;
    }
    const port = id >= 1 && id < this.ports.length ? this.ports[id] : undefined;
    if (port === undefined || (event !== E.portReady && event !== E.portOpen)) {
      this.counters.controlBad++;
      return;
    }
    if (event === E.portReady) {
      if (value !== 1) {
        this.counters.portsFailed++;
        this.ready[id] = false;
        this.say[id] = 0; // nothing more about a port the driver could not add
        return;
      }
      this.ready[id] = true;
      this.say[id]! |= SAY.name | (port.connected ? SAY.open : 0);
      return;
    }
    // PORT_OPEN: a guest program opened (1) or closed (0) the port.
    port.guestOpen = value !== 0;
    if (port.guestOpen) port.serviceStream();
    else port.stop();
  }

  /** Send what the ports still have to say into the driver's control buffers (control receiveq, queue 2). */
  private sayControl(): void {
    if (!this.multiport) return;
    const t = this.transport;
    const q = t.queues[2]!;
    if (!t.active || !q.ready) return;
    const c = this.controlIn;
    const E = VIRTIO_CONSOLE_EVENT;
    let n = 1;
    outer: while (n < this.ports.length) {
      const bits = this.say[n]!;
      if (bits === 0) {
        n++;
        continue;
      }
      while (!q.pop(c)) if (q.enableNotifications()) break outer;
      const bit = bits & -bits;
      this.say[n] = bits & ~bit;
      const port = this.ports[n]!;
      let length = CONTROL_HEADER;
      if (bit === SAY.add) this.header(n, E.deviceAdd, 0);
      else if (bit === SAY.open) this.header(n, E.portOpen, port.connected ? 1 : 0);
      else {
        this.header(n, E.portName, 1);
        const name = port.name!;
        for (let i = 0; i < name.length; i++) this.message[CONTROL_HEADER + i] = name.charCodeAt(i);
        length += name.length;
      }
      if (c.writableBytes < length) {
        this.counters.controlDropped++;
        q.pushUsed(c.head, 0);
      } else {
        c.writeTo(0, this.message, 0, length);
        q.pushUsed(c.head, length);
      }
    }
    t.signalUsed(2);
  }

  private header(id: number, event: number, value: number): void {
    const v = this.messageView;
    v.setUint32(0, id, true);
    v.setUint16(4, event, true);
    v.setUint16(6, value, true);
  }

  save(): VirtioConsoleSaved {
    return {
      kind: "virtio-console",
      version: 2,
      ...this.counters,
      multiport: this.multiport,
      ports: this.ports.slice(1).map((p) => ({ name: p.name!, ready: this.ready[p.id]!, guestOpen: p.guestOpen, say: this.say[p.id]! })),
    };
  }

  /**
   * After the transport restored the queues, before it activates the device
   * (when the driver was running): which named ports the guest knows, has
   * open, and what it has still to be told. Each known port is told again
   * whether its host side is connected (a restored VM's streams are new).
   * Counters start again from zero. A v1 state (a console of one port,
   * before named ports) restores nothing. A state of another shape (another version, other port names, fields of
   * the wrong type): PciDeviceError, before anything changed.
   */
  restore(s: SavedDeviceState): void {
    const v = s as Partial<VirtioConsoleSaved>;
    const bad = (why: string): PciDeviceError => new PciDeviceError("VIRTIO_CONSOLE_RESTORE", `saved virtio-console state: ${why}`);
    // v1 (before named ports) held counters only: nothing to restore for a console without named ports.
    if (v.kind === "virtio-console" && (v.version as number) === 1 && this.namedPorts === 0) return;
    if (v.kind !== "virtio-console" || v.version !== 2) throw bad(`${String(v.kind)} v${String(v.version)} is not virtio-console v2`);
    if (typeof v.multiport !== "boolean" || !Array.isArray(v.ports)) throw bad("no multiport flag or port list");
    const names = this.ports.slice(1).map((p) => p.name);
    if (v.ports.length !== names.length || v.ports.some((p, i) => typeof p !== "object" || p === null || p.name !== names[i])) throw bad(`its ports are not this device's (${names.join(", ") || "none"})`);
    for (const p of v.ports) {
      if (typeof p.ready !== "boolean" || typeof p.guestOpen !== "boolean" || !Number.isInteger(p.say) || p.say < 0 || p.say > 7) throw bad(`port ${p.name}: ready/guestOpen/say of the wrong type`);
    }
    if (v.multiport && names.length === 0) throw bad("MULTIPORT on a device without named ports");
    v.ports.forEach((p, i) => {
      const n = i + 1;
      this.ready[n] = p.ready;
      this.ports[n]!.guestOpen = p.guestOpen;
      this.say[n] = p.say | (p.ready ? SAY.open : 0);
    });
    this.multiport = v.multiport;
  }
}

/** The virtio-console PCI function, with the host stream attach point. */
export class VirtioConsoleDevice extends VirtioPciDevice {
  readonly console: VirtioConsole;
  constructor(name: string, services: PciDeviceServices, opts: VirtioConsoleOptions = {}) {
    const backend = new VirtioConsole(opts);
    super(name, backend, services);
    this.console = backend;
  }
  /** Attach (or with undefined detach) port 0's host side. */
  connect(stream: HostByteStream | undefined): void {
    this.console.connect(stream);
  }
  /** Attach (or with undefined detach) a named port's host side (1..N). */
  connectPort(port: number, stream: HostByteStream | undefined): void {
    if (port < 1) throw new PciDeviceError("CONSOLE_PORTS", `port ${port} is not a named port (1-${this.console.namedPorts})`);
    this.console.port(port).connect(stream);
  }
}

export function createVirtioConsole(name: string, services: PciDeviceServices, opts: VirtioConsoleOptions = {}): VirtioConsoleDevice {
  return new VirtioConsoleDevice(name, services, opts);
}
