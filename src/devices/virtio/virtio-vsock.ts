/**
 * virtio-vsock (virtio 1.2 spec 5.10): stream sockets between the guest
 * (AF_VSOCK, its CID from the configuration space) and programs on the host,
 * what Hyper-V calls Hyper-V sockets (the integration services' transport)
 * and Linux guests reach with the same AF_VSOCK API (vmw_vsock_virtio_transport).
 *
 * Queues: rx (0, device -> driver packets), tx (1, driver -> device
 * packets), event (2, the device's TRANSPORT_RESET). Every packet starts with
 * a 44-byte header (below); RW packets carry payload after it.
 *
 * The host side follows Firecracker's and Cloud Hypervisor's convention, so
 * the tools written for them work here:
 *  - the guest connects to CID 2 port P: the device connects to the host's
 *    UNIX socket `<path>_P` (VsockHost.connect); none there: the guest gets
 *    RST (ECONNRESET / ECONNREFUSED);
 *  - a host program connects to `<path>` and writes `CONNECT P\n`: the device
 *    asks the guest (REQUEST to port P from a host port of its own, 2^30
 *    upwards); on the guest's RESPONSE the program reads `OK <host port>\n`
 *    and the stream is open; on RST its socket is closed.
 *    (That listener is the worker's: src/worker/vsock-host.ts.)
 *
 * Flow control is vsock's credit (vsock-connection.ts): the device sends the
 * guest no more than its receive buffer has room for, and offers the guest
 * `bufAlloc` bytes per connection; what a host stream does not take at once
 * is kept (at most bufAlloc) and written when the stream polls writable.
 * Credit updates go to the guest when half its credit was used.
 *
 * Host I/O goes straight between guest RAM and the socket, many packets a
 * system call: one readv fills up to RX_BATCH receive buffers (a packet per
 * buffer), and a notification's run of RW packets of one connection goes out
 * with one writev (their chains held until it is done; whatever the guest
 * sent after them waits for it, so order is kept).
 *
 * Closing, as Linux does it: a guest that closes sends SHUTDOWN(RCV|SEND) and
 * waits for RST: the device answers RST and closes the host stream once the
 * guest's last bytes went out. SHUTDOWN(SEND) alone shuts the stream's write
 * side (the host program reads the end of the stream). A host stream that
 * ends is SHUTDOWN(SEND) to the guest. RST either way drops the connection.
 *
 * What the device still has to send is a few bits per connection plus a
 * bounded ring of RSTs (for packets naming no connection): a guest flooding
 * the device with requests cannot make it queue without bound. Hostile
 * packets (short, a payload longer than the buffer or 64 KiB, another
 * source CID, another type) are counted and dropped, or answered with RST,
 * as the spec asks (5.10.6.6); a guest that overruns its credit loses the
 * connection. Nothing a guest sends stops the device (no NEEDS_RESET).
 *
 * Saved state: the CID and counters. Connections do not survive a restore
 * (their host streams are gone): the restored device sends the guest
 * VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, and Linux drops its connections and
 * reads the CID again (5.10.6.8).
 */
import type { SavedDeviceState } from "../dependencies.js";
import { PciDeviceError } from "../pci/pci-config.js";
import { DeviceAlarm, monotonicClock, type Clock } from "../io-limits.js";
import type { PciDeviceServices } from "../pci/device-thread-services.js";
import { ChainSpans, DescriptorChain, type VirtQueue } from "./queue.js";
import { VirtioPciDevice, type VirtioBackend, type VirtioTransport } from "./pci-transport.js";
import { SAY, VsockConnection, type VsockHostStream } from "./vsock-connection.js";

export type { VsockHostStream } from "./vsock-connection.js";

export const VIRTIO_ID_VSOCK = 19;
/** The host's CID (VMADDR_CID_HOST). */
export const VSOCK_HOST_CID = 2;
/** Bytes of a packet header (struct virtio_vsock_hdr). */
export const VSOCK_HEADER = 44;
/** Header field offsets (all little-endian). */
export const VSOCK_HDR = { srcCid: 0, dstCid: 8, srcPort: 16, dstPort: 20, len: 24, type: 28, op: 30, flags: 32, bufAlloc: 36, fwdCnt: 40 } as const;
export const VSOCK_OP = { invalid: 0, request: 1, response: 2, rst: 3, shutdown: 4, rw: 5, creditUpdate: 6, creditRequest: 7 } as const;
export const VSOCK_TYPE_STREAM = 1;
export const VSOCK_SHUTDOWN = { rcv: 1, send: 2 } as const;
export const VSOCK_EVENT_TRANSPORT_RESET = 0;
/** Largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE). */
export const VSOCK_MAX_PAYLOAD = 64 * 1024;
/** The first port the device gives a host-initiated connection (Firecracker's choice). */
export const VSOCK_FIRST_HOST_PORT = 1 << 30;
/** How long a host program's connection waits for the guest's RESPONSE before it is closed (Firecracker's figure). */
export const VSOCK_CONNECT_TIMEOUT_MS = 2000;
/** Guest CIDs a VM may have: 0-2 are the hypervisor, local and host; 2^32-1 is VMADDR_CID_ANY. */
export const VSOCK_MIN_GUEST_CID = 3;
export const VSOCK_MAX_GUEST_CID = 0xfffffffe;

/** The host services the device connects to. */
export interface VsockHost {
  /** A stream to the host service on `port` (the guest connected to CID 2 port `port`), or undefined when none listens. */
  connect(port: number): VsockHostStream | undefined;
}

