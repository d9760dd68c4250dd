/**
 * Network ports: where a NIC model's Ethernet frames go on the host, and where
 * received ones come from. A NIC (ne2k-pci, virtio-net) owns one port; later
 * the virtual switch owns them. Frames are whole Ethernet frames without the
 * FCS, one per `send` / `receive`; a port never blocks: `send` returns false
 * when the frame was dropped (queue full, peer missing) and `receive` returns
 * 0 when nothing is pending. `fd` polls readable while frames are pending (the
 * device thread's loop watches it).
 *
 * A port may also offer `sendHost`: the frame given as spans of host memory
 * (guest RAM), sent with one writev(2), so a NIC need not copy it first.
 *
 * A port may carry a virtio-net header (`vnetHeader`): every frame sent and
 * received starts with a struct virtio_net_hdr_v1 (12 bytes), so partial
 * checksums and 64 KiB segmentation-offload frames pass through as the
 * guest's virtio-net driver and the host kernel hand them over;
 * `setReceiveOffloads` says which ones the receiving guest takes.
 *
 * Implementations:
 *  - `TapPort`: a host TAP interface (IFF_TAP|IFF_NO_PI; with
 *    `{ vnetHeader: true }` also IFF_VNET_HDR, the kernel validating every
 *    header it is given); sendHost always. `TapPort.openQueues` opens the
 *    queues of a multi-queue interface (IFF_MULTI_QUEUE), a port each, for a
 *    multi-queue virtio-net.
 *  - `DatagramPairPort`: two VMs wired back to back through AF_UNIX datagram
 *    sockets: each binds its own path and sends to the peer's path. Frames to a
 *    peer that is not there (not started yet, exited) are dropped and counted;
 *    the peer may come and go, and is reached as soon as it is back. sendHost
 *    always.
 *  - `MemoryPortPair`: two ports joined in memory (tests, benchmarks), with an
 *    eventfd as the pollable descriptor; optionally carrying headers.
 *
 * DEVNOTE: a DatagramPairPort has two sockets. It receives on one bound to
 * its path and never connected, and sends on another, unbound, that it
 * connects to the peer once a frame got through (sends then skip the path
 * lookup: 10-25% more frames per second in virtio-net-host than addressing
 * each frame by path, measured in the eighth session).
 * When the peer's socket disappears (ECONNREFUSED) it goes back to
 * addressing by path. One socket for both would not do: a connected socket
 * refuses datagrams from anyone but its peer (EPERM in unix_may_send), so a
 * restarted peer could not reach this end until this end had sent again.
 * With two, either end may restart and is reached at once, both ways.
 *
 * DEVNOTE: AF_UNIX datagram receivers queue at most net.unix.max_dgram_qlen
 * datagrams (10 by default); beyond that the sender sees EAGAIN and the frame
 * counts as dropped (`txDropped`), as a full switch port would drop it.
 */
import { PartisError } from "../../errors.js";
import { EventFd } from "../../hypervisor/eventfd.js";
import {
  closeDescriptor,
  openDatagramSocket,
  setTapOffloads,
  setTapQueueAttached,
  openTap,
  readFrame,
  receiveDatagram,
  removeSocketPath,
  connectDatagram,
  openDatagramSender,
  sendDatagram,
  sendDatagramHost,
  sendDatagramHostTo,
  sendDatagramTo,
  writeFrame,
  writeFrameHost,
  type SendRefusal,
  type TapOffloads,
  type UnixSocketAddress,
} from "../../hypervisor/host-network.js";

export type { TapOffloads as ReceiveOffloads } from "../../hypervisor/host-network.js";

export class NetworkPortError extends PartisError {}

/**
 * Largest frame a port carries: a 64 KiB IP packet (a jumbo frame, or a TSO
 * frame before segmentation) with its Ethernet and VLAN headers and a
 * virtio-net header, rounded up.
 */
export const MAX_PORT_FRAME_BYTES = 65_600;

