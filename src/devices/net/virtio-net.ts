/**
 * virtio-net (virtio 1.1 spec 5.1), device id 1, on the virtio-pci transport:
 * one receive/transmit queue pair (receiveq1 = 0, transmitq1 = 1), no control
 * queue. Frames go to and come from a `NetworkPort`.
 *
 * Features offered: VIRTIO_NET_F_MAC (5.1.4: the MAC in the configuration),
 * VIRTIO_NET_F_STATUS (link up while a port is attached; `setLinkUp` changes
 * it with a configuration interrupt), VIRTIO_NET_F_MRG_RXBUF (5.1.6.3.1: a
 * received frame may span several receive chains, counted in num_buffers).
 * Every buffer starts with struct virtio_net_hdr_v1 (12 bytes, 5.1.6: the
 * num_buffers field is always present with VIRTIO_F_VERSION_1); the device
 * writes flags 0, gso_type NONE and num_buffers (1 without MRG_RXBUF), and
 * ignores the driver's transmit header (no CSUM/GSO negotiated).
 *
 * Offloads (5.1.6.2, 5.1.6.4), on a port that carries the header itself
 * (`vnetHeader`: a TAP with IFF_VNET_HDR): VIRTIO_NET_F_CSUM, HOST_TSO4,
 * HOST_TSO6, HOST_ECN (the guest sends partial checksums and 64 KiB TCP
 * frames; the header goes to the port as the guest wrote it, the kernel
 * validating it) and GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN (the
 * port's header comes to the guest with num_buffers filled in). What the
 * guest accepted is handed to the port (`setReceiveOffloads`), so the host
 * completes checksums and segments what the guest does not take. A transmit
 * header asking for an offload the guest did not negotiate drops the frame;
 * a received one the guest cannot take (left from before a reset) is
 * dropped, and DATA_VALID is cleared for a guest without GUEST_CSUM.
 *
 * Receive: the port's fd is watched; each frame is read into one reusable
 * frame buffer and copied from there into the guest's receive chain(s) (one
 * copy; the port API hands frames to a caller buffer). When the guest has no
 * receive buffer the frame is held, the port is not read any more (the host
 * queue buffers, then drops) and the device asks for a notification; new
 * buffers resume it. A frame that does not fit one chain without MRG_RXBUF, or
 * the available chains with it, waits for more buffers (or is dropped when it
 * could never fit the whole queue).
 *
 * Transmit: a port that can send from host memory (`sendHost`: TAP, the
 * datagram pair) gets the frame's spans in guest RAM (after the
 * 12-byte header) and the kernel gathers them (writev): no copy in the VMM, no
 * allocation. Otherwise (in-memory ports, RAM that is not host-mapped, more
 * than TX_GATHER_SPANS spans) the
 * chain is copied into one reusable buffer and handed to port.send. Either
 * way the chain completes at once (a frame the port refuses is dropped and
 * counted, as on a congested link).
 *
 * Malformed requests (a receive chain with no room for the header, a transmit
 * chain shorter than the header) are protocol errors: the queue fails and the
 * transport sets DEVICE_NEEDS_RESET.
 *
 * API:
 *   createVirtioNet(name, port | undefined, services, { mac, queueSize? }): VirtioNetDevice (a PciDevice)
 *   device.net: VirtioNet (counters, setLinkUp(up), close())
 */
import type { SavedDeviceState } from "../dependencies.js";
import type { FdWatch, PciDeviceServices } from "../pci/device-thread-services.js";
import { PciDeviceError } from "../pci/pci-config.js";
import { ChainSpans, DescriptorChain, type VirtQueue } from "../virtio/queue.js";
import { VirtioPciDevice, featureBit, type VirtioBackend, type VirtioTransport } from "../virtio/pci-transport.js";
import { FrameBuffer, MAX_PORT_FRAME_BYTES, type NetworkPort } from "./network-port.js";

export const VIRTIO_ID_NET = 1;

/** Feature bit numbers (5.1.3). */
export const VIRTIO_NET_F = {
  csum: 0,
  guestCsum: 1,
  mtu: 3,
  mac: 5,
  guestTso4: 7,
  guestTso6: 8,
  guestEcn: 9,
  hostTso4: 11,
  hostTso6: 12,
  hostEcn: 13,
  mrgRxbuf: 15,
  status: 16,
  ctrlVq: 17,
  ctrlRx: 18,
  mq: 22,
} as const;