export interface VirtioVsockOptions {
  /** The guest's CID (3 to 2^32-2). */
  readonly guestCid: number;
  /** Most connections at a time (default 256); more REQUESTs get RST. */
  readonly maxConnections?: number;
  /** buf_alloc offered the guest per connection: the most guest output held for a slow host stream (default 256 KiB). */
  readonly bufferBytes?: number;
  /** Queue size (default 128). */
  readonly queueSize?: number;
  /** The clock connection timeouts are measured on (tests); default the monotonic clock. */
  readonly clock?: Clock;
}

export interface VirtioVsockCounters {
  /** Connections the guest opened, and the host opened, since start. */
  fromGuest: number;
  fromHost: number;
  /** Guest REQUESTs refused: no host service on the port, or at the connection limit. */
  refused: number;
  /** RSTs sent to the guest; RSTs dropped (the ring full). */
  resets: number;
  resetsDropped: number;
  /** Packets dropped as malformed (short, payload longer than the buffer or 64 KiB, not from the guest's CID, unknown op). */
  badPackets: number;
  /** Connections dropped because the guest sent beyond its credit. */
  creditOverruns: number;
  /** Host programs' connections the guest did not answer in time (closed, RST to the guest). */
  connectTimeouts: number;
  /** Receive buffers with no room for payload after the header (returned unused). */
  badRxBuffers: number;
  /** Payload bytes host -> guest and guest -> host. */
  rxBytes: number;
  txBytes: number;
}

export interface VirtioVsockSaved extends SavedDeviceState, VirtioVsockCounters {
  readonly kind: "virtio-vsock";
  readonly version: 1;
  readonly guestCid: number;
  /** A TRANSPORT_RESET event was still to be delivered. */
  readonly resetPending: boolean;
}

/** RSTs for packets that name no connection (and for connections already dropped): most kept before more are dropped. */
const RST_RING = 512;
/** Guest-RAM spans one readv/writev takes. */
const HOST_SPANS = 32;
/** Receive buffers one host read may fill (Linux posts 4 KiB ones: up to 64 KiB a read). */
const RX_BATCH = 16;
/** RW packets of one connection one host write may take (Linux sends 4 KiB ones: up to 128 KiB a write). */
const TX_BATCH = 32;
/** Guest-RAM spans of those packets' payloads. */
const TX_SPANS = 64;

/** A FIFO of connections with something to send (each at most once: `queued`). */
class SendQueue {
  private items: (VsockConnection | undefined)[] = new Array<VsockConnection | undefined>(64);
  private head = 0;
  private count = 0;

  get length(): number {
    return this.count;
  }

  push(c: VsockConnection): void {
    if (c.queued) return;
    if (this.count === this.items.length) {
      const bigger = new Array<VsockConnection | undefined>(this.items.length * 2);
      for (let i = 0; i < this.count; i++) bigger[i] = this.items[(this.head + i) % this.items.length];
      this.items = bigger;
      this.head = 0;
    }
    this.items[(this.head + this.count) % this.items.length] = c;
    this.count++;
    c.queued = true;
  }

  peek(): VsockConnection {
    return this.items[this.head]!;
  }

  shift(): VsockConnection {
    const c = this.items[this.head]!;
    this.items[this.head] = undefined;
    this.head = (this.head + 1) % this.items.length;
    this.count--;
    c.queued = false;
    return c;
  }

  clear(): void {
    while (this.count > 0) this.shift();
  }
}

export class VirtioVsock implements VirtioBackend {
  readonly deviceId = VIRTIO_ID_VSOCK;
  readonly classCode = 0x078000; // simple communication controller, other (as QEMU's vhost-vsock-pci)
  readonly features = 0n; // stream sockets only (no VIRTIO_VSOCK_F_SEQPACKET)
  readonly queueMaxSizes: readonly number[];
  readonly configSize = 8;
  readonly guestCid: number;
  readonly counters: VirtioVsockCounters = { fromGuest: 0, fromHost: 0, refused: 0, resets: 0, resetsDropped: 0, badPackets: 0, creditOverruns: 0, connectTimeouts: 0, badRxBuffers: 0, rxBytes: 0, txBytes: 0 };
  /** Why the readv/writev path was given up, if it was. */
  readonly notes: string[] = [];

  private attached: VirtioTransport | undefined;
  private readonly maxConnections: number;
  private readonly bufferBytes: number;
  /** Connections by guest port, then host port. */
  private readonly table = new Map<number, Map<number, VsockConnection>>();
  private open = 0;
  /** Connections the guest closed whose last output still waits for the host stream (closed when it drains, or at reset). */
  private readonly draining = new Set<VsockConnection>();
  private readonly sendQueue = new SendQueue();
  /** RSTs to send: guest port, host port pairs. */
  private readonly rsts = new Uint32Array(2 * RST_RING);
  private rstHead = 0;
  private rstCount = 0;
  private nextHostPort = VSOCK_FIRST_HOST_PORT;
  private resetPending = false;
  private readonly clock: Clock;
  /** When the oldest unanswered host connection times out (set in attach: it needs the device thread's loop). */
  private alarm: DeviceAlarm | undefined;
  /** Host connections waiting for the guest's RESPONSE, with their deadlines. */
  private readonly connecting = new Map<VsockConnection, number>();
  private hostPath = true;
  /** The guest's receive buffers one host read fills; the first is the one sendToGuest pops. */
  private readonly rxBatch = Array.from({ length: RX_BATCH }, () => new DescriptorChain());
  private readonly rxChain = this.rxBatch[0]!;
  private readonly rxRoom = new Uint32Array(RX_BATCH);
  private readonly rxHeads = new Uint32Array(RX_BATCH);
  private readonly rxLens = new Uint32Array(RX_BATCH);
  /** The chain hearGuest pops into next (a chain held for a batch trades places with a free one). */
  private txChain = new DescriptorChain();
  /**
   * RW packets of one connection (`heldFor`) taken from the transmit queue
   * and not yet written to its host stream: their payloads go out with one
   * writev (`writeHeld`), and only then are the chains used (the guest may
   * reuse them).
   */
  private readonly txHeld = Array.from({ length: TX_BATCH }, () => new DescriptorChain());
  private held = 0;
  private heldFor: VsockConnection | undefined;
  private heldBytes = 0;
  private readonly heldLens = new Uint32Array(TX_BATCH);
  private readonly heldHeads = new Uint32Array(TX_BATCH);
  /** Used lengths of transmitted chains: always 0 (the device writes nothing into them). */
  private readonly zeroLens = new Uint32Array(TX_BATCH);
  private readonly txSpans = new ChainSpans(TX_SPANS);
  private readonly eventChain = new DescriptorChain();
  private readonly spans = new ChainSpans(HOST_SPANS);
  private readonly header = new Uint8Array(VSOCK_HEADER);
  private readonly headerView = new DataView(this.header.buffer);
  /** Payload copies where guest RAM is not host memory (and a host stream's first line). */
  private readonly scratch = new Uint8Array(VSOCK_MAX_PAYLOAD);
  /** The only event there is: le32 id VSOCK_EVENT_TRANSPORT_RESET (0). */
  private readonly event = new Uint8Array(4);