export interface NetworkPort {
  readonly name: string;
  /** Polls readable while received frames are pending. */
  readonly fd: number;
  /** Frames sent and received start with a 12-byte struct virtio_net_hdr_v1 (checksum and segmentation offloads pass through). */
  readonly vnetHeader?: boolean;
  /** With vnetHeader: the offloads the receiver takes; frames it receives then use no others. */
  setReceiveOffloads?(offloads: TapOffloads): void;
  /**
   * One queue of a multi-queue port (a multi-queue TAP): whether the host
   * steers frames to it. A NIC turns off the queues its driver does not use,
   * so no flow's frames wait where nobody reads them.
   */
  setQueueEnabled?(enabled: boolean): void;
  /** Queue one frame for the wire. False when it was dropped. */
  send(frame: Uint8Array): boolean;
  /**
   * Optional zero-copy send: queue one frame of `length` bytes gathered from
   * `count` host-memory spans (guest RAM, from GuestMemory.hostAddresses),
   * without copying it into a buffer first. True when sent, false when
   * dropped (counted as for `send`), undefined when this port cannot send
   * that way now: the caller copies the frame and calls `send`.
   */
  sendHost?(addresses: Float64Array, lengths: Uint32Array, count: number, length: number): boolean | undefined;
  /**
   * Copy the next received frame into `buf`; its length, 0 when none is pending.
   * Frames that do not fit are dropped (for a TAP, one that fills `buf` exactly
   * counts as not fitting: pass a buffer of MAX_PORT_FRAME_BYTES).
   */
  receive(buf: Uint8Array): number;
  close(): void;
}

/** Frame and byte counters every port keeps (plain numbers, read by stats/monitoring). */
export class PortCounters {
  txFrames = 0;
  txBytes = 0;
  /** Frames `send` could not deliver (queue full, peer missing, interface down). */
  txDropped = 0;
  /** Of txDropped: no peer listening (DatagramPairPort). */
  txNoPeer = 0;
  rxFrames = 0;
  rxBytes = 0;
  /** Received frames dropped because they did not fit the caller's buffer. */
  rxOversize = 0;
}

/** A host TAP interface (created, or attached to when it exists and is persistent). */
export class TapPort implements NetworkPort {
  readonly counters = new PortCounters();
  private closed = false;

  /** Of a multi-queue interface: whether the kernel steers frames to this queue. */
  private attached = true;

  private constructor(
    readonly name: string,
    readonly fd: number,
    readonly interfaceName: string,
    readonly vnetHeader: boolean,
    /** One queue of a multi-queue interface (IFF_MULTI_QUEUE). */
    readonly multiQueue = false,
  ) {}

  /**
   * `count` queues of one multi-queue TAP interface (`ifname` as for open;
   * the kernel's pick when omitted), one port each, all attached. With a
   * count of 1 this is `open`: a single-queue interface.
   */
  static openQueues(ifname: string | undefined, count: number, opts: { vnetHeader?: boolean } = {}): TapPort[] {
    if (!Number.isInteger(count) || count < 1) throw new NetworkPortError("NET_PORT_BAD_QUEUES", `a TAP interface has 1 or more queues, not ${count}`, { interface: ifname ?? "" });
    if (count === 1) return [TapPort.open(ifname, opts)];
    const vnet = opts.vnetHeader === true;
    const ports: TapPort[] = [];
    try {
      for (let i = 0; i < count; i++) {
        const name = i === 0 ? ifname : ports[0]!.interfaceName;
        const tap = openTap({ ...(name === undefined ? {} : { name }), vnetHeader: vnet, multiQueue: true });
        ports.push(new TapPort(`tap:${tap.name}#${i}`, tap.fd, tap.name, vnet, true));
      }
      // The offload flags belong to the interface: one call covers every queue.
      if (vnet) setTapOffloads(ports[0]!.fd, { csum: false, tso4: false, tso6: false, ecn: false }, ports[0]!.interfaceName);
    } catch (e) {
      for (const p of ports) p.close();
      throw e;
    }
    return ports;
  }

