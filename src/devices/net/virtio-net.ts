/**
 * virtio-net (virtio 1.2 spec 5.1), device id 1, on the virtio-pci transport:
 * N receive/transmit queue pairs (receiveqK = 2(K-1), transmitqK = 2(K-1)+1)
 * and a control queue (2N with VIRTIO_NET_F_MQ negotiated, else 2). Each pair
 * has its own `NetworkPort` (the queues of a multi-queue TAP), or all share
 * the single port a NIC has otherwise (then N = 1).
 *
 * Features offered: VIRTIO_NET_F_MAC (5.1.4: the MAC in the configuration),
 * VIRTIO_NET_F_STATUS (link up while a port is attached; `setLinkUp` changes
 * it with a configuration interrupt), VIRTIO_NET_F_MRG_RXBUF (5.1.6.3.1: a
 * received frame may span several receive chains, counted in num_buffers),
 * VIRTIO_NET_F_MTU when an MTU is configured, and the control queue with
 * what it carries (5.1.6.5):
 *  - CTRL_RX, CTRL_RX_EXTRA: promiscuous and the all/no receive modes, and
 *    the unicast and multicast address tables (receive-filter.ts);
 *  - CTRL_MAC_ADDR: the driver sets the address the device answers to (also
 *    in the configuration; the configured one comes back on reset);
 *  - CTRL_VLAN: the VLAN id table tagged frames are filtered by;
 *  - GUEST_ANNOUNCE: `announce()` asks the driver to announce itself on the
 *    network (gratuitous ARP, unsolicited neighbour advertisements) with the
 *    ANNOUNCE status bit, cleared by its ack; done after a restore;
 *  - MQ (with more than one port): VQ_PAIRS_SET picks how many pairs the
 *    driver uses; the ports of pairs beyond that are turned off
 *    (`setQueueEnabled`), so the host steers no flow to them (5.1.6.5.6: the
 *    multi-queue TAP steers a flow's frames to the queue that sent last on
 *    it, which is the spec's automatic receive steering);
 *  - CTRL_GUEST_OFFLOADS (on a port that carries the header): the driver turns
 *    receive offloads it negotiated off and on again (e.g. for XDP, or GRO_HW
 *    through ethtool).
 * A command the device does not know, or with data of the wrong size or out
 * of range, is answered VIRTIO_NET_ERR; a control chain with no room for the
 * ack is a protocol error.
 *
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
 * Receive: each pair's port fd is watched; each frame is read into the pair's
 * reusable frame buffer, checked against the receive filter (and the MTU),
 * and copied from there into the guest's receive chain(s) (one copy; the port
 * API hands frames to a caller buffer). When the guest has no receive buffer
 * the frame is held, the port is not read any more (the host queue buffers,
 * then drops) and the device asks for a notification; new buffers resume it.
 * A frame that does not fit one chain without MRG_RXBUF, or the available
 * chains with it, waits for more buffers (or is dropped when it could never
 * fit the whole queue).
 *
 * Transmit: a port that can send from host memory (`sendHost`: TAP, the
 * datagram pair) gets the frame's spans in guest RAM (after the
 * 12-byte header) and the kernel gathers them (writev): no copy in the VMM, no
 * allocation. Otherwise (in-memory ports, RAM that is not host-mapped, more
 * than TX_GATHER_SPANS spans) the
 * chain is copied into one reusable buffer and handed to port.send. Either
 * way the chain completes at once (a frame the port refuses is dropped and
 * counted, as on a congested link). transmitqK sends on pair K's port.
 *
 * Malformed requests (a receive chain with no room for the header, a transmit
 * chain shorter than the header, a control chain without the class, command
 * and ack bytes) are protocol errors: the queue fails and the transport sets
 * DEVICE_NEEDS_RESET.
 *
 * API:
 *   createVirtioNet(name, ports: NetworkPort | readonly NetworkPort[] | undefined, services, { mac, queueSize?, mtu? }): VirtioNetDevice (a PciDevice)
 *   device.net: VirtioNet (counters, queuePairs, setLinkUp(up), announce(), close())
 */
import type { SavedDeviceState } from "../dependencies.js";
import type { FdWatch, PciDeviceServices } from "../pci/device-thread-services.js";
import { PciDeviceError } from "../pci/pci-config.js";
import { ChainSpans, DescriptorChain, type VirtQueue } from "../virtio/queue.js";
import { VirtioPciDevice, featureBit, type VirtioBackend, type VirtioTransport } from "../virtio/pci-transport.js";
import { FrameBuffer, MAX_PORT_FRAME_BYTES, type NetworkPort } from "./network-port.js";
import { MAC_TABLE_ENTRIES, RECEIVE_MODES, ReceiveFilter, checkReceiveFilterState, isByteArray, type ReceiveFilterState } from "./receive-filter.js";
import { DeviceAlarm, TokenBucket, monotonicClock, type Clock } from "../io-limits.js";

export const VIRTIO_ID_NET = 1;

/** Feature bit numbers (5.1.3). */
export const VIRTIO_NET_F = {
  csum: 0,
  guestCsum: 1,
  ctrlGuestOffloads: 2,
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
  ctrlVlan: 19,
  ctrlRxExtra: 20,
  guestAnnounce: 21,
  mq: 22,
  ctrlMacAddr: 23,
} as const;

/** Configuration layout (5.1.4). */
export const VIRTIO_NET_CONFIG = { mac: 0, status: 6, maxVirtqueuePairs: 8, mtu: 10, size: 10, sizeWithMtu: 12 } as const;
export const VIRTIO_NET_S_LINK_UP = 1;
export const VIRTIO_NET_S_ANNOUNCE = 2;
/** struct virtio_net_hdr_v1. */
export const VIRTIO_NET_HDR_BYTES = 12;
const NUM_BUFFERS_OFFSET = 10;
/** virtio_net_hdr flags and gso_type values (5.1.6). */
export const VIRTIO_NET_HDR_F = { needsCsum: 1, dataValid: 2 } as const;
export const VIRTIO_NET_HDR_GSO = { none: 0, tcpv4: 1, udp: 3, tcpv6: 4, ecn: 0x80 } as const;

