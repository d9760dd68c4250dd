/**
 * virtio-console (virtio 1.1 spec 5.3), one port, no MULTIPORT: receiveq0
 * (queue 0, host -> guest) and transmitq0 (queue 1, guest -> host). Linux
 * binds it to /dev/hvc0. The host side is an injected byte stream.
 *
 * Host -> guest: the device polls stream.fd (services.loop.watch) and reads
 * the stream straight into the guest's receive buffers. When the guest has no
 * buffer the device stops polling (the bytes stay in the stream: nothing is
 * lost) and asks for a notification; when the guest adds buffers it reads on.
 * A read of -1 (peer closed) disconnects the stream.
 *
 * Streams that offer readHost/writeHost (the worker's channel socket) move
 * bytes between the socket and guest RAM with one readv/writev per chain: no
 * view and no copy in Partis. Others get a view per segment.
 *
 * Guest -> host: transmit buffers go to stream.write(); a short write keeps
 * the rest in a bounded pending buffer (retried at the next device event)
 * so the guest's chain completes at once (Linux's hvc path spins until its
 * buffer is used). With no stream connected, or when the pending buffer is
 * full, bytes are dropped and counted.
 *
 * Features: VIRTIO_CONSOLE_F_SIZE when a size is given (cols/rows in the
 * configuration space, resize() updates it with a configuration interrupt),
 * VIRTIO_CONSOLE_F_EMERG_WRITE (a byte written to emerg_wr goes to the stream).
 *
 * API:
 *   export interface HostByteStream { fd; read(buf): number; write(bytes): number; readHost?; writeHost? }
 *   createVirtioConsole(name, services, opts?): VirtioConsoleDevice
 *   device.connect(stream | undefined); device.console (the back end: counters, resize())
 */
import type { SavedDeviceState } from "../dependencies.js";
import type { FdWatch, PciDeviceServices } from "../pci/device-thread-services.js";
import { ChainSpans, DescriptorChain } from "./queue.js";
import { VirtioPciDevice, featureBit, type VirtioBackend, type VirtioTransport } from "./pci-transport.js";

export const VIRTIO_ID_CONSOLE = 3;
export const VIRTIO_CONSOLE_F = { size: 0, multiport: 1, emergWrite: 2 } as const;
/** Configuration layout (5.3.4). */
export const VIRTIO_CONSOLE_CONFIG = { cols: 0, rows: 2, maxNrPorts: 4, emergWr: 8, size: 12 } as const;

/** The host end of the console (a pty, a socket, a pipe pair). */
export interface HostByteStream {
  /** Polled for readability (POLLIN / POLLHUP). */
  readonly fd: number;
  /** Bytes read into buf; 0 = nothing now; -1 = peer closed. Never blocks. */
  read(buf: Uint8Array): number;
  /** Bytes accepted (may be short, 0 when full). Never blocks. */
  write(bytes: Uint8Array): number;
  /**
   * Optional: as `read`, into `count` spans of host memory (guest RAM, from
   * GuestMemory.hostAddresses) with one readv: no view, no copy in Partis.
   */
  readHost?(addresses: Float64Array, lengths: Uint32Array, count: number): number;
  /** Optional: as `write`, from `count` spans of host memory with one writev. */
  writeHost?(addresses: Float64Array, lengths: Uint32Array, count: number): number;
}

/**
 * Most guest-RAM spans one readv/writev takes (Linux's hvc buffers are one
 * page each). A longer receive chain is filled in its first HOST_SPANS spans;
 * a longer transmit chain goes segment by segment.
 */
const HOST_SPANS = 64;

export interface VirtioConsoleOptions {
  /** Offer VIRTIO_CONSOLE_F_SIZE with this size. */
  readonly size?: { readonly cols: number; readonly rows: number };
  /** Bytes of guest output kept while the stream accepts less (default 64 KiB). */
  readonly pendingBytes?: number;
  /** Queue size (default 128). */
  readonly queueSize?: number;
}

export interface VirtioConsoleCounters {
  rxBytes: number;
  txBytes: number;
  /** Guest output dropped (no stream, or the pending buffer full). */
  txDropped: number;
  /** Times the stream was found closed. */
  peerClosed: number;
}

export class VirtioConsole implements VirtioBackend {
  readonly deviceId = VIRTIO_ID_CONSOLE;
  readonly classCode = 0x078000; // simple communication controller, other
  readonly features: bigint;
  readonly queueMaxSizes: readonly number[];
  readonly configSize = VIRTIO_CONSOLE_CONFIG.size;
  readonly counters: VirtioConsoleCounters = { rxBytes: 0, txBytes: 0, txDropped: 0, peerClosed: 0 };

  private transport: VirtioTransport | undefined;
  private stream: HostByteStream | undefined;
  private watch: FdWatch | undefined;
  private readonly rxChain = new DescriptorChain();
  private readonly txChain = new DescriptorChain();
  private readonly pending: Uint8Array;
  /** Why the readv/writev path was given up, if it was. */
  readonly notes: string[] = [];
  private hostPath = true;
  /** A chain's spans in guest RAM and their host addresses, for streams with readHost/writeHost. */
  private readonly spans = new ChainSpans(HOST_SPANS);
  private pendingStart = 0;
  private pendingEnd = 0;
  private readonly config = new Uint8Array(VIRTIO_CONSOLE_CONFIG.size);
  private readonly emerg = new Uint8Array(1);
  private readonly onReadable = (): void => this.serviceStream();

