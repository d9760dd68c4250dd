/**
 * /dev/kvm itself: the system-level ioctls (API version, capabilities, vCPU
 * mmap size, supported CPUID, MSR index list) and the fd that VMs are
 * created from. One KvmSystem per thread is fine; it holds one fd.
 */
import * as libc from "./libc.js";
import { KvmError, KvmProtocolError, SystemCallError } from "./errors.js";
import { KVM, KVM_API_VERSION, KVM_CAP, SIZEOF, decodeCpuid2, type CpuidEntry } from "./kvm-abi.js";
import type { ErrorContext } from "../errors.js";
import type { SyscallThread } from "./syscall-thread.js";

export type { CpuidEntry } from "./kvm-abi.js";

/**
 * Issue a KVM ioctl and turn a failure into a KvmError. `arg` is a struct
 * buffer, an integer, or null. `on`: make it on that native thread
 * (syscall-thread.ts) instead of the calling one.
 */
export function kvmIoctl(
  fd: number,
  name: keyof typeof KVM,
  arg: ArrayBufferView | number | bigint | null,
  context: ErrorContext = {},
  on?: SyscallThread,
): number {
  const request = KVM[name];
  let r: number;
  let e = 0;
  if (on !== undefined) {
    r = on.ioctl(fd, request, arg);
    if (r < 0) e = -r;
  } else {
    r = arg === null || ArrayBuffer.isView(arg) ? libc.raw.ioctlPtr(fd, request, arg) : libc.raw.ioctlInt(fd, request, arg);
    if (r < 0) e = libc.errno();
  }
  if (r < 0) throw new KvmError(`KVM_${name}`, e, libc.errnoName(e), libc.strerror(e), { fd, ...context });
  return r;
}

export class KvmSystem {
  private closed = false;
  /** Made by attach(): close() leaves the fd open. */
  private borrowed = false;

  private constructor(
    /** The /dev/kvm file descriptor. */
    readonly fd: number,
    readonly path: string,
    readonly apiVersion: number,
    /** Bytes to mmap from each vCPU fd (struct kvm_run and the PIO data page). */
    readonly vcpuMmapSize: number,
  ) {}

  /** Open /dev/kvm, check the API version (12) and read the vCPU mmap size. */
  static open(path = "/dev/kvm"): KvmSystem {
    const fd = libc.open(path, libc.O_RDWR | libc.O_CLOEXEC);
    try {
      const apiVersion = kvmIoctl(fd, "GET_API_VERSION", 0, { path });
      if (apiVersion !== KVM_API_VERSION)
        throw new KvmProtocolError("KVM_API_VERSION", `${path} speaks KVM API ${apiVersion}, Partis needs ${KVM_API_VERSION}`, { path, apiVersion });
      const mmapSize = kvmIoctl(fd, "GET_VCPU_MMAP_SIZE", 0, { path });
      if (mmapSize < 4096) throw new KvmProtocolError("KVM_MMAP_SIZE", `${path}: vCPU mmap size ${mmapSize} is too small`, { path, mmapSize });
      return new KvmSystem(fd, path, apiVersion, mmapSize);
    } catch (e) {
      libc.close(fd);
      throw e;
    }
  }

  /**
   * Open a KvmSystem over an fd this process already holds (e.g. handed to a
   * worker thread). The fd is not closed by `close()` of the attached object.
   */
  static attach(fd: number, path = "/dev/kvm"): KvmSystem {
    const apiVersion = kvmIoctl(fd, "GET_API_VERSION", 0, { path });
    const mmapSize = kvmIoctl(fd, "GET_VCPU_MMAP_SIZE", 0, { path });
    const s = new KvmSystem(fd, path, apiVersion, mmapSize);
    s.borrowed = true;
    return s;
  }

  /** KVM_CHECK_EXTENSION on /dev/kvm: 0 when absent, otherwise a capability-specific value. */
  checkExtension(cap: number): number {
    return kvmIoctl(this.fd, "CHECK_EXTENSION", cap, { cap });
  }

  /** Largest number of vCPUs per VM (KVM_CAP_MAX_VCPUS, falling back to KVM_CAP_NR_VCPUS, then 4). */
  get maxVcpus(): number {
    return this.checkExtension(KVM_CAP.MAX_VCPUS) || this.checkExtension(KVM_CAP.NR_VCPUS) || 4;
  }

  /** Recommended number of vCPUs per VM (KVM_CAP_NR_VCPUS). */
  get recommendedVcpus(): number {
    return this.checkExtension(KVM_CAP.NR_VCPUS) || 4;
  }

  /** Number of memory slots per VM (KVM_CAP_NR_MEMSLOTS, 32 when not reported). */
  get maxMemorySlots(): number {
    return this.checkExtension(KVM_CAP.NR_MEMSLOTS) || 32;
  }

  /** KVM_GET_SUPPORTED_CPUID: every leaf KVM can expose to a guest on this host. */
  supportedCpuid(): CpuidEntry[] {
    for (let capacity = 128; capacity <= 4096; capacity *= 2) {
      const buf = new Uint8Array(SIZEOF.kvm_cpuid2 + capacity * SIZEOF.kvm_cpuid_entry2);
      new DataView(buf.buffer).setUint32(0, capacity, true);
      try {
        kvmIoctl(this.fd, "GET_SUPPORTED_CPUID", buf, { capacity });
      } catch (e) {
        if (e instanceof SystemCallError && e.errno === libc.Errno.E2BIG) continue;
        throw e;
      }
      return decodeCpuid2(buf);
    }
    throw new KvmProtocolError("KVM_CPUID_TOO_LARGE", "KVM_GET_SUPPORTED_CPUID wants more than 4096 entries");
  }

  /** KVM_GET_MSR_INDEX_LIST: MSRs that KVM_GET_MSRS / KVM_SET_MSRS accept (saved state needs these). */
  msrIndexList(): number[] {
    return this.msrList("GET_MSR_INDEX_LIST");
  }

  /** KVM_GET_MSR_FEATURE_INDEX_LIST: feature MSRs (empty when the host does not support the ioctl). */
  msrFeatureIndexList(): number[] {
    try {
      return this.msrList("GET_MSR_FEATURE_INDEX_LIST");
    } catch (e) {
      if (e instanceof SystemCallError && (e.errno === libc.Errno.EINVAL || e.errno === libc.Errno.ENOTTY)) return [];
      throw e;
    }
  }

  private msrList(name: "GET_MSR_INDEX_LIST" | "GET_MSR_FEATURE_INDEX_LIST"): number[] {
    // First call with nmsrs = 0 returns E2BIG and writes the count.
    const probe = new Uint32Array(1);
    try {
      kvmIoctl(this.fd, name, probe);
    } catch (e) {
      if (!(e instanceof SystemCallError && e.errno === libc.Errno.E2BIG)) throw e;
    }
    const n = probe[0]!;
    const buf = new Uint32Array(1 + n);
    buf[0] = n;
    kvmIoctl(this.fd, name, buf, { count: n });
    return Array.from(buf.subarray(1, 1 + buf[0]!));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (!this.borrowed) libc.close(this.fd);
  }
}