  constructor(private readonly host: VsockHost, opts: VirtioVsockOptions) {
    const cid = opts.guestCid;
    if (!Number.isInteger(cid) || cid < VSOCK_MIN_GUEST_CID || cid > VSOCK_MAX_GUEST_CID) throw new PciDeviceError("VSOCK_CID", `guest CID ${cid} is not an integer from ${VSOCK_MIN_GUEST_CID} to ${VSOCK_MAX_GUEST_CID}`);
    this.guestCid = cid;
    this.maxConnections = opts.maxConnections ?? 256;
    this.bufferBytes = opts.bufferBytes ?? 256 * 1024;
    const qs = opts.queueSize ?? 128;
    this.queueMaxSizes = [qs, qs, 16];
    this.clock = opts.clock ?? monotonicClock;
  }

  get transport(): VirtioTransport {
    return this.attached!;
  }

  /** Connections open now. */
  get connections(): number {
    return this.open;
  }

  /** Connections the guest closed whose output still drains to the host (each holds a socket and up to bufAlloc bytes). */
  get drainingConnections(): number {
    return this.draining.size;
  }

  /** No more connections now: the open ones and those still draining hold the host's sockets and memory. */
  private get atLimit(): boolean {
    return this.open + this.draining.size >= this.maxConnections;
  }

  attach(transport: VirtioTransport): void {
    this.attached = transport;
    this.alarm = new DeviceAlarm(transport.loop, () => this.expire(), this.clock);
  }

  /** The connection timer's descriptor (tests fire it through their loop). */
  get alarmFd(): number | undefined {
    return this.alarm?.fd;
  }

  /** Close host connections the guest has not answered by their deadline; wait for the next one. */
  private expire(): void {
    const now = this.clock();
    let next = Infinity;
    for (const [c, deadline] of this.connecting) {
      if (deadline > now) next = Math.min(next, deadline);
      else {
        this.counters.connectTimeouts++;
        this.resetConnection(c, true);
      }
    }
    if (next !== Infinity) this.alarm?.set(next - now);
    this.sendToGuest();
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    // le64 guest_cid; the high half is 0.
    let v = 0;
    for (let i = size - 1; i >= 0; i--) {
      const at = offset + i;
      v = v * 256 + (at < 4 ? (this.guestCid >>> (8 * at)) & 0xff : 0);
    }
    return v;
  }

  writeConfig(): void {
    // guest_cid is read-only.
  }

  activate(): void {
    this.sendEvent();
  }

  /** Driver reset or board reset: every connection is dropped (host streams closed). */
  reset(): void {
    this.dropAll();
    this.resetPending = false;
  }

  /** The VM stops: close every host stream, and the timer. */
  close(): void {
    this.dropAll();
    this.alarm?.close();
    this.alarm = undefined;
  }

  private dropAll(): void {
    for (const byHost of this.table.values()) for (const c of byHost.values()) this.closeStream(c);
    for (const c of this.draining) this.closeStream(c);
    this.table.clear();
    this.draining.clear();
    this.connecting.clear();
    this.alarm?.cancel();
    this.open = 0;
    this.sendQueue.clear();
    this.rstHead = this.rstCount = 0;
  }

  queueNotified(index: number): void {
    if (index === 0) this.sendToGuest();
    else if (index === 1) this.hearGuest();
    else if (index === 2) this.sendEvent();
  }

  // --- the connection table --------------------------------------------------------------------

  private lookup(guestPort: number, hostPort: number): VsockConnection | undefined {
    return this.table.get(guestPort)?.get(hostPort);
  }

  private add(c: VsockConnection): void {
    let byHost = this.table.get(c.guestPort);
    if (byHost === undefined) this.table.set(c.guestPort, (byHost = new Map()));
    byHost.set(c.hostPort, c);
    this.open++;
  }

  private remove(c: VsockConnection): void {
    this.connecting.delete(c);
    const byHost = this.table.get(c.guestPort);
    if (byHost?.get(c.hostPort) !== c) return;
    byHost.delete(c.hostPort);
    if (byHost.size === 0) this.table.delete(c.guestPort);
    this.open--;
  }

  private closeStream(c: VsockConnection): void {
    c.stopWatches();
    c.gone = true;
    this.draining.delete(c);
    try {
      c.stream.close();
    } catch {
      /* already closed */
    }
  }