  constructor(opts: VirtioConsoleOptions = {}) {
    this.pending = new Uint8Array(opts.pendingBytes ?? 64 * 1024);
    const qs = opts.queueSize ?? 128;
    this.queueMaxSizes = [qs, qs];
    let f = featureBit(VIRTIO_CONSOLE_F.emergWrite);
    if (opts.size !== undefined) {
      f |= featureBit(VIRTIO_CONSOLE_F.size);
      this.setSize(opts.size.cols, opts.size.rows);
    }
    this.features = f;
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
    this.transport?.configChanged();
  }

  /** Attach a host stream (or detach with undefined). Pending output of the old stream is dropped. */
  connect(stream: HostByteStream | undefined): void {
    this.disarm();
    this.counters.txDropped += this.pendingEnd - this.pendingStart;
    this.pendingStart = this.pendingEnd = 0;
    this.stream = stream;
    if (stream !== undefined && this.transport?.active === true) this.serviceStream();
  }

  get connected(): boolean {
    return this.stream !== undefined;
  }

  /** Whether the device is polling the stream now (false while the guest has no receive buffer). */
  get polling(): boolean {
    return this.watch !== undefined;
  }

  attach(transport: VirtioTransport): void {
    this.transport = transport;
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.config[offset + i]!;
    return v;
  }

  writeConfig(offset: number, _size: 1 | 2 | 4, value: number): void {
    if (offset !== VIRTIO_CONSOLE_CONFIG.emergWr) return;
    if ((this.transport!.negotiatedFeatures & featureBit(VIRTIO_CONSOLE_F.emergWrite)) === 0n) return;
    this.emerg[0] = value & 0xff;
    this.output(this.emerg);
  }

  activate(): void {
    if (this.stream !== undefined) this.serviceStream();
  }

  reset(): void {
    this.disarm();
  }

  queueNotified(index: number): void {
    if (index === 0) this.serviceStream();
    else this.transmit();
  }

  private arm(): void {
    if (this.watch === undefined && this.stream !== undefined) this.watch = this.transport!.loop.watch(this.stream.fd, this.onReadable);
  }

  private disarm(): void {
    this.watch?.close();
    this.watch = undefined;
  }

  private peerClosed(): void {
    this.counters.peerClosed++;
    this.disarm();
    this.counters.txDropped += this.pendingEnd - this.pendingStart;
    this.pendingStart = this.pendingEnd = 0;
    this.stream = undefined;
  }

  /** The stream is readable, or the guest added receive buffers: move host bytes in. */
  private serviceStream(): void {
    this.flushPending();
    const t = this.transport!;
    const stream = this.stream;
    if (stream === undefined) return;
    const q = t.queues[0]!;
    if (!t.active || !q.ready) {
      this.disarm();
      return;
    }
    const c = this.rxChain;
    for (;;) {
      if (!q.pop(c)) {
        // No receive buffer: stop polling (the bytes wait in the stream) until the guest adds one.
        if (q.enableNotifications()) {
          this.disarm();
          break;
        }
        continue;
      }
      let got = 0;
      let closed = false;
      const spans = stream.readHost === undefined ? 0 : this.hostSpans(c, true);
      const hostRead = spans > 0 ? this.readHost(stream, spans) : undefined;
      if (hostRead !== undefined) {
        if (hostRead < 0) closed = true;
        else got = hostRead;
      } else for (let i = 0; i < c.writableCount; i++) {
        const s = c.writableSegment(i);
        const n = stream.read(s);
        if (n < 0) {
          closed = true;
          break;
        }
        if (n === 0) break;
        got += Math.min(n, s.length);
        if (n < s.length) break;
      }
      if (got > 0) {
        this.counters.rxBytes += got;
        q.pushUsed(c.head, got);
      } else q.unpop();
      if (closed) {
        this.peerClosed();
        break;
      }
      if (got === 0) {
        this.arm();
        break;
      }
    }
    t.signalUsed(0);
  }

  private transmit(): void {
    const t = this.transport!;
    const q = t.queues[1]!;
    const c = this.txChain;
    do {
      q.disableNotifications();
      while (q.pop(c)) {
        if (!this.outputFromGuest(c)) for (let i = 0; i < c.readableCount; i++) this.output(c.readableSegment(i));
        this.counters.txBytes += c.readableBytes;
        q.pushUsed(c.head, 0);
      }
    } while (!q.enableNotifications());
    t.signalUsed(1);
  }

  /**
   * Select the chain's writable (toGuest) or readable spans and their host
   * addresses into `spans`: their count, or 0 when guest RAM is not
   * host-mapped or the chain is empty. At most HOST_SPANS: a longer chain is
   * taken in part (receive) or refused (transmit: the caller then copies).
   */
  private hostSpans(c: DescriptorChain, toGuest: boolean): number {
    const spans = this.spans;
    if (!this.hostPath || (!spans.select(c, toGuest, 0, Infinity) && !toGuest)) return 0;
    return spans.count > 0 && spans.toHost(c.memory) ? spans.count : 0;
  }

