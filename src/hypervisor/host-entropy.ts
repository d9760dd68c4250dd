/**
 * The host's entropy source, /dev/urandom (random(4)), read straight into
 * spans of host memory (guest RAM, from GuestMemory.hostAddresses) with one
 * readv(2): the kernel writes the random bytes where the guest wants them.
 * One descriptor per thread, opened on first use and kept for the thread's life.
 */
import { SystemCallError } from "./errors.js";
import { Errno, errno, errnoName, O_CLOEXEC, O_RDONLY, open, readvHost, strerror } from "./libc.js";

export class HostEntropy {
  private static instance: HostEntropy | undefined;

  private constructor(readonly fd: number) {}

  /** This thread's source (opens /dev/urandom once; throws SystemCallError when it cannot). */
  static shared(): HostEntropy {
    HostEntropy.instance ??= new HostEntropy(open("/dev/urandom", O_RDONLY | O_CLOEXEC));
    return HostEntropy.instance;
  }

  /**
   * Fill `count` host spans with random bytes: the bytes filled, in span order
   * (short, possibly 0, only when a signal interrupted the read). Spans outside
   * memory the hypervisor layer mapped throw RangeError before the read.
   */
  fillHost(addresses: Float64Array, lengths: Uint32Array, count: number): number {
    const n = readvHost(this.fd, addresses, lengths, count);
    if (n >= 0) return n;
    const e = errno();
    if (e === Errno.EINTR) return 0;
    throw new SystemCallError("readv", e, errnoName(e), strerror(e), { fd: this.fd, what: "/dev/urandom" });
  }
}