  /**
   * Open `/dev/net/tun` as interface `ifname` ("tap%d" or omitted: the kernel
   * picks). With `vnetHeader`, frames carry a virtio-net header and the
   * receiver takes no offloads until setReceiveOffloads says otherwise.
   */
  static open(ifname?: string, opts: { vnetHeader?: boolean } = {}): TapPort {
    const vnet = opts.vnetHeader === true;
    const tap = openTap({ ...(ifname === undefined ? {} : { name: ifname }), vnetHeader: vnet });
    const port = new TapPort(`tap:${tap.name}`, tap.fd, tap.name, vnet);
    if (vnet) {
      try {
        setTapOffloads(tap.fd, { csum: false, tso4: false, tso6: false, ecn: false }, tap.name);
      } catch (e) {
        port.close();
        throw e;
      }
    }
    return port;
  }

  setReceiveOffloads(offloads: TapOffloads): void {
    if (!this.vnetHeader || this.closed) return;
    setTapOffloads(this.fd, offloads, this.interfaceName);
  }

  setQueueEnabled(enabled: boolean): void {
    if (!this.multiQueue || this.closed || enabled === this.attached) return;
    setTapQueueAttached(this.fd, enabled, this.interfaceName);
    this.attached = enabled;
  }

  send(frame: Uint8Array): boolean {
    if (this.closed || frame.length === 0) return false;
    if (writeFrame(this.fd, frame, frame.length)) {
      this.counters.txFrames++;
      this.counters.txBytes += frame.length;
      return true;
    }
    this.counters.txDropped++;
    return false;
  }

  sendHost(addresses: Float64Array, lengths: Uint32Array, count: number, length: number): boolean {
    if (this.closed || length === 0) return false;
    if (writeFrameHost(this.fd, addresses, lengths, count)) {
      this.counters.txFrames++;
      this.counters.txBytes += length;
      return true;
    }
    this.counters.txDropped++;
    return false;
  }

  receive(buf: Uint8Array): number {
    if (this.closed) return 0;
    for (;;) {
      const n = readFrame(this.fd, buf);
      if (n <= 0) return 0;
      if (n >= buf.length) {
        // read(2) on a TAP truncates to the buffer: a frame that filled it may have been longer.
        this.counters.rxOversize++;
        continue;
      }
      this.counters.rxFrames++;
      this.counters.rxBytes += n;
      return n;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeDescriptor(this.fd);
  }
}

/**
 * One end of a back-to-back link between two VMs: binds `localPath`, sends
 * each frame as one datagram to `peerPath`. Either end may start first.
 */
export class DatagramPairPort implements NetworkPort {
  readonly counters = new PortCounters();
  private closed = false;
  /** The sending socket is connected to the peer's (fast path); dropped when that socket goes away. */
  private connected = false;

  private constructor(
    readonly name: string,
    /** The receiving socket, bound to the local path (polled). */
    readonly fd: number,
    /** The sending socket: unbound, connected to the peer while it is there. */
    private readonly sender: number,
    private readonly local: UnixSocketAddress,
    private readonly peer: UnixSocketAddress,
  ) {}

  static open(localPath: string, peerPath: string): DatagramPairPort {
    if (localPath === peerPath) throw new NetworkPortError("NET_PORT_SAME_PATH", `datagram port: local and peer paths are both ${localPath}`, { path: localPath });
    // 4 MiB of socket buffer: room for a burst of full-size frames (the queue length limit still applies).
    const s = openDatagramSocket({ localPath, peerPath, bufferBytes: 4 << 20 });
    let sender: number;
    try {
      sender = openDatagramSender({ peerPath, bufferBytes: 4 << 20 });
    } catch (e) {
      closeDescriptor(s.fd);
      if (!s.local.abstract) removeSocketPath(s.local.path);
      throw e;
    }
    return new DatagramPairPort(`dgram:${localPath}`, s.fd, sender, s.local, s.peer!);
  }

