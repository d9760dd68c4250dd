/**
 * One port of a virtio-console device (virtio 1.1 spec 5.3): a receive queue
 * (host -> guest), a transmit queue (guest -> host) and the host byte stream
 * behind them. The device (virtio-console.ts) owns the ports and, with
 * MULTIPORT, the control queues that tell the guest which ports exist.
 *
 * Host -> guest: the port polls stream.fd (transport.loop.watch) and reads
 * the stream straight into the guest's receive buffers. When the guest has no
 * buffer, or (MULTIPORT) has not opened the port, the port stops polling (the
 * bytes stay in the stream: nothing is lost) and, for buffers, asks for a
 * notification; when the guest adds buffers or opens the port it reads on.
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
 */
import { ChainSpans, DescriptorChain } from "./queue.js";
import type { VirtioTransport } from "./pci-transport.js";
import type { FdWatch } from "../pci/device-thread-services.js";

/** The host end of a console port (a pty, a socket, a pipe pair). */
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

export interface VirtioConsoleCounters {
  rxBytes: number;
  txBytes: number;
  /** Guest output dropped (no stream, or the pending buffer full). */
  txDropped: number;
  /** Times a stream was found closed. */
  peerClosed: number;
}

/** What a port needs from the device that owns it. */
export interface ConsolePortOwner {
  /** The device's transport (set before any port does I/O). */
  readonly transport: VirtioTransport;
  /** The transport is attached and active (the device may do DMA). */
  readonly active: boolean;
  /** The device's totals, shared by its ports. */
  readonly counters: VirtioConsoleCounters;
  /** Whether guest RAM may still be handed to readHost/writeHost (false once the hypervisor layer refused it). */
  readonly hostPath: boolean;
  /** The hypervisor layer refused guest RAM's host addresses: use views from now on. */
  hostUnusable(e: RangeError): void;
  /** The port's stream came or went (connect(), or the peer closed). */
  connectionChanged(port: ConsolePort): void;
}

/**
 * Most guest-RAM spans one readv/writev takes (Linux's hvc buffers are one
 * page each). A longer receive chain is filled in its first HOST_SPANS spans;
 * a longer transmit chain goes segment by segment.
 */
const HOST_SPANS = 64;

export class ConsolePort {
  /**
   * Whether the guest takes bytes on this port now. A single-port device's
   * port always does; a MULTIPORT port once the driver opened it
   * (VIRTIO_CONSOLE_PORT_OPEN): Linux drops what arrives on a port no one has
   * open, so until then the bytes wait in the stream.
   */
  guestOpen: boolean;
  private stream: HostByteStream | undefined;
  private watch: FdWatch | undefined;
  private readonly rxChain = new DescriptorChain();
  private readonly txChain = new DescriptorChain();
  private readonly pending: Uint8Array;
  /** A chain's spans in guest RAM and their host addresses, for streams with readHost/writeHost. */
  private readonly spans = new ChainSpans(HOST_SPANS);
  private pendingStart = 0;
  private pendingEnd = 0;
  private readonly onReadable = (): void => this.serviceStream();

  /**
   * @param id the port number (0 for a single-port device)
   * @param name what the guest sees as the port's name (MULTIPORT), if any
   * @param rxQueue, txQueue the port's queue indices
   */
  constructor(
    readonly id: number,
    readonly name: string | undefined,
    readonly rxQueue: number,
    readonly txQueue: number,
    pendingBytes: number,
    guestOpen: boolean,
    private readonly owner: ConsolePortOwner,
  ) {
    this.pending = new Uint8Array(pendingBytes);
    this.guestOpen = guestOpen;
  }

  /** Attach a host stream (or detach with undefined). Pending output of the old stream is dropped. */
  connect(stream: HostByteStream | undefined): void {
    this.stop();
    this.dropPending();
    const was = this.stream !== undefined;
    this.stream = stream;
    if (stream !== undefined && this.owner.active) this.serviceStream();
    if (was || stream !== undefined) this.owner.connectionChanged(this);
  }

  get connected(): boolean {
    return this.stream !== undefined;
  }

  /** Whether the port is polling its stream now (false while the guest has no receive buffer or the port closed). */
  get polling(): boolean {
    return this.watch !== undefined;
  }

  /** Bytes of guest output waiting for the stream. */
  get pendingOutput(): number {
    return this.pendingEnd - this.pendingStart;
  }

  /** Stop polling the stream (device reset, the guest closed the port). The stream stays connected. */
  stop(): void {
    this.watch?.close();
    this.watch = undefined;
  }

  /** Output kept for a stream that is gone or replaced: counted as dropped. */
  private dropPending(): void {
    this.owner.counters.txDropped += this.pendingEnd - this.pendingStart;
    this.pendingStart = this.pendingEnd = 0;
  }

  private arm(): void {
    if (this.watch === undefined && this.stream !== undefined) this.watch = this.owner.transport.loop.watch(this.stream.fd, this.onReadable);
  }