/** Control queue classes and commands (5.1.6.5), and the ack values. */
export const VIRTIO_NET_CTRL = {
  rx: 0,
  mac: 1,
  macTableSet: 0,
  macAddrSet: 1,
  vlan: 2,
  vlanAdd: 0,
  vlanDel: 1,
  announce: 3,
  announceAck: 0,
  mq: 4,
  mqVqPairsSet: 0,
  guestOffloads: 5,
  guestOffloadsSet: 0,
  ok: 0,
  err: 1,
} as const;

/** Most queue pairs a device offers (Linux takes up to 256; QEMU's default limit is 1024 queues). */
export const VIRTIO_NET_MAX_QUEUE_PAIRS = 64;
/** Size of the control queue. */
const CONTROL_QUEUE_SIZE = 64;

/** The offload features offered on a port that carries the header. */
const OFFLOAD_FEATURES = [
  VIRTIO_NET_F.csum, VIRTIO_NET_F.guestCsum, VIRTIO_NET_F.guestTso4, VIRTIO_NET_F.guestTso6, VIRTIO_NET_F.guestEcn,
  VIRTIO_NET_F.hostTso4, VIRTIO_NET_F.hostTso6, VIRTIO_NET_F.hostEcn,
].reduce((f, bit) => f | featureBit(bit), 0n);
/** The receive offloads CTRL_GUEST_OFFLOADS may turn off and on (as bits of a number: all below 32). */
const GUEST_OFFLOAD_BITS = (1 << VIRTIO_NET_F.guestCsum) | (1 << VIRTIO_NET_F.guestTso4) | (1 << VIRTIO_NET_F.guestTso6) | (1 << VIRTIO_NET_F.guestEcn);
/** Features that need the control queue (5.1.3.1), and CTRL_RX_EXTRA needs CTRL_RX. */
const NEEDS_CONTROL_QUEUE = [VIRTIO_NET_F.ctrlRx, VIRTIO_NET_F.ctrlVlan, VIRTIO_NET_F.guestAnnounce, VIRTIO_NET_F.mq, VIRTIO_NET_F.ctrlMacAddr, VIRTIO_NET_F.ctrlGuestOffloads].reduce(
  (f, bit) => f | featureBit(bit),
  0n,
);

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

/** Frames moved per readable event before yielding to the loop (the fd stays readable). */
const RX_BATCH = 256;
/** Most guest-RAM spans a transmitted frame is sent from directly (Linux uses up to MAX_SKB_FRAGS + 2 = 19); more: copied. */
const TX_GATHER_SPANS = 64;

export interface VirtioNetOptions {
  readonly mac: Uint8Array;
  /** Size of each receive and transmit queue (default 256). */
  readonly queueSize?: number;
  /** Offer packed virtqueues (VIRTIO_F_RING_PACKED). */
  readonly ringPacked?: boolean;
  /** The link's MTU, offered as VIRTIO_NET_F_MTU (68-65535): the guest uses it, longer received frames are dropped. */
  readonly mtu?: number;
  /**
   * Most bytes per second the NIC moves each way (frames without their
   * virtio-net header): past it, transmit chains wait in the guest's ring and
   * the port is not read (the host queue buffers, then drops) until the
   * device's alarm (io-limits.ts).
   */
  readonly rateBytesPerSecond?: number;
  /** The rate limit's millisecond clock (tests give their own). */
  readonly clock?: Clock;
}

export interface VirtioNetCounters {
  rxFrames: number;
  rxBytes: number;
  /** Frames dropped on receive (larger than the whole receive queue can take, device not running, pair turned off). */
  rxDropped: number;
  /** Frames the receive filter (address, mode, VLAN) or the MTU kept from the guest. */
  rxFiltered: number;
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
  /** Control commands answered OK and answered ERR. */
  controlOk: number;
  controlErr: number;
  /** Times transmitting or receiving stopped for the rate limit. */
  throttled: number;
}

export interface VirtioNetSaved extends SavedDeviceState {
  readonly kind: "virtio-net";
  readonly version: 2;
  readonly mac: number[];
  readonly linkUp: boolean;
  /** Queue pairs the driver enabled (VQ_PAIRS_SET). */
  readonly queuePairs: number;
  readonly filter: ReceiveFilterState;
  /** The receive offloads in force (CTRL_GUEST_OFFLOADS may have turned some off), as VIRTIO_NET_F bits. */
  readonly guestOffloads: number;
  readonly announcing: boolean;
}

/** What one receive/transmit pair keeps: its port, its watch, the frame being received and the transmit scratch. */
class QueuePair {
  watch: FdWatch | undefined;
  // Receive: the frame being placed (held while the guest has no room for it).
  readonly rxFrame = new FrameBuffer(MAX_PORT_FRAME_BYTES);
  heldLength = 0;
  /** The first chain of a frame (kept while the following chains are popped into `rxChain`). */
  readonly firstChain = new DescriptorChain();
  readonly rxChain = new DescriptorChain();
  /** Heads and lengths of the chains one frame is spread over (in order). */
  readonly spreadHeads: Uint32Array;
  readonly spreadLengths: Uint32Array;
  /** Chains popped so far for the frame being placed (mergeable; 0 = none), their writable bytes and the ring descriptors they take. */
  spreadChains = 0;
  spreadRoom = 0;
  spreadSlots = 0;
  // Transmit.
  readonly txChain = new DescriptorChain();
  readonly txFrame = new FrameBuffer(MAX_PORT_FRAME_BYTES);
  /** A frame's spans in guest RAM (after the header) and their host addresses, for ports that gather (sendHost). */
  readonly txSpans = new ChainSpans(TX_GATHER_SPANS);
  /** Frames this pair received into the guest and sent for it. */
  rxFrames = 0;
  txFrames = 0;
  readonly onReadable: () => void;