  /** Drop a connection: RST to the guest (unless it sent one), the host stream closed at once. */
  private resetConnection(c: VsockConnection, tellGuest: boolean): void {
    if (c === this.heldFor) {
      this.writeHeld(); // what the guest sent before what resets it goes out first, as ever
      if (c.gone) return; // that write found the host program gone: reset already
    }
    this.remove(c);
    c.say = 0;
    this.closeStream(c);
    if (tellGuest) this.queueRst(c.guestPort, c.hostPort);
  }

  private queueRst(guestPort: number, hostPort: number): void {
    if (this.rstCount === RST_RING) {
      this.counters.resetsDropped++;
      return;
    }
    const at = ((this.rstHead + this.rstCount) % RST_RING) * 2;
    this.rsts[at] = guestPort;
    this.rsts[at + 1] = hostPort;
    this.rstCount++;
  }

  // --- host-initiated connections ------------------------------------------------------------

  /**
   * A host program asked (`CONNECT port`) for the guest's `port`: the device
   * sends REQUEST and owns `stream` from now on. False (the stream closed)
   * when the driver is not running or the connection limit is reached.
   */
  connectFromHost(port: number, stream: VsockHostStream): boolean {
    if (this.attached?.active !== true || this.atLimit || !Number.isInteger(port) || port < 0 || port > 0xffffffff) {
      this.counters.refused++;
      stream.close();
      return false;
    }
    let hostPort = this.nextHostPort;
    while (this.lookup(port, hostPort) !== undefined) hostPort = hostPort >= 0xfffffffe ? VSOCK_FIRST_HOST_PORT : hostPort + 1;
    this.nextHostPort = hostPort >= 0xfffffffe ? VSOCK_FIRST_HOST_PORT : hostPort + 1;
    const c = new VsockConnection(port, hostPort, stream, "connecting", this.bufferBytes);
    this.add(c);
    this.counters.fromHost++;
    this.connecting.set(c, this.clock() + VSOCK_CONNECT_TIMEOUT_MS);
    this.alarm?.set(VSOCK_CONNECT_TIMEOUT_MS);
    c.say |= SAY.request;
    this.sendQueue.push(c);
    this.sendToGuest();
    return true;
  }

  // --- driver -> device (tx queue) -------------------------------------------------------------

  private hearGuest(): void {
    const t = this.transport;
    const q = t.queues[1];
    if (q === undefined || !q.ready) return;
    do {
      q.disableNotifications();
      for (;;) {
        const c = this.txChain;
        if (!q.pop(c)) break;
        if (c.readableBytes < VSOCK_HEADER) this.counters.badPackets++;
        else {
          c.readFrom(0, this.header, 0, VSOCK_HEADER);
          if (this.packet(c)) continue; // held: used once its payload is written
        }
        q.pushUsed(c.head, 0);
      }
    } while (!q.enableNotifications());
    this.writeHeld();
    t.signalUsed(1);
    this.sendToGuest();
  }

  /** One packet from the guest; its header is in `header`. True: the chain is held (an RW packet's payload waits for the batch's write). */
  private packet(chain: DescriptorChain): boolean {
    const h = this.headerView;
    const srcPort = h.getUint32(VSOCK_HDR.srcPort, true);
    const dstPort = h.getUint32(VSOCK_HDR.dstPort, true);
    const len = h.getUint32(VSOCK_HDR.len, true);
    const op = h.getUint16(VSOCK_HDR.op, true);
    let conn = this.lookup(srcPort, dstPort);
    // The held RW packets go out before anything the guest sent after them but more of their connection's bytes.
    if (this.held > 0 && (op !== VSOCK_OP.rw || conn !== this.heldFor)) {
      this.writeHeld();
      if (conn?.gone === true) conn = undefined; // that write found its host program gone: reset, out of the table
    }
    const refuse = (): void => {
      if (conn !== undefined) this.resetConnection(conn, op !== VSOCK_OP.rst);
      else if (op !== VSOCK_OP.rst) this.queueRst(srcPort, dstPort);
    };
    // A packet claiming another source is not the guest's to answer for: dropped.
    if (h.getUint32(VSOCK_HDR.srcCid, true) !== this.guestCid || h.getUint32(VSOCK_HDR.srcCid + 4, true) !== 0) {
      this.counters.badPackets++;
      return false;
    }
    if (len > chain.readableBytes - VSOCK_HEADER || len > VSOCK_MAX_PAYLOAD) {
      this.counters.badPackets++;
      refuse();
      return false;
    }
    // Another VM, the hypervisor, another socket type: not reachable here (5.10.6.6: RST).
    if (h.getUint32(VSOCK_HDR.dstCid, true) !== VSOCK_HOST_CID || h.getUint32(VSOCK_HDR.dstCid + 4, true) !== 0 || h.getUint16(VSOCK_HDR.type, true) !== VSOCK_TYPE_STREAM) {
      refuse();
      return false;
    }
    if (conn === undefined) {
      if (op === VSOCK_OP.request) this.openFromGuest(srcPort, dstPort);
      else if (op !== VSOCK_OP.rst) this.queueRst(srcPort, dstPort);
      return false;
    }
    conn.peerBufAlloc = h.getUint32(VSOCK_HDR.bufAlloc, true);
    conn.peerFwdCnt = h.getUint32(VSOCK_HDR.fwdCnt, true);
    let held = false;
    switch (op) {
      case VSOCK_OP.rw:
        held = this.fromGuest(conn, chain, len);
        break;
      case VSOCK_OP.creditUpdate:
        break;
      case VSOCK_OP.creditRequest:
        conn.say |= SAY.creditUpdate;
        break;
      case VSOCK_OP.shutdown:
        this.guestShutdown(conn, h.getUint32(VSOCK_HDR.flags, true));
        break;
      case VSOCK_OP.rst:
        // A guest that had ended its output cleanly (SHUTDOWN(SEND)) still has it delivered: Linux answers the device's
        // SHUTDOWN(SEND|RCV) with RST at once, while the last of that output may still wait for the host to read.
        if ((conn.guestShut & VSOCK_SHUTDOWN.send) !== 0 && conn.pendingLength > 0) this.drain(conn);
        else this.resetConnection(conn, false);
        return false;
      case VSOCK_OP.response:
        if (conn.state !== "connecting") {
          refuse();
          return false;
        }
        this.acceptedByGuest(conn);
        break;
      default:
        // A second REQUEST on a live connection, INVALID, an op this spec does not have.
        if (op !== VSOCK_OP.request) this.counters.badPackets++;
        refuse();
        return false;
    }
    if (conn.wantsToSend) this.sendQueue.push(conn);
    return held;
  }