  send(frame: Uint8Array): boolean {
    if (this.closed || frame.length === 0) return false;
    let r: true | SendRefusal = "no-peer";
    if (this.connected) {
      r = sendDatagram(this.sender, frame, frame.length);
      // The peer socket went away (the kernel dropped the association): address it by path again.
      if (r === "no-peer") this.connected = false;
    }
    if (!this.connected) {
      r = sendDatagramTo(this.sender, this.peer, frame, frame.length);
      // Someone is there: connect, so the next sends skip the path lookup.
      if (r === true) this.connected = connectDatagram(this.sender, this.peer);
    }
    return this.sent(r, frame.length);
  }

  /** The frame straight from host memory: writev while connected, else sendmsg to the peer's path (then connect). */
  sendHost(addresses: Float64Array, lengths: Uint32Array, count: number, length: number): boolean {
    if (this.closed || length === 0) return false;
    let r: true | SendRefusal = "no-peer";
    if (this.connected) {
      r = sendDatagramHost(this.sender, addresses, lengths, count);
      if (r === "no-peer") this.connected = false;
    }
    if (!this.connected) {
      r = sendDatagramHostTo(this.sender, this.peer, addresses, lengths, count);
      if (r === true) this.connected = connectDatagram(this.sender, this.peer);
    }
    return this.sent(r, length);
  }

  private sent(r: true | SendRefusal, length: number): boolean {
    if (r === true) {
      this.counters.txFrames++;
      this.counters.txBytes += length;
      return true;
    }
    return this.refused(r);
  }

  private refused(r: SendRefusal): false {
    this.counters.txDropped++;
    if (r === "no-peer") this.counters.txNoPeer++;
    return false;
  }

  receive(buf: Uint8Array): number {
    if (this.closed) return 0;
    for (;;) {
      const n = receiveDatagram(this.fd, buf);
      if (n < 0) return 0;
      if (n === 0) continue; // an empty datagram is not a frame
      if (n > buf.length) {
        this.counters.rxOversize++;
        continue;
      }
      this.counters.rxFrames++;
      this.counters.rxBytes += n;
      return n;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeDescriptor(this.fd);
    closeDescriptor(this.sender);
    if (!this.local.abstract) removeSocketPath(this.local.path);
  }
}

/** Capacity of each direction of a `MemoryPortPair` (frames). */
const MEMORY_QUEUE_FRAMES = 256;

/** One end of a `MemoryPortPair`. */
export class MemoryPort implements NetworkPort {
  readonly counters = new PortCounters();
  /** Frames queued for this end to receive, in slots reused round-robin. */
  private readonly slots: Uint8Array[] = [];
  private readonly lengths: Int32Array;
  private head = 0;
  private count = 0;
  private readonly event: EventFd;
  private signalled = false;
  /** Set by the pair. */
  peer: MemoryPort | undefined;
  private closed = false;
  /** What the last setReceiveOffloads said (vnetHeader pairs; tests read it). */
  receiveOffloads: TapOffloads | undefined;

  constructor(
    readonly name: string,
    readonly capacity = MEMORY_QUEUE_FRAMES,
    readonly vnetHeader = false,
  ) {
    this.lengths = new Int32Array(capacity);
    for (let i = 0; i < capacity; i++) this.slots.push(new Uint8Array(0));
    this.event = EventFd.create({ nonBlocking: true });
  }

  get fd(): number {
    return this.event.fd;
  }

  setReceiveOffloads(offloads: TapOffloads): void {
    this.receiveOffloads = offloads;
  }

  /** Frames waiting to be received at this end. */
  get pending(): number {
    return this.count;
  }

  /** Put a frame in this end's receive queue (as if it came from the wire). False when the queue is full. */
  inject(frame: Uint8Array): boolean {
    if (this.closed || this.count === this.capacity || frame.length === 0 || frame.length > MAX_PORT_FRAME_BYTES) return false;
    const i = (this.head + this.count) % this.capacity;
    let slot = this.slots[i]!;
    if (slot.length < frame.length) {
      // Grows once per slot to the largest frame seen (not per frame).
      slot = new Uint8Array(Math.max(frame.length, 2048));
      this.slots[i] = slot;
    }
    slot.set(frame);
    this.lengths[i] = frame.length;
    this.count++;
    if (!this.signalled) {
      this.signalled = true;
      this.event.signal(1);
    }
    return true;
  }

