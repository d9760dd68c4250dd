/**
 * The mailbox between the vCPU threads and the device thread.
 *
 * A vCPU thread whose exit belongs to a PCI device (a BAR access, a config
 * access to a device function, a port the platform board does not claim)
 * writes the request into its own slot of a SharedArrayBuffer, rings the
 * device thread's doorbell (an eventfd the device thread polls) and waits on
 * the slot's state word. The device thread services every posted slot in
 * order and wakes the waiter. One slot per vCPU: no slot is ever contended.
 *
 * This is the emulated-device path the seed describes: a register access costs
 * a round trip between threads. Synthetic devices avoid it: their queue
 * notifications are ioeventfds and their completions irqfds.
 *
 * Slot layout (bytes): 0 state (i32: 0 idle, 1 posted, 2 done), 4 op, 8 size,
 * 12 count, 16 address (f64), 24.. data (up to DATA_BYTES: the string I/O of one
 * exit, or an MMIO value). After the slots: the server's "awake" word; then the
 * port read shadow, one i32 per I/O port: SHADOW_VALID | the byte a 1-byte read
 * of the port returns, published by the device that owns the port (see
 * PortReadShadow), or 0 (forward the read). A vCPU answers a shadowed read
 * without a round trip. Then one byte per port: 1 where the owning device
 * takes posted writes (PostedWritePorts). Then the posted-write ring: a
 * 1-byte, 2-byte or 4-byte OUT to such a port is queued there and the vCPU
 * goes on at once, as a CPU goes on after a posted write on a real bus. The
 * ring is one for all vCPUs, in the order the writes were made (a write one
 * vCPU makes under a lock is queued before another vCPU, which takes the lock
 * next, makes any access), and the device thread drains it before any request
 * it answers; while it holds writes, no read is answered from the shadow, so
 * every read still sees every earlier write.
 *
 * DEVNOTE: register accesses come in bursts (an IDE command is a dozen of
 * them), and a wake-up through eventfd + poll + futex costs ~100 µs on a PVM
 * host (measured; see docs/benchmarks.md, "device mailbox"). So both sides
 * spin briefly before sleeping: the server keeps polling the slots for a short
 * while after its last request (and says so in the awake word, so requesters
 * skip the doorbell), and a requester polls its state word before it waits on
 * it (for 0.1-0.2 ms at most: REQUESTER_SPIN_MS, SERVER_SPIN_MS). The awake
 * word and the slot states are both sequentially consistent (Atomics), so a
 * request posted just as the server goes to sleep is either seen by the
 * server's last look or rings the doorbell (Dekker).
 */
import type { PortReadShadow, PostedWritePorts } from "../devices/pci/device-thread-services.js";
import { EventFd } from "../hypervisor/eventfd.js";

export const MAILBOX_OP = {
  pioRead: 1,
  pioWrite: 2,
  mmioRead: 3,
  mmioWrite: 4,
  /** address = bdf << 8 | register offset */
  configRead: 5,
  configWrite: 6,
} as const;
export type MailboxOp = (typeof MAILBOX_OP)[keyof typeof MAILBOX_OP];

const HEADER = 24;
/** One page: KVM hands string port I/O over in at most one page per exit. */
export const DATA_BYTES = 4096;
export const SLOT_BYTES = HEADER + DATA_BYTES;
const CONTROL_BYTES = 64;
/** Control words (i32 index): the server's awake word, then the posted-write ring's head and tail. */
const AWAKE = 0;
const RING_HEAD = 1;
const RING_TAIL = 2;
const SHADOW_PORTS = 0x1_0000;
const SHADOW_VALID = 0x100;
/** Posted writes queued at most (a power of two); a vCPU that finds the ring full asks synchronously. */
export const POSTED_WRITES = 256;
/** A ring entry (i32 words): round (tail + 1 once written), size, port, value. Every entry is a port write. */
const ENTRY_WORDS = 4;
const POSTABLE_BYTES = 0x1_0000;
const LAYOUT = (slots: number) => {
  const control = slots * SLOT_BYTES;
  const shadow = control + CONTROL_BYTES;
  const postable = shadow + SHADOW_PORTS * 4;
  const ring = postable + POSTABLE_BYTES;
  return { control, shadow, postable, ring, total: ring + POSTED_WRITES * ENTRY_WORDS * 4 };
};
/**
 * How long a requester polls its slot before sleeping on it, and the server the
 * slots after its last request. Bounded by time, not iterations: a loop that is
 * cheap natively is ten times slower under emulation, and on an oversubscribed
 * host a spinning thread takes the CPU the other side needs.
 */