  constructor(
    readonly index: number,
    readonly port: NetworkPort | undefined,
    queueSize: number,
    receive: (p: QueuePair) => void,
  ) {
    this.spreadHeads = new Uint32Array(queueSize);
    this.spreadLengths = new Uint32Array(queueSize);
    this.onReadable = () => receive(this);
  }

  get rxQueue(): number {
    return 2 * this.index;
  }

  get txQueue(): number {
    return 2 * this.index + 1;
  }
}

export class VirtioNet implements VirtioBackend {
  readonly deviceId = VIRTIO_ID_NET;
  readonly classCode = 0x020000; // Ethernet controller
  readonly features: bigint;
  readonly queueMaxSizes: readonly number[];
  readonly configSize: number;
  readonly counters: VirtioNetCounters = {
    rxFrames: 0, rxBytes: 0, rxDropped: 0, rxFiltered: 0, rxWaits: 0, txFrames: 0, txBytes: 0, txDropped: 0, txZeroCopy: 0, txOffloaded: 0, rxOffloaded: 0, controlOk: 0, controlErr: 0, throttled: 0,
  };
  /** The rate limit each way (undefined: none), and the alarm that resumes what it stopped (made at attach). */
  readonly txLimit: TokenBucket | undefined;
  readonly rxLimit: TokenBucket | undefined;
  alarm: DeviceAlarm | undefined;
  /** Why zero-copy transmit was given up, or a port setting failed, if it did. */
  readonly notes: string[] = [];
  /** The address filter the driver programs through the control queue. */
  readonly filter: ReceiveFilter;

  private transport: VirtioTransport | undefined;
  private readonly config: Uint8Array;
  private readonly mac: Uint8Array;
  private readonly mtu: number | undefined;
  private linkUp: boolean;
  private mergeable = false;
  /** Header bytes the device writes in front of a received frame: 12, or 0 when the port's frames carry their own. */
  private readonly lead: number;
  /** The negotiated offloads, as bits of VIRTIO_NET_F (all below 32: a number, so the per-frame checks allocate nothing; 0 until the driver is running). */
  private offloads = 0;
  private readonly pairs: readonly QueuePair[];
  /** Pairs the driver uses (1 until VQ_PAIRS_SET), and those its negotiated features allow (1 without MQ). */
  private activePairs = 1;
  private usablePairs = 1;
  /** The control queue's index; -1 without VIRTIO_NET_F_CTRL_VQ negotiated. */
  private controlQueue = -1;
  /** The receive filter applies (CTRL_RX or CTRL_VLAN negotiated). */
  private filtering = false;
  private readonly receive = (p: QueuePair): void => this.receiveOn(p);
  private readonly clock: Clock;
  /** The rate limit stopped transmitting / receiving (until the alarm), and the pair it stopped at: the alarm starts at the next one, so that every pair gets its turn. */
  private txHeld = false;
  private rxHeld = false;
  private txStoppedAt = 0;
  private rxStoppedAt = 0;
  /** A restored driver's pairs, receive offloads and announcement, applied when the transport activates the device (before it receives a frame). */
  private restored: { readonly pairs: number; readonly guestOffloads: number; readonly announcing: boolean } | undefined;

  private readonly hdr = new Uint8Array(VIRTIO_NET_HDR_BYTES);
  private gather = true;
  /** A transmit header's flags and gso_type, read to check its offloads against the negotiated ones. */
  private readonly txHdr = new Uint8Array(2);
  // Control queue scratch: one chain, the class/command bytes, the command data and the ack.
  private readonly controlChain = new DescriptorChain();
  private readonly controlHead = new Uint8Array(2);
  private readonly controlData = new Uint8Array(8);
  private readonly controlTable = new Uint8Array(6 * MAC_TABLE_ENTRIES);
  private readonly ack = new Uint8Array(1);