/** Configuration layout (5.1.4). */
export const VIRTIO_NET_CONFIG = { mac: 0, status: 6, maxVirtqueuePairs: 8, size: 10 } as const;
export const VIRTIO_NET_S_LINK_UP = 1;
/** struct virtio_net_hdr_v1. */
export const VIRTIO_NET_HDR_BYTES = 12;
const NUM_BUFFERS_OFFSET = 10;
/** virtio_net_hdr flags and gso_type values (5.1.6). */
export const VIRTIO_NET_HDR_F = { needsCsum: 1, dataValid: 2 } as const;
export const VIRTIO_NET_HDR_GSO = { none: 0, tcpv4: 1, udp: 3, tcpv6: 4, ecn: 0x80 } as const;
/** The offload features offered on a port that carries the header. */
const OFFLOAD_FEATURES = [
  VIRTIO_NET_F.csum, VIRTIO_NET_F.guestCsum, VIRTIO_NET_F.guestTso4, VIRTIO_NET_F.guestTso6, VIRTIO_NET_F.guestEcn,
  VIRTIO_NET_F.hostTso4, VIRTIO_NET_F.hostTso6, VIRTIO_NET_F.hostEcn,
].reduce((f, bit) => f | featureBit(bit), 0n);

/** One direction's offload feature bits: what the guest sends (host_*) or takes (guest_*). */
interface OffloadBits {
  readonly csum: number;
  readonly tso4: number;
  readonly tso6: number;
  readonly ecn: number;
}
const TX_OFFLOADS: OffloadBits = { csum: VIRTIO_NET_F.csum, tso4: VIRTIO_NET_F.hostTso4, tso6: VIRTIO_NET_F.hostTso6, ecn: VIRTIO_NET_F.hostEcn };
const RX_OFFLOADS: OffloadBits = { csum: VIRTIO_NET_F.guestCsum, tso4: VIRTIO_NET_F.guestTso4, tso6: VIRTIO_NET_F.guestTso6, ecn: VIRTIO_NET_F.guestEcn };

/** Whether a header (its flags and gso_type) asks for a partial checksum or segmentation. */
function offloaded(flags: number, gso: number): boolean {
  return (flags & VIRTIO_NET_HDR_F.needsCsum) !== 0 || (gso & ~VIRTIO_NET_HDR_GSO.ecn) !== VIRTIO_NET_HDR_GSO.none;
}

const RX = 0;
const TX = 1;
/** Frames moved per readable event before yielding to the loop (the fd stays readable). */
const RX_BATCH = 256;
/** Most guest-RAM spans a transmitted frame is sent from directly (Linux uses up to MAX_SKB_FRAGS + 2 = 19); more: copied. */
const TX_GATHER_SPANS = 64;

export interface VirtioNetOptions {
  readonly mac: Uint8Array;
  /** Size of each queue (default 256). */
  readonly queueSize?: number;
  /** Offer packed virtqueues (VIRTIO_F_RING_PACKED). */
  readonly ringPacked?: boolean;
}

export interface VirtioNetCounters {
  rxFrames: number;
  rxBytes: number;
  /** Frames dropped on receive (larger than the whole receive queue can take, device not running). */
  rxDropped: number;
  /** Times the receive path paused for want of guest buffers. */
  rxWaits: number;
  txFrames: number;
  txBytes: number;
  /** Frames the port refused (peer missing, queue full) or that were too long, or sent with no port. */
  txDropped: number;
  /** Of txFrames: sent straight from guest RAM (port.sendHost), not copied first. */
  txZeroCopy: number;
  /** Of txFrames: with a partial checksum or as a segmentation-offload frame. */
  txOffloaded: number;
  /** Of rxFrames: with a partial checksum or as a segmentation-offload frame. */
  rxOffloaded: number;
}

export interface VirtioNetSaved extends SavedDeviceState {
  readonly kind: "virtio-net";
  readonly version: 1;
  readonly mac: number[];
  readonly linkUp: boolean;
}

export class VirtioNet implements VirtioBackend {
  readonly deviceId = VIRTIO_ID_NET;
  readonly classCode = 0x020000; // Ethernet controller
  readonly features: bigint;
  readonly queueMaxSizes: readonly number[];
  readonly configSize = VIRTIO_NET_CONFIG.size;
  readonly counters: VirtioNetCounters = { rxFrames: 0, rxBytes: 0, rxDropped: 0, rxWaits: 0, txFrames: 0, txBytes: 0, txDropped: 0, txZeroCopy: 0, txOffloaded: 0, rxOffloaded: 0 };