  /** The guest's REQUEST to host port `hostPort`: connect `<path>_<hostPort>`, or refuse. */
  private openFromGuest(guestPort: number, hostPort: number): void {
    let stream: VsockHostStream | undefined;
    if (!this.atLimit) {
      try {
        stream = this.host.connect(hostPort);
      } catch {
        stream = undefined;
      }
    }
    if (stream === undefined) {
      this.counters.refused++;
      this.queueRst(guestPort, hostPort);
      return;
    }
    const h = this.headerView;
    const c = new VsockConnection(guestPort, hostPort, stream, "open", this.bufferBytes);
    c.peerBufAlloc = h.getUint32(VSOCK_HDR.bufAlloc, true);
    c.peerFwdCnt = h.getUint32(VSOCK_HDR.fwdCnt, true);
    this.add(c);
    this.counters.fromGuest++;
    c.say |= SAY.response;
    this.watchHost(c);
    this.sendQueue.push(c);
  }

  /** The guest accepted a host program's connection: the program reads `OK <port>`, and its stream is read. */
  private acceptedByGuest(c: VsockConnection): void {
    c.state = "open";
    this.connecting.delete(c);
    const line = `OK ${c.hostPort}\n`;
    for (let i = 0; i < line.length; i++) this.scratch[i] = line.charCodeAt(i);
    let n: number;
    try {
      n = c.stream.write(this.scratch, line.length);
    } catch {
      n = -1;
    }
    if (n !== line.length) {
      // The program hung up while the guest answered (a fresh socket takes a short line whole).
      this.resetConnection(c, true);
      return;
    }
    this.watchHost(c);
  }

  /** Poll the host stream for bytes while the guest may receive and none are known to wait. */
  private watchHost(c: VsockConnection): void {
    if (c.readWatch !== undefined || c.hostReadable || !c.mayReceive) return;
    c.readWatch = this.transport.loop.watch(c.stream.fd, () => {
      c.stopReading();
      c.hostReadable = true;
      if (c.wantsToSend) this.sendQueue.push(c);
      this.sendToGuest();
    });
  }

  /** An RW packet's payload (`len` bytes after the header) to the host stream: true when its chain is held for the batch's write. */
  private fromGuest(c: VsockConnection, chain: DescriptorChain, len: number): boolean {
    if (c.state !== "open" || (c.guestShut & VSOCK_SHUTDOWN.send) !== 0) {
      this.counters.badPackets++;
      this.resetConnection(c, true);
      return false;
    }
    if (len === 0) return false;
    if (c.pendingLength + (c === this.heldFor ? this.heldBytes : 0) + len > c.bufAlloc) {
      // More than the credit this side gave: the guest broke the protocol.
      this.counters.creditOverruns++;
      this.resetConnection(c, true);
      return false;
    }
    c.rxCnt = (c.rxCnt + len) >>> 0;
    this.counters.txBytes += len;
    if (c.pendingLength === 0 && this.hold(c, chain, len)) return true;
    this.writeHeld(); // this connection's held packets, when this one could not join them
    if (c.gone) return false; // that write found the host program gone
    let done = 0;
    if (c.pendingLength === 0) {
      try {
        done = this.writeFromGuest(c, chain, len);
      } catch {
        this.resetConnection(c, true); // EPIPE, ECONNRESET: the host program is gone
        return false;
      }
    }
    if (done < len) this.keep(c, chain, VSOCK_HEADER + done, len - done);
    this.creditCheck(c);
    return false;
  }

  /** Guest output the host stream did not take: `len` bytes of `chain` from byte `from`, kept until it polls writable. */
  private keep(c: VsockConnection, chain: DescriptorChain, from: number, len: number): void {
    if (c.pending === undefined) c.pending = new Uint8Array(c.bufAlloc);
    chain.readFrom(from, c.pending, c.pendingLength, len);
    c.pendingLength += len;
    this.watchWritable(c);
  }

  /**
   * Hold an RW packet's chain for a batch write with the ones held before it
   * (the same connection's: packet() wrote any other's first). False when
   * its payload cannot be written from guest RAM (then it goes on its own).
   */
  private hold(c: VsockConnection, chain: DescriptorChain, len: number): boolean {
    if (!this.hostPath || c.stream.writeHost === undefined) return false;
    if (this.held === TX_BATCH) this.writeHeld();
    if (c.gone || c.pendingLength > 0) return false; // that write left output (or no connection) behind
    const spans = this.txSpans;
    const before = spans.count;
    if (spans.append(chain, false, VSOCK_HEADER, len) < len) {
      spans.truncate(before);
      if (this.held === 0) return false; // more pieces than a write takes: copied, on its own
      this.writeHeld();
      return this.hold(c, chain, len);
    }
    const k = this.held++;
    this.heldHeads[k] = chain.head;
    this.heldLens[k] = len;
    this.heldBytes += len;
    this.heldFor = c;
    // The chain stays as it is until the write; hearGuest pops into a free one.
    this.txChain = this.txHeld[k]!;
    this.txHeld[k] = chain;
    return true;
  }

