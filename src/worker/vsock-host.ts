/**
 * The host side of a VM's virtio-vsock device: UNIX sockets named after one
 * path, as Firecracker and Cloud Hypervisor name them, so their host tools
 * work unchanged.
 *
 *  - The guest connects to CID 2 port P: the device connects to `<path>_P`
 *    (a host service listens there).
 *  - A host program connects to `<path>` (this listens) and writes
 *    `CONNECT P\n`; it reads `OK <host port>\n` once the guest accepted, and
 *    the socket is then the connection. A line that is not `CONNECT <port>`
 *    (decimal, at most 2^32-1), or longer than 32 bytes, or not complete
 *    within 2 s, closes the socket.
 */
import type { FdWatch, PciDeviceServices } from "../devices/pci/device-thread-services.js";
import { DeviceAlarm, monotonicClock, type Clock } from "../devices/io-limits.js";
import type { VsockHost, VsockHostStream, VirtioVsock } from "../devices/virtio/virtio-vsock.js";
import {
  acceptStream,
  closeDescriptor,
  connectStream,
  listenStream,
  receiveStream,
  receiveStreamHost,
  removeSocketPath,
  sendStream,
  sendStreamHost,
  shutdownStream,
} from "../hypervisor/host-network.js";

/** Longest first line a host program may send (`CONNECT 4294967295` is 18 bytes). */
const MAX_LINE = 32;
/** Host programs that connected and have not finished their CONNECT line: more are closed at once. */
const MAX_WAITING = 32;
/** How long a host program has for its CONNECT line. */
export const CONNECT_LINE_TIMEOUT_MS = 2000;

/** A connected, non-blocking stream socket as the device's host stream (read: > 0 bytes, 0 nothing now, -1 end). */
export function socketStream(fd: number): VsockHostStream {
  let closed = false;
  const received = (n: number): number => (n > 0 ? n : n === 0 ? -1 : 0);
  return {
    fd,
    read: (buf, length) => received(receiveStream(fd, buf, length)),
    readHost: (addresses, lengths, count) => received(receiveStreamHost(fd, addresses, lengths, count)),
    write: (buf, length) => Math.max(0, sendStream(fd, buf, length)),
    writeHost: (addresses, lengths, count) => Math.max(0, sendStreamHost(fd, addresses, lengths, count)),
    shutdownWrite: () => shutdownStream(fd, "write"),
    close: () => {
      if (closed) return;
      closed = true;
      closeDescriptor(fd);
    },
  };
}

interface Waiting {
  readonly fd: number;
  readonly watch: FdWatch;
  readonly deadline: number;
  line: string;
}

export class VsockHostSockets implements VsockHost {
  private readonly listenFd: number;
  private listenWatch: FdWatch | undefined;
  /**
   * Listening again a while after accept(2) failed (out of descriptors: the
   * listener stays readable, so it is not polled meanwhile), and closing
   * programs that did not send their line in time.
   */
  private readonly alarm: DeviceAlarm;
  private readonly waiting = new Set<Waiting>();
  private device: Pick<VirtioVsock, "connectFromHost"> | undefined;
  private readonly byte = new Uint8Array(1);
  /** Host programs whose first line was not `CONNECT <port>`. */
  badRequests = 0;
  /** Host programs closed at once: accept(2) failed (EMFILE...), or too many were still to send their line. */
  refusedPrograms = 0;
  /** Host programs closed because their line did not come in time. */
  lineTimeouts = 0;

  constructor(
    readonly path: string,
    private readonly services: Pick<PciDeviceServices, "loop">,
    private readonly clock: Clock = monotonicClock,
  ) {
    this.listenFd = listenStream(path);
    try {
      this.alarm = new DeviceAlarm(services.loop, () => this.tick(), clock);
    } catch (e) {
      closeDescriptor(this.listenFd);
      throw e;
    }
    this.listen();
  }

  private listen(): void {
    if (this.listenWatch === undefined && !this.closed) this.listenWatch = this.services.loop.watch(this.listenFd, () => this.accept());
  }

  /** The alarm: listen again (after a failed accept), close programs past their deadline, wait for the next one. */
  private tick(): void {
    this.listen();
    const now = this.clock();
    let next = Infinity;
    for (const w of [...this.waiting]) {
      if (w.deadline > now) next = Math.min(next, w.deadline);
      else {
        this.lineTimeouts++;
        this.drop(w, false);
      }
    }
    if (next !== Infinity) this.alarm.set(next - now);
  }

  /** The alarm's descriptor (tests fire it through their loop). */
  get alarmFd(): number {
    return this.alarm.fd;
  }

  /** The device host programs' connections go to. */
  attach(device: Pick<VirtioVsock, "connectFromHost">): void {
    this.device = device;
  }

  connect(port: number): VsockHostStream | undefined {
    try {
      return socketStream(connectStream(`${this.path}_${port}`));
    } catch {
      return undefined; // no such service (ENOENT, ECONNREFUSED), or its backlog is full
    }
  }

  private accept(): void {
    for (;;) {
      let fd: number | undefined;
      try {
        fd = acceptStream(this.listenFd);
      } catch {
        // Out of descriptors or memory: stop polling the (still readable) listener for a second.
        this.refusedPrograms++;
        this.listenWatch?.close();
        this.listenWatch = undefined;
        this.alarm.set(1000);
        return;
      }
      if (fd === undefined) return;
      if (this.waiting.size >= MAX_WAITING) {
        this.refusedPrograms++;
        closeDescriptor(fd);
        continue;
      }
      const w: Waiting = { fd, line: "", deadline: this.clock() + CONNECT_LINE_TIMEOUT_MS, watch: this.services.loop.watch(fd, () => this.readLine(w)) };
      this.waiting.add(w);
      this.alarm.set(CONNECT_LINE_TIMEOUT_MS);
    }
  }

  /** Read the CONNECT line byte by byte (nothing after it is taken: that is the connection's data). */
  private readLine(w: Waiting): void {
    for (;;) {
      let n: number;
      try {
        n = receiveStream(w.fd, this.byte, 1);
      } catch {
        n = 0;
      }
      if (n < 0) return; // nothing more now
      if (n === 0) return this.drop(w, false); // hung up
      const ch = String.fromCharCode(this.byte[0]!);
      if (ch !== "\n") {
        w.line += ch;
        if (w.line.length > MAX_LINE) return this.drop(w, true);
        continue;
      }
      const m = /^CONNECT (\d{1,10})$/.exec(w.line.replace(/\r$/, ""));
      const port = m === null ? NaN : Number(m[1]);
      if (!(port <= 0xffffffff) || this.device === undefined) return this.drop(w, true);
      w.watch.close();
      this.waiting.delete(w);
      this.device.connectFromHost(port, socketStream(w.fd)); // the device owns the socket now
      return;
    }
  }

  private drop(w: Waiting, bad: boolean): void {
    if (bad) this.badRequests++;
    w.watch.close();
    this.waiting.delete(w);
    closeDescriptor(w.fd);
  }

  private closed = false;

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const w of [...this.waiting]) this.drop(w, false);
    this.listenWatch?.close();
    this.listenWatch = undefined;
    this.alarm.close();
    closeDescriptor(this.listenFd);
    try {
      removeSocketPath(this.path);
    } catch {
      /* already gone */
    }
  }
}
