/**
 * One stream connection of the virtio-vsock device (virtio 1.2 spec 5.10.6):
 * a guest socket (guest CID, guestPort) joined to a host stream (host CID 2,
 * hostPort), with both directions' credit (5.10.6.3).
 *
 * Credit, per direction: a sender may have at most the receiver's
 * `buf_alloc` bytes sent and not yet forwarded (`fwd_cnt`). Every packet
 * carries its sender's buf_alloc and fwd_cnt.
 *  - host -> guest: the device sends at most
 *    peerBufAlloc - (txCnt - peerFwdCnt) bytes (the guest's figures, from its
 *    last packet).
 *  - guest -> host: the device offers `bufAlloc`; what the host stream does
 *    not take at once is kept in `pending` (never more than bufAlloc when the
 *    guest keeps to its credit), and fwdCnt = rxCnt - pending.
 *
 * The device (virtio-vsock.ts) owns the connections and does their I/O; this
 * is their state.
 */
import type { FdWatch } from "../pci/device-thread-services.js";

/** The host end of a vsock connection: a connected, non-blocking stream (a UNIX socket). */
export interface VsockHostStream {
  /** Polled for readability and, while the device holds output, writability. */
  readonly fd: number;
  /** At most `length` bytes into buf: > 0 bytes read, 0 nothing now, -1 end of stream. Throws when the connection broke. */
  read(buf: Uint8Array, length: number): number;
  /** buf[0, length) to the stream: bytes accepted (0 when full). Throws when the connection broke. */
  write(buf: Uint8Array, length: number): number;
  /**
   * Optional: as `read`, into `count` spans of host memory (guest RAM, from
   * GuestMemory.hostAddresses) with one readv. A RangeError: those spans are
   * not host memory (the device then copies through views).
   */
  readHost?(addresses: Float64Array, lengths: Uint32Array, count: number): number;
  /** Optional: as `write`, from `count` spans of host memory with one writev. */
  writeHost?(addresses: Float64Array, lengths: Uint32Array, count: number): number;
  /** No more bytes will be written (the guest shut its sending side): the host peer reads the end of the stream. */
  shutdownWrite(): void;
  close(): void;
}

/** What the device still has to send for a connection, as bits (never a queue of messages). */
export const SAY = { request: 1, response: 2, shutdown: 4, creditUpdate: 8 } as const;

/**
 * - connecting: the host asked for it; the device's REQUEST is (to be) sent and no RESPONSE came yet.
 * - open: both sides know it.
 */
export type VsockConnectionState = "connecting" | "open";

export class VsockConnection {
  state: VsockConnectionState;
  /** SAY bits. */
  say = 0;
  /** SHUTDOWN flags the guest sent (RCV 1: it takes no more; SEND 2: it sends no more). */
  guestShut = 0;
  /** The host stream ended (read -1): the device tells the guest SHUTDOWN(SEND). */
  hostEof = false;
  /** The host stream's write side was shut (after the guest's SHUTDOWN(SEND), its output drained). */
  hostWriteShut = false;
  /** The host stream polled readable and was not read dry since. */
  hostReadable = false;
  /** In the device's send queue. */
  queued = false;
  /** Over for the guest (out of the device's table): any output still held drains, then the stream closes. */
  gone = false;

  /** The guest's receive buffer and what it forwarded of it, from its last packet. */
  peerBufAlloc = 0;
  peerFwdCnt = 0;
  /** Bytes sent to the guest (u32, wraps). */
  txCnt = 0;
  /** Bytes received from the guest (u32, wraps). */
  rxCnt = 0;
  /** fwd_cnt as last told to the guest. */
  fwdCntSent = 0;

  /** Guest output the stream has not taken yet: bytes [0, pendingLength). Allocated on the first short write. */
  pending: Uint8Array | undefined;
  pendingLength = 0;

  readWatch: FdWatch | undefined;
  writeWatch: FdWatch | undefined;

  constructor(
    readonly guestPort: number,
    readonly hostPort: number,
    readonly stream: VsockHostStream,
    state: VsockConnectionState,
    /** Bytes of guest output this side takes before the guest must wait (the buf_alloc it tells the guest). */
    readonly bufAlloc: number,
  ) {
    this.state = state;
  }

  /** fwd_cnt: bytes received from the guest and handed to the host stream. */
  get fwdCnt(): number {
    return (this.rxCnt - this.pendingLength) >>> 0;
  }

  /** Bytes the guest takes now (its credit to us). */
  get guestCredit(): number {
    const inFlight = (this.txCnt - this.peerFwdCnt) >>> 0;
    return inFlight >= this.peerBufAlloc ? 0 : this.peerBufAlloc - inFlight;
  }

  /** Whether host bytes may go to the guest now (open, neither side shut that direction, credit left). */
  get mayReceive(): boolean {
    return this.state === "open" && !this.hostEof && (this.guestShut & 1) === 0 && !this.gone;
  }

  /** Whether the device has something to send the guest for this connection. */
  get wantsToSend(): boolean {
    return this.say !== 0 || (this.hostReadable && this.mayReceive && this.guestCredit > 0);
  }

  /** Stop polling the host stream for bytes. */
  stopReading(): void {
    this.readWatch?.close();
    this.readWatch = undefined;
  }

  /** Stop waiting for room in the host stream. */
  stopWaitingForRoom(): void {
    this.writeWatch?.close();
    this.writeWatch = undefined;
  }

  stopWatches(): void {
    this.stopReading();
    this.stopWaitingForRoom();
  }
}