  /** The `n` held payloads to `c`'s stream: one writev from guest RAM, else a write per packet through a copy; the bytes taken. */
  private writeHeldOut(c: VsockConnection, n: number): number {
    const spans = this.txSpans;
    if (this.hostPath && spans.toHost(this.txHeld[0]!.memory)) {
      try {
        return c.stream.writeHost!(spans.host, spans.len, spans.count);
      } catch (e) {
        if (!(e instanceof RangeError)) throw e;
        this.hostUnusable(e);
      }
    }
    let done = 0;
    for (let k = 0; k < n; k++) {
      const len = this.heldLens[k]!;
      this.txHeld[k]!.readFrom(VSOCK_HEADER, this.scratch, 0, len);
      const took = c.stream.write(this.scratch, len);
      done += took;
      if (took < len) break;
    }
    return done;
  }

  /**
   * Write the held packets' payloads with one writev, keep what the stream
   * did not take, and give their chains back to the guest (in the order it
   * sent them, before any chain after them).
   */
  private writeHeld(): void {
    const n = this.held;
    if (n === 0) return;
    const c = this.heldFor!;
    const spans = this.txSpans;
    this.held = 0;
    this.heldFor = undefined;
    const total = this.heldBytes;
    this.heldBytes = 0;
    let done = 0;
    let broken = false;
    try {
      done = this.writeHeldOut(c, n);
    } catch {
      broken = true; // EPIPE, ECONNRESET: the host program is gone
    }
    spans.clear();
    if (broken) this.resetConnection(c, true);
    else if (done < total) {
      let skip = done;
      for (let k = 0; k < n; k++) {
        const len = this.heldLens[k]!;
        if (skip >= len) skip -= len;
        else {
          this.keep(c, this.txHeld[k]!, VSOCK_HEADER + skip, len - skip);
          skip = 0;
        }
      }
    }
    this.transport.queues[1]!.pushUsedBatch(this.heldHeads, this.zeroLens, n);
    if (broken) return;
    this.creditCheck(c);
    if (c.wantsToSend) this.sendQueue.push(c);
  }

  /** Write the payload straight from guest RAM (one writev), else through a copy: the bytes the stream took. */
  private writeFromGuest(c: VsockConnection, chain: DescriptorChain, len: number): number {
    const s = c.stream;
    const spans = this.spans;
    if (s.writeHost !== undefined && this.hostPath && spans.select(chain, false, VSOCK_HEADER, len) && spans.toHost(chain.memory)) {
      try {
        return s.writeHost(spans.host, spans.len, spans.count);
      } catch (e) {
        if (!(e instanceof RangeError)) throw e;
        this.hostUnusable(e);
      }
    }
    chain.readFrom(VSOCK_HEADER, this.scratch, 0, len);
    return s.write(this.scratch, len);
  }

  private hostUnusable(e: RangeError): void {
    this.hostPath = false;
    this.notes.push(`guest RAM spans refused for vectored I/O (${e.message}); copying`);
  }

  private watchWritable(c: VsockConnection): void {
    if (c.writeWatch !== undefined) return;
    c.writeWatch = this.transport.loop.watchWritable(c.stream.fd, () => this.flush(c));
  }

  /** The host stream has room: write held guest output; then what waited for it (shutdown, close, credit). */
  private flush(c: VsockConnection): void {
    const buf = c.pending;
    if (buf !== undefined && c.pendingLength > 0) {
      let n: number;
      try {
        n = c.stream.write(buf, c.pendingLength);
      } catch {
        if (c.gone) this.closeStream(c);
        else this.resetConnection(c, true);
        this.sendToGuest();
        return;
      }
      if (n > 0) {
        buf.copyWithin(0, n, c.pendingLength);
        c.pendingLength -= n;
      }
    }
    if (c.pendingLength === 0) {
      c.stopWaitingForRoom();
      this.drained(c);
    }
    if (c.gone) return;
    // Room made, even in part: a guest waiting for credit hears of it (at half its credit, as always).
    this.creditCheck(c);
    if (c.wantsToSend) {
      this.sendQueue.push(c);
      this.sendToGuest();
    }
  }

  /** Nothing of the guest's output is held: carry out a shutdown or close that waited for that. */
  private drained(c: VsockConnection): void {
    if (c.pendingLength > 0) return;
    if (c.gone) {
      this.closeStream(c);
      return;
    }
    if ((c.guestShut & VSOCK_SHUTDOWN.send) !== 0 && !c.hostWriteShut) {
      c.hostWriteShut = true;
      try {
        c.stream.shutdownWrite();
      } catch {
        this.resetConnection(c, true);
      }
    }
  }

  /** Tell the guest its credit when half of it was used since it was last told. */
  private creditCheck(c: VsockConnection): void {
    if (((c.fwdCnt - c.fwdCntSent) >>> 0) >= c.bufAlloc / 2) c.say |= SAY.creditUpdate;
  }

  /** The guest's SHUTDOWN: it takes no more (RCV) and/or sends no more (SEND); both: it closes and waits for RST. */
  private guestShutdown(c: VsockConnection, flags: number): void {
    c.guestShut |= flags & (VSOCK_SHUTDOWN.rcv | VSOCK_SHUTDOWN.send);
    if ((c.guestShut & VSOCK_SHUTDOWN.rcv) !== 0) {
      c.stopReading();
      c.hostReadable = false;
    }
    if (c.guestShut === (VSOCK_SHUTDOWN.rcv | VSOCK_SHUTDOWN.send)) {
      // Closed on the guest's side: RST (what it waits for); the stream closes once its output is out.
      this.queueRst(c.guestPort, c.hostPort);
      this.drain(c);
      return;
    }
    this.drained(c);
  }