export const REQUESTER_SPIN_MS = 0.1;
export const SERVER_SPIN_MS = 0.2;

const IDLE = 0;
const POSTED = 1;
const DONE = 2;

export interface MailboxHandoff {
  readonly buffer: SharedArrayBuffer;
  readonly slots: number;
  readonly doorbellFd: number;
}

export class DeviceMailbox {
  private constructor(readonly buffer: SharedArrayBuffer, readonly slots: number, readonly doorbell: EventFd | number) {}

  static create(slots: number): DeviceMailbox {
    return new DeviceMailbox(new SharedArrayBuffer(LAYOUT(slots).total), slots, EventFd.create({ nonBlocking: true }));
  }

  static attach(h: MailboxHandoff): DeviceMailbox {
    return new DeviceMailbox(h.buffer, h.slots, h.doorbellFd);
  }

  get doorbellFd(): number {
    return typeof this.doorbell === "number" ? this.doorbell : this.doorbell.fd;
  }

  handoff(): MailboxHandoff {
    return { buffer: this.buffer, slots: this.slots, doorbellFd: this.doorbellFd };
  }

  /** The requesting side of slot `index` (one per vCPU thread). */
  requester(index: number): MailboxRequester {
    if (index < 0 || index >= this.slots) throw new RangeError(`mailbox slot ${index} out of range`);
    return new MailboxRequester(this.buffer, index, this.doorbellFd, this.slots);
  }

  /** The servicing side: every slot. */
  server(): MailboxServer {
    return new MailboxServer(this.buffer, this.slots);
  }

  /** The device thread's side of the port read shadow. */
  portShadow(): PortReadShadow {
    const words = shadowWords(this.buffer, this.slots);
    return {
      publish(port, value) {
        Atomics.store(words, port & 0xffff, SHADOW_VALID | (value & 0xff));
      },
      withdraw(port) {
        Atomics.store(words, port & 0xffff, 0);
      },
    };
  }

  /** The device thread's side of the posted-write port table. */
  postedWritePorts(): PostedWritePorts {
    const flags = new Uint8Array(this.buffer, LAYOUT(this.slots).postable, POSTABLE_BYTES);
    return {
      accept(port) {
        Atomics.store(flags, port & 0xffff, 1);
      },
      refuse(port) {
        Atomics.store(flags, port & 0xffff, 0);
      },
    };
  }

  /** Wake the device thread (it then checks its stop word). */
  ring(): void {
    (typeof this.doorbell === "number" ? EventFd.borrow(this.doorbell) : this.doorbell).signal();
  }

  close(): void {
    if (typeof this.doorbell !== "number") this.doorbell.close();
  }
}

function shadowWords(buffer: SharedArrayBuffer, slots: number): Int32Array {
  return new Int32Array(buffer, LAYOUT(slots).shadow, SHADOW_PORTS);
}

function controlWords(buffer: SharedArrayBuffer, slots: number): Int32Array {
  return new Int32Array(buffer, LAYOUT(slots).control, CONTROL_BYTES / 4);
}

function ringWords(buffer: SharedArrayBuffer, slots: number): Int32Array {
  return new Int32Array(buffer, LAYOUT(slots).ring, POSTED_WRITES * ENTRY_WORDS);
}

/** A request as the device thread sees it; `data` is the live slot payload (read results go there). */
export interface MailboxRequest {
  op: MailboxOp;
  size: number;
  count: number;
  address: number;
  data: Uint8Array;
}

export class MailboxRequester {
  private readonly state: Int32Array;
  private readonly header: DataView;
  /** The slot's payload: write data before `post`, read results after. */
  readonly data: Uint8Array;
  private readonly doorbell: EventFd;
  private readonly control: Int32Array;
  private readonly shadow: Int32Array;
  private readonly postable: Uint8Array;
  private readonly ring: Int32Array;
  /** Set by the owner when the VM is stopping: waits give up so the thread can exit. */
  abandoned: () => boolean = () => false;

