/**
 * The host's entropy source, /dev/urandom (random(4)), read straight into
 * spans of host memory (guest RAM, from GuestMemory.hostAddresses) with one
 * readv(2): the kernel writes the random bytes where the guest wants them.
 * The owner (a virtio-rng back end's assembly) opens one and closes it with
 * the device.
 */
import { SystemCallError } from "./errors.js";
import { close, Errno, errno, errnoName, O_CLOEXEC, O_RDONLY, open, readvHost, strerror } from "./libc.js";

export class HostEntropy {
  private closed = false;

  private constructor(readonly fd: number) {}

  /** Open /dev/urandom (throws SystemCallError when it cannot). */
  static open(): HostEntropy {
    return new HostEntropy(open("/dev/urandom", O_RDONLY | O_CLOEXEC));
  }

  /**
   * Fill `count` host spans with random bytes: the bytes filled, in span order
   * (short, possibly 0, only when a signal interrupted the read). Spans outside
   * memory the hypervisor layer mapped throw RangeError before the read; a
   * failed read throws SystemCallError.
   */
  fillHost(addresses: Float64Array, lengths: Uint32Array, count: number): number {
    if (this.closed) throw new RangeError("HostEntropy.fillHost after close");
    const n = readvHost(this.fd, addresses, lengths, count);
    if (n >= 0) return n;
    const e = errno();
    if (e === Errno.EINTR) return 0;
    throw new SystemCallError("readv", e, errnoName(e), strerror(e), { fd: this.fd, what: "/dev/urandom" });
  }

  /** Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    close(this.fd);
  }
}