  private transport: VirtioTransport | undefined;
  private readonly config = new Uint8Array(VIRTIO_NET_CONFIG.size);
  private linkUp: boolean;
  private mergeable = false;
  /** Header bytes the device writes in front of a received frame: 12, or 0 when the port's frames carry their own. */
  private readonly lead: number;
  /** The negotiated offloads, as bits of VIRTIO_NET_F (all below 32: a number, so the per-frame checks allocate nothing; 0 until the driver is running). */
  private offloads = 0;
  private watch: FdWatch | undefined;
  private readonly onReadable = (): void => this.receive();

  // Receive: the frame being placed (held while the guest has no room for it).
  private readonly rxFrame = new FrameBuffer(MAX_PORT_FRAME_BYTES);
  private heldLength = 0;
  private readonly hdr = new Uint8Array(VIRTIO_NET_HDR_BYTES);
  /** The first chain of a frame (kept while the following chains are popped into `rxChain`). */
  private readonly firstChain = new DescriptorChain();
  private readonly rxChain = new DescriptorChain();
  /** Heads and lengths of the chains one frame is spread over (in order). */
  private readonly spreadHeads: Uint32Array;
  private readonly spreadLengths: Uint32Array;
  /** Chains popped so far for the frame being placed (mergeable; 0 = none), their writable bytes and the ring descriptors they take. */
  private spreadChains = 0;
  private spreadRoom = 0;
  private spreadSlots = 0;

  // Transmit.
  private readonly txChain = new DescriptorChain();
  private readonly txFrame = new FrameBuffer(MAX_PORT_FRAME_BYTES);
  /** Why zero-copy transmit was given up, if it was. */
  readonly notes: string[] = [];
  private gather = true;
  /** A frame's spans in guest RAM (after the header) and their host addresses, for ports that gather (sendHost). */
  private readonly txSpans = new ChainSpans(TX_GATHER_SPANS);
  /** A transmit header's flags and gso_type, read to check its offloads against the negotiated ones. */
  private readonly txHdr = new Uint8Array(2);

  constructor(
    private readonly port: NetworkPort | undefined,
    opts: VirtioNetOptions,
  ) {
    if (opts.mac.length !== 6) throw new PciDeviceError("VIRTIO_NET_BAD_MAC", `a MAC address has 6 bytes, not ${opts.mac.length}`);
    const qs = opts.queueSize ?? 256;
    this.queueMaxSizes = [qs, qs];
    this.spreadHeads = new Uint32Array(qs);
    this.spreadLengths = new Uint32Array(qs);
    this.config.set(opts.mac, VIRTIO_NET_CONFIG.mac);
    this.config[VIRTIO_NET_CONFIG.maxVirtqueuePairs] = 1;
    const vnet = port?.vnetHeader === true;
    this.lead = vnet ? 0 : VIRTIO_NET_HDR_BYTES;
    this.features = featureBit(VIRTIO_NET_F.mac) | featureBit(VIRTIO_NET_F.status) | featureBit(VIRTIO_NET_F.mrgRxbuf) | (vnet ? OFFLOAD_FEATURES : 0n);
    this.linkUp = port !== undefined;
    this.writeStatus();
  }

  private writeStatus(): void {
    this.config[VIRTIO_NET_CONFIG.status] = this.linkUp ? VIRTIO_NET_S_LINK_UP : 0;
    this.config[VIRTIO_NET_CONFIG.status + 1] = 0;
  }

  /** Report the link up or down (a configuration change interrupt when the driver runs). */
  setLinkUp(up: boolean): void {
    if (up === this.linkUp) return;
    this.linkUp = up;
    this.writeStatus();
    this.transport?.configChanged();
  }

  /** Stop watching the port (the owner closes the port itself). */
  close(): void {
    this.disarm();
  }

  attach(transport: VirtioTransport): void {
    this.transport = transport;
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + (this.config[offset + i] ?? 0);
    return v >>> 0;
  }

  writeConfig(): void {
    // The MAC is read-only for a modern driver without VIRTIO_NET_F_CTRL_MAC_ADDR (5.1.4.2).
  }

  activate(_queues: readonly VirtQueue[], features: bigint): void {
    this.mergeable = (features & featureBit(VIRTIO_NET_F.mrgRxbuf)) !== 0n;
    this.offloads = Number(features & OFFLOAD_FEATURES);
    this.tellPortOffloads();
    this.receive();
  }

  private has(bit: number): boolean {
    return (this.offloads & (1 << bit)) !== 0;
  }