  /**
   * Send a transmit chain to the stream straight from guest RAM (writeHost):
   * false when that is not possible (no writeHost, RAM not host-mapped), and
   * the caller goes segment by segment. Output already waiting goes first;
   * what the stream does not take now is kept in the pending buffer, as
   * output() does.
   */
  private outputFromGuest(c: DescriptorChain): boolean {
    const total = c.readableBytes;
    if (this.stream?.writeHost === undefined || total === 0) return false;
    const spans = this.hostSpans(c, false);
    if (spans === 0) return false;
    this.flushPending(); // may find the peer gone
    const stream = this.stream;
    if (stream === undefined) {
      this.counters.txDropped += total;
      return true;
    }
    let done = 0;
    if (this.pendingStart === this.pendingEnd) {
      let n: number;
      try {
        n = stream.writeHost!(this.spans.host, this.spans.len, spans);
      } catch (e) {
        if (!(e instanceof RangeError)) throw e;
        this.hostUnusable(e);
        return false; // nothing was written: the caller goes segment by segment
      }
      if (n < 0) {
        this.peerClosed();
        this.counters.txDropped += total;
        return true;
      }
      done = Math.min(n, total);
    }
    if (done < total) this.keepFromGuest(c, done, total - done);
    return true;
  }

  /** stream.readHost, or undefined (nothing read; use views) when the spans were refused as not host memory. */
  private readHost(stream: HostByteStream, spans: number): number | undefined {
    try {
      return stream.readHost!(this.spans.host, this.spans.len, spans);
    } catch (e) {
      if (!(e instanceof RangeError)) throw e;
      this.hostUnusable(e);
      return undefined;
    }
  }

  /** The hypervisor layer refused guest RAM's host addresses (a mapping it does not know): use views from now on. */
  private hostUnusable(e: RangeError): void {
    this.hostPath = false;
    this.notes.push(`guest RAM spans refused for vectored I/O (${e.message}); using views`);
  }

  /** Append `length` bytes of the chain's readable data from `offset` to the pending buffer (compacted first); drop what does not fit. */
  private keepFromGuest(c: DescriptorChain, offset: number, length: number): void {
    if (this.pendingStart > 0) {
      this.pending.copyWithin(0, this.pendingStart, this.pendingEnd);
      this.pendingEnd -= this.pendingStart;
      this.pendingStart = 0;
    }
    const keep = Math.min(this.pending.length - this.pendingEnd, length);
    c.readFrom(offset, this.pending, this.pendingEnd, keep);
    this.pendingEnd += keep;
    this.counters.txDropped += length - keep;
  }

  /** Send guest bytes to the stream, keeping what it does not take now. */
  private output(bytes: Uint8Array): void {
    this.flushPending(); // may find the peer gone
    const stream = this.stream;
    if (stream === undefined) {
      this.counters.txDropped += bytes.length;
      return;
    }
    let done = 0;
    if (this.pendingStart === this.pendingEnd) {
      const n = stream.write(bytes);
      if (n < 0) {
        this.peerClosed();
        this.counters.txDropped += bytes.length;
        return;
      }
      done = Math.min(n, bytes.length);
    }
    if (done === bytes.length) return;
    // Keep the rest (compact first), drop what does not fit.
    if (this.pendingStart > 0) {
      this.pending.copyWithin(0, this.pendingStart, this.pendingEnd);
      this.pendingEnd -= this.pendingStart;
      this.pendingStart = 0;
    }
    const room = this.pending.length - this.pendingEnd;
    const keep = Math.min(room, bytes.length - done);
    this.pending.set(bytes.subarray(done, done + keep), this.pendingEnd);
    this.pendingEnd += keep;
    this.counters.txDropped += bytes.length - done - keep;
  }

  private flushPending(): void {
    if (this.pendingStart === this.pendingEnd || this.stream === undefined) return;
    const n = this.stream.write(this.pending.subarray(this.pendingStart, this.pendingEnd));
    if (n < 0) {
      this.peerClosed();
      return;
    }
    this.pendingStart += Math.min(n, this.pendingEnd - this.pendingStart);
    if (this.pendingStart === this.pendingEnd) this.pendingStart = this.pendingEnd = 0;
  }

  /** Bytes of guest output waiting for the stream. */
  get pendingOutput(): number {
    return this.pendingEnd - this.pendingStart;
  }

  save(): SavedDeviceState & VirtioConsoleCounters {
    return { kind: "virtio-console", version: 1, ...this.counters };
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
  /** Attach (or with undefined detach) the host side. */
  connect(stream: HostByteStream | undefined): void {
    this.console.connect(stream);
  }
}

export function createVirtioConsole(name: string, services: PciDeviceServices, opts: VirtioConsoleOptions = {}): VirtioConsoleDevice {
  return new VirtioConsoleDevice(name, services, opts);
}