  send(frame: Uint8Array): boolean {
    const p = this.peer;
    if (this.closed || p === undefined || !p.inject(frame)) {
      this.counters.txDropped++;
      if (p === undefined || p.closed) this.counters.txNoPeer++;
      return false;
    }
    this.counters.txFrames++;
    this.counters.txBytes += frame.length;
    return true;
  }

  receive(buf: Uint8Array): number {
    while (this.count > 0) {
      const i = this.head;
      const n = this.lengths[i]!;
      this.head = (this.head + 1) % this.capacity;
      this.count--;
      if (this.count === 0 && this.signalled) {
        this.signalled = false;
        this.event.take();
      }
      if (n > buf.length) {
        this.counters.rxOversize++;
        continue;
      }
      buf.set(this.slots[i]!.subarray(0, n));
      this.counters.rxFrames++;
      this.counters.rxBytes += n;
      return n;
    }
    return 0;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.count = 0;
    this.event.close();
  }
}

/** Two ports joined in memory: what one sends, the other receives. */
export class MemoryPortPair {
  readonly a: MemoryPort;
  readonly b: MemoryPort;
  /** `vnetHeader`: both ends carry virtio-net headers, passed through untouched (tests of offloads). */
  constructor(name = "mem", capacity = MEMORY_QUEUE_FRAMES, opts: { vnetHeader?: boolean } = {}) {
    this.a = new MemoryPort(`${name}:a`, capacity, opts.vnetHeader === true);
    this.b = new MemoryPort(`${name}:b`, capacity, opts.vnetHeader === true);
    this.a.peer = this.b;
    this.b.peer = this.a;
  }
  close(): void {
    this.a.close();
    this.b.close();
  }
}

/**
 * A reusable frame buffer that hands out `subarray` views by length, cached,
 * so a NIC can pass `port.send(buffer.view(n))` without allocating a view per
 * frame. The cache is two-way set-associative (VIEW_SLOTS views in sets of
 * two, chosen by length, the less recently used one replaced): a length
 * allocates its view once while at most one other length of its set is in
 * use (1514 and 490 share a set and keep their views), and a guest sending
 * every length from 0 to 64 KiB holds at most VIEW_SLOTS views per buffer
 * (two per queue pair), not one per length.
 */
export class FrameBuffer {
  static readonly VIEW_SLOTS = 1024;
  private static readonly SETS = FrameBuffer.VIEW_SLOTS / 2;
  readonly bytes: Uint8Array;
  /** Set i holds ways 2i and 2i+1; a view's own length says which length it is. */
  private readonly views: (Uint8Array | undefined)[] = new Array<Uint8Array | undefined>(FrameBuffer.VIEW_SLOTS).fill(undefined);
  /** Per set: the way used last (the other is replaced on a miss). */
  private readonly lastWay = new Uint8Array(FrameBuffer.SETS);

  constructor(readonly capacity: number) {
    this.bytes = new Uint8Array(capacity);
  }

  /** The first `length` bytes (0 <= length <= capacity). */
  view(length: number): Uint8Array {
    const set = length & (FrameBuffer.SETS - 1);
    const first = set << 1;
    const views = this.views;
    let v = views[first];
    if (v !== undefined && v.length === length) {
      this.lastWay[set] = 0;
      return v;
    }
    v = views[first + 1];
    if (v !== undefined && v.length === length) {
      this.lastWay[set] = 1;
      return v;
    }
    // A miss; a length no view can have (negative, fractional, too long) always is one.
    if (!Number.isInteger(length) || length < 0 || length > this.capacity) throw new RangeError(`FrameBuffer.view: ${length} is outside 0..${this.capacity}`);
    const way = this.lastWay[set]! ^ 1;
    v = this.bytes.subarray(0, length);
    views[first + way] = v;
    this.lastWay[set] = way;
    return v;
  }

  /** Views held now (at most VIEW_SLOTS). */
  get cachedViews(): number {
    let n = 0;
    for (const v of this.views) if (v !== undefined) n++;
    return n;
  }
}