  /** `ports`: one per queue pair (the queues of a multi-queue TAP), or one, or none (link down). */
  constructor(
    ports: NetworkPort | readonly NetworkPort[] | undefined,
    opts: VirtioNetOptions,
  ) {
    if (opts.mac.length !== 6) throw new PciDeviceError("VIRTIO_NET_BAD_MAC", `a MAC address has 6 bytes, not ${opts.mac.length}`);
    const list: readonly NetworkPort[] = ports === undefined ? [] : Array.isArray(ports) ? ports : [ports as NetworkPort];
    if (list.length > VIRTIO_NET_MAX_QUEUE_PAIRS) throw new PciDeviceError("VIRTIO_NET_BAD_QUEUES", `virtio-net takes up to ${VIRTIO_NET_MAX_QUEUE_PAIRS} queue pairs, not ${list.length}`);
    if (list.some((p) => p.vnetHeader !== list[0]!.vnetHeader)) throw new PciDeviceError("VIRTIO_NET_MIXED_PORTS", "the ports of one virtio-net either all carry the virtio-net header or none does");
    if (opts.mtu !== undefined && (!Number.isInteger(opts.mtu) || opts.mtu < 68 || opts.mtu > 65535)) throw new PciDeviceError("VIRTIO_NET_BAD_MTU", `an MTU is 68-65535 bytes, not ${opts.mtu}`);
    const qs = opts.queueSize ?? 256;
    const pairCount = Math.max(1, list.length);
    this.pairs = Array.from({ length: pairCount }, (_, i) => new QueuePair(i, list[i], qs, this.receive));
    this.queueMaxSizes = [...Array.from({ length: 2 * pairCount }, () => qs), CONTROL_QUEUE_SIZE];
    this.mac = opts.mac.slice();
    this.mtu = opts.mtu;
    this.configSize = this.mtu === undefined ? VIRTIO_NET_CONFIG.size : VIRTIO_NET_CONFIG.sizeWithMtu;
    this.config = new Uint8Array(VIRTIO_NET_CONFIG.sizeWithMtu);
    this.config.set(this.mac, VIRTIO_NET_CONFIG.mac);
    this.config[VIRTIO_NET_CONFIG.maxVirtqueuePairs] = pairCount & 0xff;
    this.config[VIRTIO_NET_CONFIG.maxVirtqueuePairs + 1] = pairCount >> 8;
    if (this.mtu !== undefined) {
      this.config[VIRTIO_NET_CONFIG.mtu] = this.mtu & 0xff;
      this.config[VIRTIO_NET_CONFIG.mtu + 1] = this.mtu >> 8;
    }
    this.filter = new ReceiveFilter(this.mac);
    const vnet = list[0]?.vnetHeader === true;
    this.lead = vnet ? 0 : VIRTIO_NET_HDR_BYTES;
    const F = VIRTIO_NET_F;
    let features = [F.mac, F.status, F.mrgRxbuf, F.ctrlVq, F.ctrlRx, F.ctrlRxExtra, F.ctrlVlan, F.guestAnnounce, F.ctrlMacAddr].reduce((f, bit) => f | featureBit(bit), 0n);
    if (vnet) features |= OFFLOAD_FEATURES | featureBit(F.ctrlGuestOffloads);
    if (pairCount > 1) features |= featureBit(F.mq);
    if (this.mtu !== undefined) features |= featureBit(F.mtu);
    this.features = features;
    this.linkUp = list.length > 0;
    this.writeStatus(false);
    this.enablePorts(1);
    this.clock = opts.clock ?? monotonicClock;
    if (opts.rateBytesPerSecond !== undefined) {
      // At least one full-size frame's worth in the bucket.
      this.txLimit = new TokenBucket(opts.rateBytesPerSecond, 65_550, this.clock());
      this.rxLimit = new TokenBucket(opts.rateBytesPerSecond, 65_550, this.clock());
    }
  }

  /** Queue pairs the device has, and those the driver uses now. */
  get queuePairs(): { readonly max: number; readonly active: number; readonly frames: readonly { readonly rx: number; readonly tx: number }[] } {
    return { max: this.pairs.length, active: this.activePairs, frames: this.pairs.map((p) => ({ rx: p.rxFrames, tx: p.txFrames })) };
  }

  /** Whether the ANNOUNCE status bit is set (the driver has not acknowledged the last announce() yet). */
  get announcing(): boolean {
    return (this.config[VIRTIO_NET_CONFIG.status]! & VIRTIO_NET_S_ANNOUNCE) !== 0;
  }

  private writeStatus(announcing: boolean): void {
    this.config[VIRTIO_NET_CONFIG.status] = (this.linkUp ? VIRTIO_NET_S_LINK_UP : 0) | (announcing ? VIRTIO_NET_S_ANNOUNCE : 0);
    this.config[VIRTIO_NET_CONFIG.status + 1] = 0;
  }

  /** Report the link up or down (a configuration change interrupt when the driver runs). */
  setLinkUp(up: boolean): void {
    if (up === this.linkUp) return;
    this.linkUp = up;
    this.writeStatus(this.announcing);
    this.transport?.configChanged();
  }

  /**
   * Ask the guest to announce itself on the network (VIRTIO_NET_S_ANNOUNCE
   * and a configuration interrupt), as after it moved to another host or
   * came back from a saved state. False when the driver is not running or
   * did not negotiate VIRTIO_NET_F_GUEST_ANNOUNCE.
   */
  announce(): boolean {
    const t = this.transport;
    if (t === undefined || !t.active || (t.negotiatedFeatures & featureBit(VIRTIO_NET_F.guestAnnounce)) === 0n) return false;
    this.writeStatus(true);
    t.configChanged();
    return true;
  }

  /** Stop watching the ports (the owner closes the ports themselves) and close the alarm. */
  close(): void {
    for (const p of this.pairs) this.disarm(p);
    this.alarm?.close();
    this.alarm = undefined;
  }

  attach(transport: VirtioTransport): void {
    this.transport = transport;
    if (this.txLimit !== undefined) this.alarm = new DeviceAlarm(transport.loop, () => this.resumeLimited(), this.clock);
  }

  /** Whether the rate limit `b` lets a frame go now; if not, the alarm is set for when it will. */
  private limited(b: TokenBucket | undefined): boolean {
    if (b === undefined || !this.alarm!.waitFor(b)) return false;
    this.counters.throttled++;
    return true;
  }

  /**
   * The alarm: transmit and receive go on where the rate limit stopped
   * them, each from the pair after the one it stopped at (round robin: a
   * busy pair cannot keep the others waiting), until the limit stops it again.
   */
  private resumeLimited(): void {
    const t = this.transport;
    if (t === undefined || !t.active) return;
    if (this.txHeld) {
      this.txHeld = false;
      const n = this.usablePairs;
      const start = this.txStoppedAt + 1;
      for (let k = 0; k < n && !this.txHeld; k++) {
        const p = this.pairs[(start + k) % n]!;
        if (t.queues[p.txQueue]!.ready) this.transmit(p);
      }
    }
    if (this.rxHeld) {
      this.rxHeld = false;
      const n = this.activePairs;
      const start = this.rxStoppedAt + 1;
      for (let k = 0; k < n && !this.rxHeld; k++) this.receiveOn(this.pairs[(start + k) % n]!);
    }
  }