  constructor(buffer: SharedArrayBuffer, index: number, doorbellFd: number, slots: number) {
    this.doorbell = EventFd.borrow(doorbellFd);
    this.control = controlWords(buffer, slots);
    this.shadow = shadowWords(buffer, slots);
    this.postable = new Uint8Array(buffer, LAYOUT(slots).postable, POSTABLE_BYTES);
    this.ring = ringWords(buffer, slots);
    const base = index * SLOT_BYTES;
    this.state = new Int32Array(buffer, base, 1);
    this.header = new DataView(buffer, base, HEADER);
    this.data = new Uint8Array(buffer, base + HEADER, DATA_BYTES);
  }

  /**
   * The published value of a 1-byte read of `port`, or -1 when the read must
   * be forwarded (nothing published, or posted writes not yet applied).
   */
  shadowRead(port: number): number {
    if (Atomics.load(this.control, RING_TAIL) !== Atomics.load(this.control, RING_HEAD)) return -1;
    const v = Atomics.load(this.shadow, port & 0xffff);
    return (v & SHADOW_VALID) !== 0 ? v & 0xff : -1;
  }

  /** Whether the device that owns `port` takes posted writes. */
  postsWrites(port: number): boolean {
    return this.postable[port & 0xffff] === 1;
  }

  /**
   * Queue a port write (1, 2 or 4 bytes) for the device thread and return at
   * once; false when the ring is full (then make the write with call()).
   */
  postWrite(port: number, size: number, value: number): boolean {
    const c = this.control;
    let tail: number;
    for (;;) {
      tail = Atomics.load(c, RING_TAIL);
      if (((tail - Atomics.load(c, RING_HEAD)) | 0) >= POSTED_WRITES) return false;
      if (Atomics.compareExchange(c, RING_TAIL, tail, (tail + 1) | 0) === tail) break;
    }
    const at = (tail & (POSTED_WRITES - 1)) * ENTRY_WORDS;
    const r = this.ring;
    r[at + 1] = size;
    r[at + 2] = port;
    r[at + 3] = value | 0;
    Atomics.store(r, at, (tail + 1) | 0); // written: the device thread may take it
    if (Atomics.load(c, AWAKE) === 0) this.doorbell.signal();
    return true;
  }

  /**
   * Post a request and wait for the device thread. Returns false when the wait
   * was abandoned (the VM is stopping); results are then undefined.
   */
  call(op: MailboxOp, address: number, size: number, count: number): boolean {
    const h = this.header;
    h.setInt32(4, op, true);
    h.setInt32(8, size, true);
    h.setInt32(12, count, true);
    h.setFloat64(16, address, true);
    Atomics.store(this.state, 0, POSTED);
    if (Atomics.load(this.control, AWAKE) === 0) this.doorbell.signal();
    const until = performance.now() + REQUESTER_SPIN_MS;
    for (let i = 1; Atomics.load(this.state, 0) === POSTED; i++) if ((i & 63) === 0 && performance.now() > until) break;
    while (Atomics.load(this.state, 0) === POSTED) {
      Atomics.wait(this.state, 0, POSTED, 200);
      if (Atomics.load(this.state, 0) === POSTED && this.abandoned()) return false;
    }
    Atomics.store(this.state, 0, IDLE);
    return true;
  }
}

export class MailboxServer {
  private readonly states: Int32Array;
  private readonly control: Int32Array;
  private readonly ring: Int32Array;
  private readonly postedData = new Uint8Array(8);
  /** Posted writes applied so far. */
  postedWrites = 0;
  private readonly headers: DataView[] = [];
  private readonly payloads: Uint8Array[] = [];
  private readonly request: MailboxRequest = { op: MAILBOX_OP.pioRead, size: 0, count: 0, address: 0, data: new Uint8Array(0) };

  constructor(buffer: SharedArrayBuffer, readonly slots: number) {
    this.states = new Int32Array(buffer, 0, (slots * SLOT_BYTES) / 4);
    this.control = controlWords(buffer, slots);
    this.ring = ringWords(buffer, slots);
    for (let i = 0; i < slots; i++) {
      this.headers.push(new DataView(buffer, i * SLOT_BYTES, HEADER));
      this.payloads.push(new Uint8Array(buffer, i * SLOT_BYTES + HEADER, DATA_BYTES));
    }
  }