  private peerClosed(): void {
    this.owner.counters.peerClosed++;
    this.stop();
    this.dropPending();
    this.stream = undefined;
    this.owner.connectionChanged(this);
  }

  /** The stream is readable, or the guest added receive buffers or opened the port: move host bytes in. */
  serviceStream(): void {
    this.flushPending();
    const t = this.owner.transport;
    const stream = this.stream;
    if (stream === undefined) return;
    const q = t.queues[this.rxQueue];
    if (!t.active || q === undefined || !q.ready || !this.guestOpen) {
      this.stop();
      return;
    }
    const c = this.rxChain;
    for (;;) {
      if (!q.pop(c)) {
        // No receive buffer: stop polling (the bytes wait in the stream) until the guest adds one.
        if (q.enableNotifications()) {
          this.stop();
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
        this.owner.counters.rxBytes += got;
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
    t.signalUsed(this.rxQueue);
  }

  /** The guest notified the transmit queue: send its chains to the stream. */
  transmit(): void {
    const t = this.owner.transport;
    const q = t.queues[this.txQueue];
    if (q === undefined || !q.ready) return;
    const c = this.txChain;
    do {
      q.disableNotifications();
      while (q.pop(c)) {
        if (!this.outputFromGuest(c)) for (let i = 0; i < c.readableCount; i++) this.output(c.readableSegment(i));
        this.owner.counters.txBytes += c.readableBytes;
        q.pushUsed(c.head, 0);
      }
    } while (!q.enableNotifications());
    t.signalUsed(this.txQueue);
  }

  /**
   * Select the chain's writable (toGuest) or readable spans and their host
   * addresses into `spans`: their count, or 0 when guest RAM is not
   * host-mapped or the chain is empty. At most HOST_SPANS: a longer chain is
   * taken in part (receive) or refused (transmit: the caller then copies).
   */
  private hostSpans(c: DescriptorChain, toGuest: boolean): number {
    const spans = this.spans;
    if (!this.owner.hostPath || (!spans.select(c, toGuest, 0, Infinity) && !toGuest)) return 0;
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
      this.owner.counters.txDropped += total;
      return true;
    }
    let done = 0;
    if (this.pendingStart === this.pendingEnd) {
      let n: number;
      try {
        n = stream.writeHost!(this.spans.host, this.spans.len, spans);
      } catch (e) {
        if (!(e instanceof RangeError)) throw e;
        this.owner.hostUnusable(e);
        return false; // nothing was written: the caller goes segment by segment
      }
      if (n < 0) {
        this.peerClosed();
        this.owner.counters.txDropped += total;
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
      this.owner.hostUnusable(e);
      return undefined;
    }
  }

  /** Append `length` bytes of the chain's readable data from `offset` to the pending buffer (compacted first); drop what does not fit. */
  private keepFromGuest(c: DescriptorChain, offset: number, length: number): void {
    this.compactPending();
    const keep = Math.min(this.pending.length - this.pendingEnd, length);
    c.readFrom(offset, this.pending, this.pendingEnd, keep);
    this.pendingEnd += keep;
    this.owner.counters.txDropped += length - keep;
  }

  private compactPending(): void {
    if (this.pendingStart === 0) return;
    this.pending.copyWithin(0, this.pendingStart, this.pendingEnd);
    this.pendingEnd -= this.pendingStart;
    this.pendingStart = 0;
  }

  /** Send guest bytes to the stream, keeping what it does not take now. */
  output(bytes: Uint8Array): void {
    this.flushPending(); // may find the peer gone
    const stream = this.stream;
    if (stream === undefined) {
      this.owner.counters.txDropped += bytes.length;
      return;
    }
    let done = 0;
    if (this.pendingStart === this.pendingEnd) {
      const n = stream.write(bytes);
      if (n < 0) {
        this.peerClosed();
        this.owner.counters.txDropped += bytes.length;
        return;
      }
      done = Math.min(n, bytes.length);
    }
    if (done === bytes.length) return;
    // Keep the rest (compact first), drop what does not fit.
    this.compactPending();
    const room = this.pending.length - this.pendingEnd;
    const keep = Math.min(room, bytes.length - done);
    this.pending.set(bytes.subarray(done, done + keep), this.pendingEnd);
    this.pendingEnd += keep;
    this.owner.counters.txDropped += bytes.length - done - keep;
  }

  /** Retry output the stream did not take before. */
  flushPending(): void {
    if (this.pendingStart === this.pendingEnd || this.stream === undefined) return;
    const n = this.stream.write(this.pending.subarray(this.pendingStart, this.pendingEnd));
    if (n < 0) {
      this.peerClosed();
      return;
    }
    this.pendingStart += Math.min(n, this.pendingEnd - this.pendingStart);
    if (this.pendingStart === this.pendingEnd) this.pendingStart = this.pendingEnd = 0;
  }
}