  /** The connection is over for the guest: out of the table; its host stream closes once the held output is written. */
  private drain(c: VsockConnection): void {
    this.remove(c);
    c.say = 0;
    c.gone = true;
    this.draining.add(c);
    c.stopReading();
    this.drained(c);
  }

  // --- device -> driver (rx queue) -------------------------------------------------------------

  /** Fill the guest's receive buffers: RSTs first, then connections in turn (a packet, or one read's packets, each per turn). */
  private sendToGuest(): void {
    const t = this.attached;
    if (t === undefined || !t.active) return;
    const q = t.queues[0];
    if (q === undefined || !q.ready) return;
    const chain = this.rxChain;
    let used = false;
    while (this.rstCount > 0 || this.sendQueue.length > 0) {
      if (!q.pop(chain)) {
        if (q.enableNotifications()) break;
        continue;
      }
      if (chain.writableBytes <= VSOCK_HEADER) {
        // Room for a header and no payload: a driver's buffer (Linux's are a page) never is; one would stall data.
        this.counters.badRxBuffers++;
        q.pushUsed(chain.head, 0);
        used = true;
        continue;
      }
      if (this.rstCount > 0) {
        const at = this.rstHead * 2;
        this.writeHeader(chain, this.rsts[at]!, this.rsts[at + 1]!, VSOCK_OP.rst, 0, 0, 0, 0);
        this.rstHead = (this.rstHead + 1) % RST_RING;
        this.rstCount--;
        this.counters.resets++;
        q.pushUsed(chain.head, VSOCK_HEADER);
        used = true;
        continue;
      }
      const c = this.sendQueue.peek();
      if (c.gone || !this.fill(c, q, chain)) q.unpop();
      else used = true;
      this.sendQueue.shift();
      if (!c.gone && c.wantsToSend) this.sendQueue.push(c);
    }
    if (used) t.signalUsed(0);
  }

  /**
   * Connection `c`'s next packets, the first into `chain` (popped from `q`),
   * pushed used: true when any went, false when `c` has nothing to send now
   * (`chain` is still the caller's).
   */
  private fill(c: VsockConnection, q: VirtQueue, chain: DescriptorChain): boolean {
    if (c.say !== 0) {
      const bit = c.say & -c.say;
      c.say &= ~bit;
      let op: number = VSOCK_OP.creditUpdate;
      let flags = 0;
      if (bit === SAY.request) op = VSOCK_OP.request;
      else if (bit === SAY.response) op = VSOCK_OP.response;
      else if (bit === SAY.shutdown) {
        op = VSOCK_OP.shutdown;
        flags = VSOCK_SHUTDOWN.send | ((c.guestShut & VSOCK_SHUTDOWN.send) !== 0 ? VSOCK_SHUTDOWN.rcv : 0);
      }
      q.pushUsed(chain.head, this.writeConnectionHeader(chain, c, op, flags, 0));
      return true;
    }
    if (!c.hostReadable || !c.mayReceive) return false;
    const credit = c.guestCredit;
    if (credit <= 0) return false; // no credit: the guest's next packet (CREDIT_UPDATE) brings it back
    let n: number;
    try {
      n = this.readToGuest(c, q, chain, credit);
    } catch {
      this.resetConnection(c, true);
      return false;
    }
    if (n > 0) return true;
    if (n === 0) {
      c.hostReadable = false;
      this.watchHost(c);
      return false;
    }
    // The host program ended its stream: the guest reads the end of it.
    c.hostReadable = false;
    c.hostEof = true;
    c.say |= SAY.shutdown;
    return this.fill(c, q, chain);
  }

  /** A packet's header for connection `c` (with this side's credit, now told) into `chain`: the packet's length. */
  private writeConnectionHeader(chain: DescriptorChain, c: VsockConnection, op: number, flags: number, len: number): number {
    const fwdCnt = c.fwdCnt;
    this.writeHeader(chain, c.guestPort, c.hostPort, op, flags, len, c.bufAlloc, fwdCnt);
    c.fwdCntSent = fwdCnt;
    return VSOCK_HEADER + len;
  }

  /**
   * At most `credit` host bytes of `c` to the guest as RW packets, the first
   * into `chain`: with guest RAM host-mapped, one readv fills `chain` and as
   * many more of the guest's receive buffers as the credit and RX_BATCH
   * allow (a buffer the read did not reach is given back); else one packet
   * through a copy. The packets are pushed used in order. Returns the bytes
   * sent; 0: none waiting, -1: the stream ended (`chain` is still the
   * caller's either way).
   */
  private readToGuest(c: VsockConnection, q: VirtQueue, chain: DescriptorChain, credit: number): number {
    const s = c.stream;
    if (s.readHost !== undefined && this.hostPath) {
      const spans = this.spans;
      const batch = this.rxBatch; // batch[0] is `chain` (rxChain)
      const room = this.rxRoom;
      spans.clear();
      let chains = 0;
      let total = 0;
      for (;;) {
        // A chain of more than HOST_SPANS buffers: its first ones.
        const took = spans.append(batch[chains]!, true, VSOCK_HEADER, Math.min(credit - total, VSOCK_MAX_PAYLOAD));
        if (took === 0) {
          if (chains > 0) q.unpop(); // no room after its header, or no spans left: served on its own later
          break;
        }
        room[chains++] = took;
        total += took;
        if (chains === RX_BATCH || total >= credit || spans.full) break;
        if (!q.pop(batch[chains]!)) break;
      }
      if (chains > 0 && spans.toHost(chain.memory)) {
        let n: number;
        try {
          n = s.readHost(spans.host, spans.len, spans.count);
        } catch (e) {
          for (let k = 1; k < chains; k++) q.unpop();
          if (!(e instanceof RangeError)) throw e;
          this.hostUnusable(e);
          return this.copyToGuest(c, q, chain, credit);
        }
        if (n < total) this.readDry(c);
        let sent = 0;
        let packets = 0;
        const heads = this.rxHeads;
        const lens = this.rxLens;
        while (packets < chains && sent < n) {
          const len = Math.min(n - sent, room[packets]!);
          heads[packets] = batch[packets]!.head;
          lens[packets] = this.writeConnectionHeader(batch[packets]!, c, VSOCK_OP.rw, 0, len);
          sent += len;
          packets++;
        }
        if (packets > 0) {
          q.pushUsedBatch(heads, lens, packets);
          this.sent(c, sent);
        }
        for (let k = Math.max(packets, 1); k < chains; k++) q.unpop(); // the buffers it did not reach, the last popped first
        return n;
      }
      for (let k = 1; k < chains; k++) q.unpop();
    }
    return this.copyToGuest(c, q, chain, credit);
  }