  /**
   * Service requests until none has come for SERVER_SPIN_MS, with
   * the awake word set so requesters need not ring; then clear it and take one
   * last look. `afterBatch` runs after each batch that serviced something.
   * Returns how many requests were serviced.
   */
  serve(handle: (r: MailboxRequest) => void, afterBatch?: () => void): number {
    let total = 0;
    Atomics.store(this.control, AWAKE, 1);
    let until = performance.now() + SERVER_SPIN_MS;
    for (let i = 1; ; i++) {
      const n = this.drain(handle);
      if (n > 0) {
        total += n;
        // Work the batch started (an IDE transfer) runs now, not once the requests stop coming.
        afterBatch?.();
        until = performance.now() + SERVER_SPIN_MS;
      } else if ((i & 15) === 0 && performance.now() > until) break;
    }
    Atomics.store(this.control, AWAKE, 0);
    return total + this.drain(handle);
  }

  /**
   * Apply the queued posted writes in order; returns how many. A write still
   * being queued (its place taken, its words not yet stored: its vCPU is
   * between two statements) ends the pass, unless `complete`: before a
   * request is answered every write queued ahead of it must apply, even one
   * behind such a write (another vCPU may have queued it and then let the
   * requester in), so the pass waits for it.
   */
  drainPosted(handle: (r: MailboxRequest) => void, complete = false): number {
    const c = this.control;
    const ring = this.ring;
    let head = Atomics.load(c, RING_HEAD);
    const tail = Atomics.load(c, RING_TAIL);
    let n = 0;
    while (head !== tail) {
      const at = (head & (POSTED_WRITES - 1)) * ENTRY_WORDS;
      if (Atomics.load(ring, at) !== ((head + 1) | 0) && !(complete && this.awaitQueued(at, (head + 1) | 0))) break;
      const r = this.request;
      r.op = MAILBOX_OP.pioWrite;
      r.size = ring[at + 1]!;
      r.count = 1;
      r.address = ring[at + 2]!;
      r.data = this.postedData;
      putLe(this.postedData, 0, r.size, ring[at + 3]! >>> 0); // 1, 2 or 4: only postWrite fills the ring
      try {
        handle(r);
      } finally {
        head = (head + 1) | 0;
        Atomics.store(c, RING_HEAD, head); // after the device published what the write changed
      }
      n++;
    }
    this.postedWrites += n;
    return n;
  }

  /** Wait (1 ms sleeps, 1 s at most: a vCPU thread that never finishes is a stopping VM) for a queued write to be stored. */
  private awaitQueued(at: number, round: number): boolean {
    for (let i = 0; i < 1000; i++) {
      const v = Atomics.load(this.ring, at);
      if (v === round) return true;
      Atomics.wait(this.ring, at, v, 1);
    }
    return false;
  }

  /** Apply posted writes, then service every posted slot with `handle`; returns how many were serviced. */
  drain(handle: (r: MailboxRequest) => void): number {
    let n = this.drainPosted(handle);
    const words = SLOT_BYTES / 4;
    for (let i = 0; i < this.slots; i++) {
      const at = i * words;
      if (Atomics.load(this.states, at) !== POSTED) continue;
      // Every write queued before this request (by its vCPU, or by another before it) applies first.
      n += this.drainPosted(handle, true);
      const h = this.headers[i]!;
      const r = this.request;
      r.op = h.getInt32(4, true) as MailboxOp;
      r.size = h.getInt32(8, true);
      r.count = h.getInt32(12, true);
      r.address = h.getFloat64(16, true);
      r.data = this.payloads[i]!;
      try {
        handle(r);
      } finally {
        Atomics.store(this.states, at, DONE);
        Atomics.notify(this.states, at);
      }
      n++;
    }
    return n;
  }
}

/** Store the low `size` bytes of `v` little-endian at `data[off]` (payload values). */
export function putLe(data: Uint8Array, off: number, size: number, v: number): void {
  for (let b = 0; b < size; b++) data[off + b] = (v >>> (8 * b)) & 0xff;
}

/** Read `size` (1, 2 or 4) bytes little-endian at `data[off]`. */
export function getLe(data: Uint8Array, off: number, size: number): number {
  let v = 0;
  for (let b = size - 1; b >= 0; b--) v = v * 256 + data[off + b]!;
  return v >>> 0;
}