  /** Whether a header's checksum request and GSO type are within the offloads negotiated for direction `d`. */
  private allows(flags: number, gso: number, d: OffloadBits): boolean {
    if ((flags & VIRTIO_NET_HDR_F.needsCsum) !== 0 && !this.has(d.csum)) return false;
    const kind = gso & ~VIRTIO_NET_HDR_GSO.ecn;
    if (kind === VIRTIO_NET_HDR_GSO.none) return true;
    if (!(kind === VIRTIO_NET_HDR_GSO.tcpv4 ? this.has(d.tso4) : kind === VIRTIO_NET_HDR_GSO.tcpv6 && this.has(d.tso6))) return false;
    return (gso & VIRTIO_NET_HDR_GSO.ecn) === 0 || this.has(d.ecn);
  }

  /** The receive offloads the guest took, to the port (none while the driver is not running). */
  private tellPortOffloads(): void {
    const port = this.port;
    if (port?.setReceiveOffloads === undefined) return;
    const F = VIRTIO_NET_F;
    try {
      port.setReceiveOffloads({ csum: this.has(F.guestCsum), tso4: this.has(F.guestTso4), tso6: this.has(F.guestTso6), ecn: this.has(F.guestEcn) });
    } catch (e) {
      // The port keeps what it had; frames the guest cannot take are dropped on receive (place()).
      this.notes.push(`receive offloads not set on ${port.name}: ${(e as Error).message}`);
    }
  }

  reset(): void {
    this.disarm();
    if (this.heldLength > 0) this.counters.rxDropped++;
    this.heldLength = 0;
    this.spreadChains = 0;
    this.mergeable = false;
    if (this.offloads !== 0) {
      this.offloads = 0;
      this.tellPortOffloads();
    }
  }

  queueNotified(index: number): void {
    if (index === TX) this.transmit();
    else if (index === RX) this.receive();
  }

  private arm(): void {
    if (this.watch === undefined && this.port !== undefined) this.watch = this.transport!.loop.watch(this.port.fd, this.onReadable);
  }

  private disarm(): void {
    this.watch?.close();
    this.watch = undefined;
  }

  // --- receive ----------------------------------------------------------------------------------

  /** The port is readable or the guest added receive buffers: move frames in. */
  private receive(): void {
    const t = this.transport!;
    const port = this.port;
    if (port === undefined) return;
    const q = t.queues[RX]!;
    if (!t.active || !q.ready) {
      // Nothing can be received now; resumed by activate() / the next notification.
      this.disarm();
      return;
    }
    let pushed = false;
    q.disableNotifications();
    let received = 0;
    for (;;) {
      if (this.heldLength === 0) {
        // The batch ends between frames, never with one held.
        if (received === RX_BATCH) break;
        const n = port.receive(this.rxFrame.bytes);
        if (n === 0) break;
        received++;
        if (this.lead === 0 && !this.receivable(n)) {
          this.counters.rxDropped++;
          continue;
        }
        this.heldLength = n;
      }
      const r = this.place(q, this.heldLength);
      if (r === "wait") {
        // No room: ask for a notification; if buffers came meanwhile, go on.
        if (!q.enableNotifications()) {
          q.disableNotifications();
          continue;
        }
        this.counters.rxWaits++;
        this.disarm();
        if (pushed) t.signalUsed(RX);
        return;
      }
      if (r === "error") {
        this.disarm();
        return;
      }
      if (r === "ok") pushed = true;
      this.heldLength = 0;
    }
    this.arm();
    if (pushed) t.signalUsed(RX);
  }