  readConfig(offset: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + (offset + i < this.configSize ? this.config[offset + i]! : 0);
    return v >>> 0;
  }

  writeConfig(): void {
    // The MAC is read-only for a modern driver (5.1.4.2): it changes it with VIRTIO_NET_CTRL_MAC_ADDR_SET.
  }

  validateFeatures(features: bigint): boolean {
    if ((features & NEEDS_CONTROL_QUEUE) !== 0n && (features & featureBit(VIRTIO_NET_F.ctrlVq)) === 0n) return false;
    return (features & featureBit(VIRTIO_NET_F.ctrlRxExtra)) === 0n || (features & featureBit(VIRTIO_NET_F.ctrlRx)) !== 0n;
  }

  activate(_queues: readonly VirtQueue[], features: bigint): void {
    const has = (bit: number): boolean => (features & featureBit(bit)) !== 0n;
    this.mergeable = has(VIRTIO_NET_F.mrgRxbuf);
    this.offloads = Number(features & OFFLOAD_FEATURES);
    this.usablePairs = has(VIRTIO_NET_F.mq) ? this.pairs.length : 1;
    this.controlQueue = has(VIRTIO_NET_F.ctrlVq) ? 2 * this.usablePairs : -1;
    this.filtering = has(VIRTIO_NET_F.ctrlRx) || has(VIRTIO_NET_F.ctrlVlan);
    this.filter.vlanFiltering = has(VIRTIO_NET_F.ctrlVlan);
    const r = this.restored;
    this.restored = undefined;
    if (r !== undefined) {
      this.offloads = (this.offloads & ~GUEST_OFFLOAD_BITS) | (r.guestOffloads & this.offloads & GUEST_OFFLOAD_BITS);
      if (this.usablePairs >= r.pairs) this.enablePorts(r.pairs);
    }
    this.tellPortOffloads();
    for (let i = 0; i < this.activePairs; i++) this.receiveOn(this.pairs[i]!);
    if (r !== undefined && !this.announce() && r.announcing) this.writeStatus(true);
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

  /** The receive offloads the guest takes, to the ports (none while the driver is not running). */
  private tellPortOffloads(): boolean {
    const F = VIRTIO_NET_F;
    const offloads = { csum: this.has(F.guestCsum), tso4: this.has(F.guestTso4), tso6: this.has(F.guestTso6), ecn: this.has(F.guestEcn) };
    for (const { port } of this.pairs) {
      if (port?.setReceiveOffloads === undefined) continue;
      try {
        port.setReceiveOffloads(offloads);
      } catch (e) {
        // The port keeps what it had; frames the guest cannot take are dropped on receive (receivable()).
        this.notes.push(`receive offloads not set on ${port.name}: ${(e as Error).message}`);
        return false;
      }
    }
    return true;
  }

  /**
   * Use `n` queue pairs: the ports of the others are turned off (the host
   * steers nothing to them) and what their pairs held is given back. False
   * when a port refused.
   */
  private enablePorts(n: number): boolean {
    let ok = true;
    this.pairs.forEach((p, i) => {
      if (i >= n) this.idle(p);
      try {
        p.port?.setQueueEnabled?.(i < n);
      } catch (e) {
        this.notes.push(`queue ${i} of ${p.port!.name} not ${i < n ? "enabled" : "disabled"}: ${(e as Error).message}`);
        ok = false;
      }
    });
    this.activePairs = n;
    return ok;
  }

  /** A pair the driver no longer uses: stop reading its port, give back the chains a held frame took, drop the frame. */
  private idle(p: QueuePair): void {
    this.disarm(p);
    const q = this.transport?.queues[p.rxQueue];
    if (q !== undefined) for (let k = 0; k < p.spreadChains; k++) q.unpop();
    if (p.heldLength > 0) this.counters.rxDropped++;
    p.heldLength = 0;
    p.spreadChains = 0;
  }

  reset(): void {
    for (const p of this.pairs) {
      this.disarm(p);
      if (p.heldLength > 0) this.counters.rxDropped++;
      p.heldLength = 0;
      p.spreadChains = 0;
    }
    this.enablePorts(1);
    this.txHeld = this.rxHeld = false;
    this.alarm?.cancel();
    this.usablePairs = 1;
    this.controlQueue = -1;
    this.filtering = false;
    this.mergeable = false;
    this.filter.reset(this.mac);
    this.config.set(this.mac, VIRTIO_NET_CONFIG.mac);
    this.writeStatus(false);
    if (this.offloads !== 0) {
      this.offloads = 0;
      this.tellPortOffloads();
    }
  }

  queueNotified(index: number): void {
    if (index === this.controlQueue) this.control();
    else if (index < 2 * this.usablePairs) {
      const p = this.pairs[index >> 1]!;
      if ((index & 1) === 1) this.transmit(p);
      else if (p.index < this.activePairs) this.receiveOn(p);
    }
  }

  private arm(p: QueuePair): void {
    if (p.watch === undefined && p.port !== undefined) p.watch = this.transport!.loop.watch(p.port.fd, p.onReadable);
  }

  private disarm(p: QueuePair): void {
    p.watch?.close();
    p.watch = undefined;
  }

  // --- receive ----------------------------------------------------------------------------------

  /** Pair `p`'s port is readable or the guest added receive buffers: move frames in. */
  private receiveOn(p: QueuePair): void {
    const t = this.transport!;
    const port = p.port;
    if (port === undefined) return;
    const q = t.queues[p.rxQueue]!;
    if (!t.active || !q.ready || p.index >= this.activePairs) {
      // Nothing can be received now; resumed by activate() / the next notification / VQ_PAIRS_SET.
      this.disarm(p);
      return;
    }
    let pushed = false;
    q.disableNotifications();
    let received = 0;
    const frame = p.rxFrame.bytes;
    for (;;) {
      if (p.heldLength === 0) {
        // The batch ends between frames, never with one held.
        if (received === RX_BATCH) break;
        if (this.rxLimit !== undefined && this.limited(this.rxLimit)) {
          // Over the rate: stop reading the port (the host queue buffers, then drops) until the alarm.
          this.rxHeld = true;
          this.rxStoppedAt = p.index;
          this.disarm(p);
          if (pushed) t.signalUsed(p.rxQueue);
          return;
        }
        const n = port.receive(frame);
        if (n === 0) break;
        received++;
        if (this.lead === 0 && !this.receivable(frame, n)) {
          this.counters.rxDropped++;
          continue;
        }
        if (!this.wanted(frame, n)) {
          this.counters.rxFiltered++;
          continue;
        }
        p.heldLength = n;
      }
      const r = this.place(p, q, p.heldLength);
      if (r === "wait") {
        // No room: ask for a notification; if buffers came meanwhile, go on.
        if (!q.enableNotifications()) {
          q.disableNotifications();
          continue;
        }
        this.counters.rxWaits++;
        this.disarm(p);
        if (pushed) t.signalUsed(p.rxQueue);
        return;
      }
      if (r === "error") {
        this.disarm(p);
        return;
      }
      if (r === "ok") pushed = true;
      p.heldLength = 0;
    }
    this.arm(p);
    if (pushed) t.signalUsed(p.rxQueue);
  }

  /** Whether a received frame (with the port's header when it carries one) passes the receive filter and the MTU. */
  private wanted(frame: Uint8Array, n: number): boolean {
    const at = VIRTIO_NET_HDR_BYTES - this.lead;
    const length = n - at;
    if (this.filtering && !this.filter.accepts(frame, at, length)) return false;
    if (this.mtu === undefined || length <= this.mtu + 14) return true;
    // Longer than the MTU: only a segmentation-offload frame (the guest took GSO), or with its 802.1Q tag.
    if (this.lead === 0 && (frame[1]! & ~VIRTIO_NET_HDR_GSO.ecn) !== VIRTIO_NET_HDR_GSO.none) return true;
    return length <= this.mtu + 18 && ((frame[at + 12]! << 8) | frame[at + 13]!) === 0x8100;
  }

  /**
   * Put p.rxFrame[0..len) with its header into the guest's receive chains.
   * "wait": not enough buffers now (chains popped so far are kept for the next
   * try); "dropped": the frame can never fit; "error": the ring is broken.
   */
  private place(p: QueuePair, q: VirtQueue, len: number): "ok" | "wait" | "dropped" | "error" {
    const first = p.firstChain;
    const lead = this.lead;
    const total = lead + len;
    if (p.spreadChains === 0) {
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
        this.writeFirst(p, first, len, 1);
        q.pushUsed(first.head, total);
        this.counted(p, len);
        return "ok";
      }
      p.spreadHeads[0] = first.head;
      p.spreadLengths[0] = Math.min(first.writableBytes, total);
      p.spreadRoom = first.writableBytes;
      p.spreadSlots = first.ringDescriptors;
      p.spreadChains = 1;
    }
    // Mergeable: spread over as many chains as needed (5.1.6.4.2).
    const c = p.rxChain;
    while (p.spreadRoom < total) {
      // The chains held take every descriptor of the queue: no more can come. (Counting descriptors, not
      // chains: chains of several descriptors fill the queue sooner.)
      if (p.spreadSlots >= q.size) {
        // Even the whole queue is too small: give the chains back, drop the frame.
        for (let k = 0; k < p.spreadChains; k++) q.unpop();
        p.spreadChains = 0;
        this.counters.rxDropped++;
        return "dropped";
      }
      if (!q.pop(c)) return q.error !== undefined ? "error" : "wait";
      if (c.writableBytes === 0) {
        q.fail("VIRTIO_NET_BAD_RX_BUFFER", `receive chain ${c.head} has no writable bytes`);
        return "error";
      }
      const room = p.spreadRoom;
      const take = Math.min(c.writableBytes, total - room);
      c.writeTo(0, p.rxFrame.bytes, room - lead, take);
      p.spreadHeads[p.spreadChains] = c.head;
      p.spreadLengths[p.spreadChains] = take;
      p.spreadChains++;
      p.spreadRoom = room + c.writableBytes;
      p.spreadSlots += c.ringDescriptors;
    }
    const chains = p.spreadChains;
    p.spreadChains = 0;
    this.writeFirst(p, first, Math.min(len, first.writableBytes - lead), chains);
    // All the frame's chains at once: the driver must not see the first (whose header counts them) before the rest.
    q.pushUsedBatch(p.spreadHeads, p.spreadLengths, chains);
    this.counted(p, len);
    return "ok";
  }