  /** One RW packet into `chain` through a copy (guest RAM not host memory): as readToGuest. */
  private copyToGuest(c: VsockConnection, q: VirtQueue, chain: DescriptorChain, credit: number): number {
    const want = Math.min(chain.writableBytes - VSOCK_HEADER, credit, VSOCK_MAX_PAYLOAD);
    const n = c.stream.read(this.scratch, want);
    if (n > 0 && n < want) this.readDry(c);
    if (n > 0) {
      chain.writeTo(VSOCK_HEADER, this.scratch, 0, n);
      q.pushUsed(chain.head, this.writeConnectionHeader(chain, c, VSOCK_OP.rw, 0, n));
      this.sent(c, n);
    }
    return n;
  }

  /** A read came back short: the socket had no more (a stream socket's read stops short only then), so poll it rather than read it dry. */
  private readDry(c: VsockConnection): void {
    c.hostReadable = false;
    this.watchHost(c);
  }

  /** `n` bytes went to the guest on `c`. */
  private sent(c: VsockConnection, n: number): void {
    c.txCnt = (c.txCnt + n) >>> 0;
    this.counters.rxBytes += n;
  }

  /** A header from the host's `hostPort` to the guest's `guestPort`, into the start of `chain`. */
  private writeHeader(chain: DescriptorChain, guestPort: number, hostPort: number, op: number, flags: number, len: number, bufAlloc: number, fwdCnt: number): void {
    const h = this.headerView;
    h.setUint32(VSOCK_HDR.srcCid, VSOCK_HOST_CID, true);
    h.setUint32(VSOCK_HDR.srcCid + 4, 0, true);
    h.setUint32(VSOCK_HDR.dstCid, this.guestCid, true);
    h.setUint32(VSOCK_HDR.dstCid + 4, 0, true);
    h.setUint32(VSOCK_HDR.srcPort, hostPort, true);
    h.setUint32(VSOCK_HDR.dstPort, guestPort, true);
    h.setUint32(VSOCK_HDR.len, len, true);
    h.setUint16(VSOCK_HDR.type, VSOCK_TYPE_STREAM, true);
    h.setUint16(VSOCK_HDR.op, op, true);
    h.setUint32(VSOCK_HDR.flags, flags, true);
    h.setUint32(VSOCK_HDR.bufAlloc, bufAlloc, true);
    h.setUint32(VSOCK_HDR.fwdCnt, fwdCnt, true);
    chain.writeTo(0, this.header, 0, VSOCK_HEADER);
  }

  // --- event queue -----------------------------------------------------------------------------

  private sendEvent(): void {
    const t = this.attached;
    if (!this.resetPending || t === undefined || !t.active) return;
    const q = t.queues[2];
    if (q === undefined || !q.ready) return;
    const c = this.eventChain;
    if (!q.pop(c)) {
      q.enableNotifications();
      return;
    }
    if (c.writableBytes >= 4) {
      c.writeTo(0, this.event, 0, 4);
      q.pushUsed(c.head, 4);
      this.resetPending = false;
    } else q.pushUsed(c.head, 0);
    t.signalUsed(2);
  }

  // --- saved state -----------------------------------------------------------------------------

  save(): VirtioVsockSaved {
    return { kind: "virtio-vsock", version: 1, ...this.counters, guestCid: this.guestCid, resetPending: this.resetPending };
  }

  /**
   * After the transport restored the queues: connections are not restored
   * (their host streams are gone), so the guest is sent TRANSPORT_RESET once
   * the device runs. Another shape: PciDeviceError, before anything changed.
   */
  restore(s: SavedDeviceState): void {
    const v = s as Partial<VirtioVsockSaved>;
    if (v.kind !== "virtio-vsock" || v.version !== 1) throw new PciDeviceError("VIRTIO_VSOCK_RESTORE", `saved virtio-vsock state: ${String(v.kind)} v${String(v.version)} is not virtio-vsock v1`);
    if (!Number.isInteger(v.guestCid) || typeof v.resetPending !== "boolean") throw new PciDeviceError("VIRTIO_VSOCK_RESTORE", "saved virtio-vsock state: guestCid/resetPending of the wrong type");
    this.dropAll();
    this.resetPending = true;
  }
}

/** The virtio-vsock PCI function. */
export class VirtioVsockDevice extends VirtioPciDevice {
  readonly vsock: VirtioVsock;
  constructor(name: string, host: VsockHost, services: PciDeviceServices, opts: VirtioVsockOptions) {
    const backend = new VirtioVsock(host, opts);
    super(name, backend, services);
    this.vsock = backend;
  }
}

export function createVirtioVsock(name: string, host: VsockHost, services: PciDeviceServices, opts: VirtioVsockOptions): VirtioVsockDevice {
  return new VirtioVsockDevice(name, host, services, opts);
}