  /**
   * Put rxFrame[0..len) with its header into the guest's receive chains.
   * "wait": not enough buffers now (chains popped so far are kept for the next
   * try); "dropped": the frame can never fit; "error": the ring is broken.
   */
  private place(q: VirtQueue, len: number): "ok" | "wait" | "dropped" | "error" {
    const first = this.firstChain;
    const lead = this.lead;
    const total = lead + len;
    if (this.spreadChains === 0) {
      if (!q.pop(first)) return q.error !== undefined ? "error" : "wait";
      if (first.writableBytes < VIRTIO_NET_HDR_BYTES) {
        q.fail("VIRTIO_NET_BAD_RX_BUFFER", `receive chain ${first.head} has ${first.writableBytes} writable bytes, less than the ${VIRTIO_NET_HDR_BYTES}-byte header`);
        return "error";
      }
      if (!this.mergeable) {
        if (first.writableBytes < total) {
          // Without mergeable buffers the driver sizes its buffers for its MTU: a longer frame is dropped.
          q.unpop();
          this.counters.rxDropped++;
          return "dropped";
        }
        this.writeFirst(first, len, 1);
        q.pushUsed(first.head, total);
        this.counted(len);
        return "ok";
      }
      this.spreadHeads[0] = first.head;
      this.spreadLengths[0] = Math.min(first.writableBytes, total);
      this.spreadRoom = first.writableBytes;
      this.spreadSlots = first.ringDescriptors;
      this.spreadChains = 1;
    }
    // Mergeable: spread over as many chains as needed (5.1.6.4.2).
    const c = this.rxChain;
    while (this.spreadRoom < total) {
      // The chains held take every descriptor of the queue: no more can come. (Counting descriptors, not
      // chains: chains of several descriptors fill the queue sooner.)
      if (this.spreadSlots >= q.size) {
        // Even the whole queue is too small: give the chains back, drop the frame.
        for (let k = 0; k < this.spreadChains; k++) q.unpop();
        this.spreadChains = 0;
        this.counters.rxDropped++;
        return "dropped";
      }
      if (!q.pop(c)) return q.error !== undefined ? "error" : "wait";
      if (c.writableBytes === 0) {
        q.fail("VIRTIO_NET_BAD_RX_BUFFER", `receive chain ${c.head} has no writable bytes`);
        return "error";
      }
      const room = this.spreadRoom;
      const take = Math.min(c.writableBytes, total - room);
      c.writeTo(0, this.rxFrame.bytes, room - lead, take);
      this.spreadHeads[this.spreadChains] = c.head;
      this.spreadLengths[this.spreadChains] = take;
      this.spreadChains++;
      this.spreadRoom = room + c.writableBytes;
      this.spreadSlots += c.ringDescriptors;
    }
    const chains = this.spreadChains;
    this.spreadChains = 0;
    this.writeFirst(first, Math.min(len, first.writableBytes - lead), chains);
    // All the frame's chains at once: the driver must not see the first (whose header counts them) before the rest.
    q.pushUsedBatch(this.spreadHeads, this.spreadLengths, chains);
    this.counted(len);
    return "ok";
  }

  /**
   * The header (num_buffers = `chains`) and the frame's first `bytes` into the
   * first chain: the device's own header in front of the port's frame, or the
   * port's header (already in the frame buffer) patched in place.
   */
  private writeFirst(first: DescriptorChain, bytes: number, chains: number): void {
    const frame = this.rxFrame;
    if (this.lead === 0) {
      frame.bytes[NUM_BUFFERS_OFFSET] = chains & 0xff;
      frame.bytes[NUM_BUFFERS_OFFSET + 1] = chains >> 8;
      // The frame's own length view (cached): a whole-buffer copy into guest RAM makes no view.
      first.writeTo(0, frame.view(bytes));
      return;
    }
    this.hdr[NUM_BUFFERS_OFFSET] = chains & 0xff;
    this.hdr[NUM_BUFFERS_OFFSET + 1] = chains >> 8;
    first.writeTo(0, this.hdr);
    first.writeTo(VIRTIO_NET_HDR_BYTES, frame.view(bytes));
  }

  /**
   * A frame from a port that carries the header: whether the guest can take
   * it (its checksum and GSO within what it negotiated), DATA_VALID cleared
   * for a guest without GUEST_CSUM.
   */
  private receivable(len: number): boolean {
    const b = this.rxFrame.bytes;
    if (len < VIRTIO_NET_HDR_BYTES + 14) return false;
    if (!this.has(VIRTIO_NET_F.guestCsum)) b[0] = b[0]! & ~VIRTIO_NET_HDR_F.dataValid;
    return this.allows(b[0]!, b[1]!, RX_OFFLOADS);
  }

  private counted(len: number): void {
    this.counters.rxFrames++;
    this.counters.rxBytes += len - VIRTIO_NET_HDR_BYTES + this.lead;
    if (this.lead === 0 && offloaded(this.rxFrame.bytes[0]!, this.rxFrame.bytes[1]!)) this.counters.rxOffloaded++;
  }

  // --- transmit ---------------------------------------------------------------------------------