  /**
   * The header (num_buffers = `chains`) and the frame's first `bytes` into the
   * first chain: the device's own header in front of the port's frame, or the
   * port's header (already in the frame buffer) patched in place.
   */
  private writeFirst(p: QueuePair, first: DescriptorChain, bytes: number, chains: number): void {
    const frame = p.rxFrame;
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
  private receivable(b: Uint8Array, len: number): boolean {
    if (len < VIRTIO_NET_HDR_BYTES + 14) return false;
    if (!this.has(VIRTIO_NET_F.guestCsum)) b[0] = b[0]! & ~VIRTIO_NET_HDR_F.dataValid;
    return this.allows(b[0]!, b[1]!, RX_OFFLOADS);
  }

  private counted(p: QueuePair, len: number): void {
    p.rxFrames++;
    this.counters.rxFrames++;
    this.counters.rxBytes += len - VIRTIO_NET_HDR_BYTES + this.lead;
    this.rxLimit?.charge(len - VIRTIO_NET_HDR_BYTES + this.lead);
    if (this.lead === 0 && offloaded(p.rxFrame.bytes[0]!, p.rxFrame.bytes[1]!)) this.counters.rxOffloaded++;
  }

  // --- transmit ---------------------------------------------------------------------------------

  private transmit(p: QueuePair): void {
    const t = this.transport!;
    const q = t.queues[p.txQueue]!;
    const c = p.txChain;
    const buf = p.txFrame;
    const port = p.port;
    do {
      q.disableNotifications();
      for (;;) {
        if (this.txLimit !== undefined && this.limited(this.txLimit)) {
          // Over the rate: the chains wait in the ring (notifications stay off) until the alarm.
          this.txHeld = true;
          this.txStoppedAt = p.index;
          t.signalUsed(p.txQueue);
          return;
        }
        if (!q.pop(c)) break;
        if (c.readableBytes < VIRTIO_NET_HDR_BYTES) {
          q.fail("VIRTIO_NET_BAD_TX_BUFFER", `transmit chain ${c.head} has ${c.readableBytes} bytes, less than the ${VIRTIO_NET_HDR_BYTES}-byte header`);
          t.signalUsed(p.txQueue);
          return;
        }
        // What goes to the port: the frame after the header, or header and frame for a port that carries it.
        const from = this.lead;
        const len = c.readableBytes - from;
        const frameBytes = c.readableBytes - VIRTIO_NET_HDR_BYTES;
        if (frameBytes === 0 || len > buf.capacity || port === undefined || (from === 0 && !this.sendable(c))) this.counters.txDropped++;
        else if (!this.sendGathered(p, port, c, from, len, frameBytes)) {
          c.readFrom(from, buf.bytes, 0, len);
          if (port.send(buf.view(len))) this.sent(p, frameBytes);
          else this.counters.txDropped++;
        }
        q.pushUsed(c.head, 0);
      }
    } while (!q.enableNotifications());
    t.signalUsed(p.txQueue);
  }

  private sent(p: QueuePair, frameBytes: number): void {
    p.txFrames++;
    this.counters.txFrames++;
    this.counters.txBytes += frameBytes;
    this.txLimit?.charge(frameBytes);
  }

  /**
   * Hand the frame (the chain's readable bytes after the header) to a port that
   * sends straight from host memory: no copy, no view. False when that is not
   * possible (the port or memory cannot, too many spans, the port says not now):
   * the caller copies the frame instead. True once the frame was sent or dropped.
   */
  private sendGathered(p: QueuePair, port: NetworkPort, c: DescriptorChain, from: number, len: number, frameBytes: number): boolean {
    const spans = p.txSpans;
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
      this.sent(p, frameBytes);
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

  // --- control queue ----------------------------------------------------------------------------

  /** Commands on the control queue: each answered OK or ERR in its ack byte (5.1.6.5). */
  private control(): void {
    const t = this.transport!;
    const index = this.controlQueue;
    const q = t.queues[index]!;
    const c = this.controlChain;
    do {
      q.disableNotifications();
      while (q.pop(c)) {
        if (c.readableBytes < 2 || c.writableBytes < 1) {
          q.fail("VIRTIO_NET_BAD_CTRL", `control chain ${c.head} has ${c.readableBytes} readable and ${c.writableBytes} writable bytes (class and command, then the ack, are needed)`);
          t.signalUsed(index);
          return;
        }
        c.readFrom(0, this.controlHead);
        const ok = this.command(c, this.controlHead[0]!, this.controlHead[1]!, c.readableBytes - 2);
        if (ok) this.counters.controlOk++;
        else this.counters.controlErr++;
        this.ack[0] = ok ? VIRTIO_NET_CTRL.ok : VIRTIO_NET_CTRL.err;
        c.writeTo(0, this.ack);
        q.pushUsed(c.head, 1);
      }
    } while (!q.enableNotifications());
    t.signalUsed(index);
  }

  /** Carry out one command whose data is the chain's readable bytes from 2 on (`size` of them). */
  private command(c: DescriptorChain, cls: number, cmd: number, size: number): boolean {
    const K = VIRTIO_NET_CTRL;
    const F = VIRTIO_NET_F;
    const features = this.transport!.negotiatedFeatures;
    const negotiated = (bit: number): boolean => (features & featureBit(bit)) !== 0n;
    const data = this.controlData;
    switch (cls) {
      case K.rx: {
        const mode = RECEIVE_MODES[cmd];
        if (mode === undefined || size !== 1 || !negotiated(cmd < 2 ? F.ctrlRx : F.ctrlRxExtra)) return false;
        c.readFrom(2, data, 0, 1);
        if (data[0]! > 1) return false;
        this.filter.setMode(mode, data[0] === 1);
        return true;
      }
      case K.mac:
        if (cmd === K.macAddrSet) {
          if (size !== 6 || !negotiated(F.ctrlMacAddr)) return false;
          c.readFrom(2, data, 0, 6);
          // 5.1.6.5.2: the configuration shows it before the command is used.
          this.config.set(data.subarray(0, 6), VIRTIO_NET_CONFIG.mac);
          this.filter.mac.set(data.subarray(0, 6));
          return true;
        }
        return cmd === K.macTableSet && negotiated(F.ctrlRx) && this.macTables(c, size);
      case K.vlan: {
        if ((cmd !== K.vlanAdd && cmd !== K.vlanDel) || size !== 2 || !negotiated(F.ctrlVlan)) return false;
        c.readFrom(2, data, 0, 2);
        return this.filter.setVlan(data[0]! | (data[1]! << 8), cmd === K.vlanAdd);
      }
      case K.announce:
        if (cmd !== K.announceAck || size !== 0 || !negotiated(F.guestAnnounce)) return false;
        this.writeStatus(false);
        return true;
      case K.mq: {
        if (cmd !== K.mqVqPairsSet || size !== 2 || !negotiated(F.mq)) return false;
        c.readFrom(2, data, 0, 2);
        const n = data[0]! | (data[1]! << 8);
        if (n < 1 || n > this.pairs.length) return false;
        const before = this.activePairs;
        const ok = this.enablePorts(n);
        // A port refused: back to the pairs the driver still has (it is told VIRTIO_NET_ERR and keeps them).
        if (!ok) this.enablePorts(before);
        // Pairs turned on start reading their ports (and, with buffers posted, receiving).
        for (let i = 0; i < this.activePairs; i++) this.receiveOn(this.pairs[i]!);
        return ok;
      }
      case K.guestOffloads: {
        if (cmd !== K.guestOffloadsSet || size !== 8 || !negotiated(F.ctrlGuestOffloads)) return false;
        c.readFrom(2, data, 0, 8);
        // Only offloads the driver negotiated (all in the low 32 bits).
        const lo = (data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24)) >>> 0;
        const hi = (data[4]! | (data[5]! << 8) | (data[6]! << 16) | (data[7]! << 24)) >>> 0;
        const allowed = Number(features & BigInt(GUEST_OFFLOAD_BITS));
        if (hi !== 0 || (lo & ~allowed) !== 0) return false;
        const before = this.offloads;
        this.offloads = (this.offloads & ~GUEST_OFFLOAD_BITS) | lo;
        if (this.tellPortOffloads()) return true;
        this.offloads = before;
        this.tellPortOffloads();
        return false;
      }
      default:
        return false;
    }
  }

  /** VIRTIO_NET_CTRL_MAC_TABLE_SET: le32 count + addresses, unicast then multicast, exactly `size` bytes. */
  private macTables(c: DescriptorChain, size: number): boolean {
    const data = this.controlData;
    const table = this.controlTable;
    if (size < 8) return false;
    c.readFrom(2, data, 0, 4);
    const uni = (data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24)) >>> 0;
    const multiAt = 4 + 6 * uni;
    if (multiAt + 4 > size) return false;
    c.readFrom(2 + multiAt, data, 0, 4);
    const multi = (data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24)) >>> 0;
    if (multiAt + 4 + 6 * multi !== size) return false;
    if (uni <= MAC_TABLE_ENTRIES) c.readFrom(2 + 4, table, 0, 6 * uni);
    this.filter.setTable("unicast", table, uni);
    if (multi <= MAC_TABLE_ENTRIES) c.readFrom(2 + multiAt + 4, table, 0, 6 * multi);
    this.filter.setTable("multicast", table, multi);
    return true;
  }

  // --- saved state ------------------------------------------------------------------------------

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
    if (t === undefined) return;
    for (const p of this.pairs) {
      if (p.spreadChains === 0) continue;
      const q = t.queues[p.rxQueue]!;
      for (let k = 0; k < p.spreadChains; k++) q.unpop();
      p.spreadChains = 0;
      p.spreadRoom = 0;
      p.spreadSlots = 0;
      t.loop.defer(() => this.receiveOn(p));
    }
  }

  save(): VirtioNetSaved {
    return {
      kind: "virtio-net",
      version: 2,
      mac: Array.from(this.config.subarray(0, 6)),
      linkUp: this.linkUp,
      queuePairs: this.activePairs,
      filter: this.filter.save(),
      guestOffloads: this.offloads & GUEST_OFFLOAD_BITS,
      announcing: this.announcing,
    };
  }

  /**
   * After the transport restored the queues, before it activates the device
   * (when the driver was running): the receive filter and address now; the
   * driver's queue pairs and receive offloads at activation, before any
   * frame is received; the guest is then asked to announce itself (it may
   * now be on another host, behind other switch ports). A state of another
   * shape (another version, more pairs than this device has, fields of the
   * wrong type): PciDeviceError, before anything changed.
   */
  restore(s: SavedDeviceState): void {
    const v = s as Partial<VirtioNetSaved>;
    const bad = (why: string): PciDeviceError => new PciDeviceError("VIRTIO_NET_RESTORE", `saved virtio-net state: ${why}`);
    if (v.kind !== "virtio-net" || v.version !== 2) throw bad(`${String(v.kind)} v${String(v.version)} is not virtio-net v2`);
    if (!isByteArray(v.mac, 6, 6)) throw bad("the MAC address is not 6 bytes");
    const pairs = v.queuePairs ?? 1;
    if (!Number.isInteger(pairs) || pairs < 1 || pairs > this.pairs.length) throw bad(`it uses ${String(pairs)} queue pairs, this device has ${this.pairs.length}`);
    const offloads = v.guestOffloads ?? 0;
    if (!Number.isInteger(offloads) || offloads < 0) throw bad(`receive offloads ${String(offloads)}`);
    if (v.announcing !== undefined && typeof v.announcing !== "boolean") throw bad("announcing is not a boolean");
    checkReceiveFilterState(v.filter);
    this.filter.restore(v.filter);
    this.config.set(v.mac, VIRTIO_NET_CONFIG.mac);
    this.restored = this.transport?.active === true ? { pairs, guestOffloads: offloads, announcing: v.announcing === true } : undefined;
  }
}

/** The virtio-net PCI function. */
export class VirtioNetDevice extends VirtioPciDevice {
  readonly net: VirtioNet;
  constructor(name: string, ports: NetworkPort | readonly NetworkPort[] | undefined, services: PciDeviceServices, opts: VirtioNetOptions) {
    const backend = new VirtioNet(ports, opts);
    super(name, backend, services, { ringPacked: opts.ringPacked === true });
    this.net = backend;
  }
}

export function createVirtioNet(name: string, ports: NetworkPort | readonly NetworkPort[] | undefined, services: PciDeviceServices, opts: VirtioNetOptions): VirtioNetDevice {
  return new VirtioNetDevice(name, ports, services, opts);
}