  private transmit(): void {
    const t = this.transport!;
    const q = t.queues[TX]!;
    const c = this.txChain;
    const buf = this.txFrame;
    do {
      q.disableNotifications();
      while (q.pop(c)) {
        if (c.readableBytes < VIRTIO_NET_HDR_BYTES) {
          q.fail("VIRTIO_NET_BAD_TX_BUFFER", `transmit chain ${c.head} has ${c.readableBytes} bytes, less than the ${VIRTIO_NET_HDR_BYTES}-byte header`);
          t.signalUsed(TX);
          return;
        }
        // What goes to the port: the frame after the header, or header and frame for a port that carries it.
        const from = this.lead;
        const len = c.readableBytes - from;
        const frameBytes = c.readableBytes - VIRTIO_NET_HDR_BYTES;
        if (frameBytes === 0 || len > buf.capacity || this.port === undefined || (from === 0 && !this.sendable(c))) this.counters.txDropped++;
        else if (!this.sendGathered(c, from, len, frameBytes)) {
          c.readFrom(from, buf.bytes, 0, len);
          if (this.port.send(buf.view(len))) {
            this.counters.txFrames++;
            this.counters.txBytes += frameBytes;
          } else this.counters.txDropped++;
        }
        q.pushUsed(c.head, 0);
      }
    } while (!q.enableNotifications());
    t.signalUsed(TX);
  }

  /**
   * Hand the frame (the chain's readable bytes after the header) to a port that
   * sends straight from host memory: no copy, no view. False when that is not
   * possible (the port or memory cannot, too many spans, the port says not now):
   * the caller copies the frame instead. True once the frame was sent or dropped.
   */
  private sendGathered(c: DescriptorChain, from: number, len: number, frameBytes: number): boolean {
    const port = this.port!;
    const spans = this.txSpans;
    if (!this.gather || port.sendHost === undefined) return false;
    if (!spans.select(c, false, from, len) || !spans.toHost(c.memory)) return false;
    let sent: boolean | undefined;
    try {
      sent = port.sendHost(spans.host, spans.len, spans.count, len);
    } catch (e) {
      // The hypervisor layer refused the spans (not memory it mapped): nothing was sent; copy from now on.
      if (!(e instanceof RangeError)) throw e;
      this.gather = false;
      this.notes.push(`guest RAM spans refused for zero-copy transmit (${e.message}); copying frames`);
      return false;
    }
    if (sent === undefined) return false;
    if (sent) {
      this.counters.txFrames++;
      this.counters.txBytes += frameBytes;
      this.counters.txZeroCopy++;
    } else this.counters.txDropped++;
    return true;
  }

  /**
   * A transmit header for a port that carries it: only the offloads the guest
   * negotiated (5.1.6.2.1: the driver MUST NOT ask for others). Counts offloaded frames.
   */
  private sendable(c: DescriptorChain): boolean {
    const h = this.txHdr;
    c.readFrom(0, h);
    const flags = h[0]!;
    const gso = h[1]!;
    if ((flags & ~VIRTIO_NET_HDR_F.needsCsum) !== 0 || !this.allows(flags, gso, TX_OFFLOADS)) return false;
    if (offloaded(flags, gso)) this.counters.txOffloaded++;
    return true;
  }

  /**
   * Before the queues are saved: give back the receive chains a frame still
   * waiting for buffers holds (the saved queue would otherwise be past
   * chains no saved state remembers: lost to the driver for good). The frame
   * stays held here and is placed again from its first chain once the save
   * is over (deferred: that takes the chains again and, still short, asks
   * for a notification at the driver's current index; until then the queue
   * would not hear of new buffers).
   */
  quiesce(): void {
    const t = this.transport;
    if (t === undefined || this.spreadChains === 0) return;
    const q = t.queues[RX]!;
    for (let k = 0; k < this.spreadChains; k++) q.unpop();
    this.spreadChains = 0;
    this.spreadRoom = 0;
    this.spreadSlots = 0;
    t.loop.defer(() => this.receive());
  }

  save(): VirtioNetSaved {
    return { kind: "virtio-net", version: 1, mac: Array.from(this.config.subarray(0, 6)), linkUp: this.linkUp };
  }
}

/** The virtio-net PCI function. */
export class VirtioNetDevice extends VirtioPciDevice {
  readonly net: VirtioNet;
  constructor(name: string, port: NetworkPort | undefined, services: PciDeviceServices, opts: VirtioNetOptions) {
    const backend = new VirtioNet(port, opts);
    super(name, backend, services, { ringPacked: opts.ringPacked === true });
    this.net = backend;
  }
}

export function createVirtioNet(name: string, port: NetworkPort | undefined, services: PciDeviceServices, opts: VirtioNetOptions): VirtioNetDevice {
  return new VirtioNetDevice(name, port, services, opts);
}
