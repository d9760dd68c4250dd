/**
 * A virtual processor: one KVM vCPU, its shared `struct kvm_run` page, the
 * register ioctls and the run loop's single step, `run()`.
 *
 * Threads: KVM wants every vCPU ioctl from the thread that created the vCPU.
 * A VirtualProcessor is a plain JS object (not transferable), so creating it
 * on a worker_thread and using it there is the only way it can be used.
 *
 * Allocation: `run()` returns one of a few exit objects owned by this
 * VirtualProcessor and rewritten by the next `run()`. I/O and MMIO exits carry
 * `data`, a live view into kvm_run: for an IN or an MMIO read, write the
 * result into `data` before the next `run()` and KVM completes the guest's
 * instruction with it. Consume an exit before calling `run()` again.
 *
 * Registers: 64-bit registers are `bigint` everywhere (exact), narrower
 * fields are `number` (see kvm-abi.ts).
 */
import * as os from "node:os";
import { isMainThread } from "node:worker_threads";
import * as libc from "./libc.js";
import { KvmError, KvmProtocolError } from "./errors.js";
import { kvmIoctl } from "./system.js";
import { SYS, type SyscallThread } from "./syscall-thread.js";
import {
  KVM,
  KVM_EXIT,
  KVM_EXIT_IO_OUT,
  KVM_INTERNAL_ERROR,
  KVM_RUN,
  SIZEOF,
  decodeCpuid2,
  decodeFpu,
  decodeMsrs,
  decodeRegs,
  decodeSregs,
  decodeVcpuEvents,
  encodeCpuid2,
  encodeFpu,
  encodeMsrs,
  encodeRegs,
  encodeSregs,
  type CpuidEntry,
  type Fpu,
  type MsrEntry,
  type Regs,
  type Sregs,
  type VcpuEvents,
} from "./kvm-abi.js";
import type { Partition } from "./partition.js";
import type { ErrorContext } from "../errors.js";

/** getCpuid's marker for a leaf KVM did not write (no CPUID leaf is numbered so). */
const UNWRITTEN_LEAF = 0xffffffff;

export type { Regs, Sregs, Segment, DescriptorTable, Fpu, MsrEntry, CpuidEntry, VcpuEvents } from "./kvm-abi.js";

/** Port I/O. `data` holds size*count bytes: OUT data to read, or room for IN data to write. */
export interface IoExit {
  readonly reason: "io";
  readonly direction: "in" | "out";
  readonly port: number;
  readonly size: 1 | 2 | 4;
  /** >1 for string I/O (INS/OUTS with REP): `count` consecutive items of `size` bytes. */
  readonly count: number;
  readonly data: Uint8Array;
}

/** MMIO to guest-physical space that is not RAM. `data.length` is the access size (1..8). */
export interface MmioExit {
  readonly reason: "mmio";
  readonly gpa: number;
  readonly isWrite: boolean;
  readonly data: Uint8Array;
}

export interface SystemEventExit {
  readonly reason: "system_event";
  /** KVM_SYSTEM_EVENT_*: 1 shutdown, 2 reset, 3 crash, ... */
  readonly type: number;
  readonly data: readonly bigint[];
}

export interface InternalErrorExit {
  readonly reason: "internal_error";
  /** KVM_INTERNAL_ERROR_*: 1 emulation failure, 2 exception during exception, 3 delivery failure, 4 unexpected exit. */
  readonly suberror: number;
  readonly data: readonly bigint[];
  /**
   * For an emulation failure that reports them (flag bit 0 of data[0]): the
   * bytes of the instruction KVM could not emulate, e.g. [0xf3, 0x48, 0x0f, 0xb8, 0xc1]
   * for POPCNT on a PVM host.
   */
  readonly instructionBytes?: Uint8Array;
}

export interface FailEntryExit {
  readonly reason: "fail_entry";
  readonly hardwareReason: bigint;
  readonly cpu: number;
}

export type VcpuExit =
  | IoExit
  | MmioExit
  | { readonly reason: "hlt" }
  /** Triple fault. */
  | { readonly reason: "shutdown" }
  | SystemEventExit
  | InternalErrorExit
  | FailEntryExit
  /** KVM_RUN returned EINTR (a signal) or the run was cut short by `immediateExit`. */
  | { readonly reason: "intr" }
  /** The guest can take an interrupt now (only after `requestInterruptWindow`, without in-kernel irqchip). */
  | { readonly reason: "irq_window_open" }
  | { readonly reason: "unknown"; readonly code: number };

export type VcpuExitReason = VcpuExit["reason"];

type Mutable<T> = { -readonly [K in keyof T]: T[K] };

const HLT: VcpuExit = Object.freeze({ reason: "hlt" });
const SHUTDOWN: VcpuExit = Object.freeze({ reason: "shutdown" });
const INTR: VcpuExit = Object.freeze({ reason: "intr" });
const IRQ_WINDOW: VcpuExit = Object.freeze({ reason: "irq_window_open" });

const KVM_RUN_REQUEST = KVM.RUN;
const SIG_UNBLOCK = 1;
const EINTR = libc.Errno.EINTR;
const EAGAIN = libc.Errno.EAGAIN;

/**
 * The signal that kicks a vCPU thread out of KVM_RUN. It needs a handler in
 * the process (without one, SIGUSR2 would end the process): VcpuKicker
 * installs a no-op one when used on the main thread; otherwise call
 * `installKickHandler()` on the main thread first.
 */
export const KICK_SIGNAL = os.constants.signals.SIGUSR2;

const ignoreKick = (): void => {};

/** Install the process-wide no-op handler for KICK_SIGNAL. Main thread only (signals are not delivered to worker `process`). */
export function installKickHandler(): void {
  if (!isMainThread) throw new KvmProtocolError("VCPU_KICK_HANDLER", "installKickHandler must run on the main thread");
  if (!process.listeners("SIGUSR2").includes(ignoreKick)) process.on("SIGUSR2", ignoreKick);
}

/** Plain data (structured-clone safe) another thread needs to kick a vCPU. */
export interface VcpuKickHandle {
  readonly vcpu: number;
  readonly fd: number;
  readonly mmapSize: number;
  /** pthread_t of the vCPU's thread. */
  readonly thread: bigint;
  /**
   * One Int32 word shared by the vCPU and its kickers: 0 the thread may be
   * signalled, 1 a kick is signalling it, 2 retired (the vCPU was closed, its
   * thread may be gone and its pthread_t reused: never signal it again).
   */
  readonly guard: SharedArrayBuffer;
}

const GUARD_OPEN = 0;
const GUARD_KICKING = 1;
const GUARD_RETIRED = 2;

/**
 * Set immediate_exit in `run` and signal `thread`, unless the vCPU's guard is
 * retired (closed: the thread may be gone) or another kick is signalling it
 * right now (that signal does the job for both).
 */
function kickThread(run: Uint8Array, guard: Int32Array, thread: bigint): void {
  run[KVM_RUN.IMMEDIATE_EXIT] = 1;
  if (Atomics.compareExchange(guard, 0, GUARD_OPEN, GUARD_KICKING) !== GUARD_OPEN) return;
  try {
    libc.pthreadKill(thread, KICK_SIGNAL);
  } finally {
    Atomics.store(guard, 0, GUARD_OPEN);
  }
}

/**
 * Makes a vCPU running on another thread leave KVM_RUN (its run() returns
 * "intr"): sets kvm_run.immediate_exit through its own mapping of the vCPU's
 * kvm_run (so a kick just before KVM_RUN is not lost) and signals the thread
 * (so a vCPU blocked in the kernel, e.g. halted, wakes). Valid while the vCPU
 * is open.
 */
export class VcpuKicker {
  private readonly guard: Int32Array;

  private constructor(
    private readonly run: Uint8Array,
    readonly handle: VcpuKickHandle,
  ) {
    this.guard = new Int32Array(handle.guard, 0, 1);
  }

  static attach(handle: VcpuKickHandle): VcpuKicker {
    if (isMainThread) installKickHandler();
    return new VcpuKicker(libc.mapSharedFile(handle.fd, 0, handle.mmapSize), handle);
  }

  /** Kick the vCPU; does nothing once it has been closed (its thread may be gone). */
  kick(): void {
    kickThread(this.run, this.guard, this.handle.thread);
  }

  close(): void {
    libc.releaseMapping(this.run);
  }
}

export class VirtualProcessor {
  /** pthread_t of the thread that runs this vCPU: the creating thread, or the native thread it was created on. */
  private readonly thread: bigint;
  /** struct kvm_run and the following PIO data page(s), shared with the kernel. */
  private readonly run8: Uint8Array;
  private readonly run16: Uint16Array;
  private readonly run32: Uint32Array;
  private readonly ioExit: Mutable<IoExit>;
  private readonly mmioExit: Mutable<MmioExit>;
  /** MMIO data views by length (1..8), made once. */
  private readonly mmioData: Uint8Array[];
  private ioDataOffset = -1;
  private ioDataLength = -1;
  private closed = false;
  /** Kickers' guard (VcpuKickHandle.guard): retired when this vCPU closes. */
  private readonly kickGuard = new Int32Array(new SharedArrayBuffer(4));

  private constructor(
    readonly partition: Partition,
    readonly id: number,
    /** The vCPU file descriptor. */
    readonly fd: number,
    run: Uint8Array,
    /** The native thread that makes this vCPU's ioctls (undefined: the creating JavaScript thread). */
    private readonly native: SyscallThread | undefined,
  ) {
    this.run8 = run;
    this.run16 = new Uint16Array(run.buffer, run.byteOffset, run.byteLength >>> 1);
    this.run32 = new Uint32Array(run.buffer, run.byteOffset, run.byteLength >>> 2);
    this.mmioData = Array.from({ length: 9 }, (_, n) => run.subarray(KVM_RUN.MMIO_DATA, KVM_RUN.MMIO_DATA + n));
    this.ioExit = { reason: "io", direction: "out", port: 0, size: 1, count: 0, data: run.subarray(0, 0) };
    this.mmioExit = { reason: "mmio", gpa: 0, isWrite: false, data: this.mmioData[0]! };
    // Node may start worker threads with signals blocked (a native thread inherits its creator's
    // mask); a kick must reach the thread that runs the vCPU.
    if (native === undefined) {
      this.thread = libc.pthreadSelf();
      libc.unblockSignal(KICK_SIGNAL);
    } else {
      this.thread = native.thread;
      const set = new DataView(native.scratch.buffer, native.scratch.byteOffset, 8);
      set.setBigUint64(0, 1n << BigInt(KICK_SIGNAL - 1), true);
      const r = native.call(SYS.rt_sigprocmask, SIG_UNBLOCK, native.scratchAddress, 0, 8);
      if (r < 0) throw new KvmError("rt_sigprocmask", -r, libc.errnoName(-r), libc.strerror(-r), { vcpu: id, signal: KICK_SIGNAL });
    }
  }

  /** The native thread this vCPU runs on, if it was created on one. */
  get syscallThread(): SyscallThread | undefined {
    return this.native;
  }

  /** What another thread needs to build a VcpuKicker for this vCPU. */
  kickHandle(): VcpuKickHandle {
    return { vcpu: this.id, fd: this.fd, mmapSize: this.run8.byteLength, thread: this.thread, guard: this.kickGuard.buffer as SharedArrayBuffer };
  }

  /**
   * KVM_CREATE_VCPU `id` (the APIC id) and map its kvm_run. Call on the
   * thread that will run it, or pass `on`: a native thread (syscall-thread.ts)
   * that then makes every ioctl of this vCPU, KVM_RUN included, while the
   * caller drives it from JavaScript.
   */
  static create(partition: Partition, id: number, options: { on?: SyscallThread } = {}): VirtualProcessor {
    const native = options.on;
    const fd = kvmIoctl(partition.vmFd, "CREATE_VCPU", id, { vm: partition.vmFd, vcpu: id }, native);
    let run: Uint8Array | undefined;
    try {
      run = libc.mapSharedFile(fd, 0, partition.vcpuMmapSize);
      return new VirtualProcessor(partition, id, fd, run, native);
    } catch (e) {
      // Thread-local finalizers never run when a thread ends: release the mapping here, or it keeps the VM alive.
      if (run !== undefined) libc.releaseMapping(run);
      libc.close(fd);
      throw e;
    }
  }

  /**
   * Make this vCPU leave KVM_RUN, from a thread other than the one running
   * it (the thread that drives a vCPU on a native thread, say): as
   * VcpuKicker.kick() does. Does nothing once the vCPU is closed.
   */
  interrupt(): void {
    if (!this.closed) kickThread(this.run8, this.kickGuard, this.thread);
  }

  private ioctl(name: keyof typeof KVM, arg: ArrayBufferView | number | bigint | null, context: ErrorContext = {}): number {
    if (this.closed) throw new KvmProtocolError("VCPU_CLOSED", "virtual processor already closed", { vm: this.partition.vmFd, vcpu: this.id });
    return kvmIoctl(this.fd, name, arg, { vm: this.partition.vmFd, vcpu: this.id, ...context }, this.native);
  }

  /**
   * Enter the guest until the next exit that needs user space. Returns an
   * exit object owned by this VirtualProcessor (valid until the next run()).
   */
  run(): VcpuExit {
    if (this.native !== undefined) {
      this.startRun();
      return this.finishRun(this.native.wait());
    }
    const r = libc.raw.ioctlInt(this.fd, KVM_RUN_REQUEST, 0);
    return this.exitOf(r, r < 0 ? libc.errno() : 0);
  }

  /**
   * For a vCPU on a native thread: hand it KVM_RUN and return at once. The
   * thread's `done` (or its doorbell) says when the guest exited; then
   * `finishRun(thread.take())` decodes the exit as run() would.
   */
  startRun(): void {
    if (this.native === undefined) throw new KvmProtocolError("VCPU_NOT_NATIVE", "startRun needs a vCPU created on a native thread", { vcpu: this.id });
    if (this.closed) throw new KvmProtocolError("VCPU_CLOSED", "virtual processor already closed", { vm: this.partition.vmFd, vcpu: this.id });
    this.native.post(SYS.ioctl, this.fd, KVM_RUN_REQUEST, 0);
  }

  /** Decode the exit of a KVM_RUN made by startRun(), from its raw result (negative: -errno). */
  finishRun(result: number): VcpuExit {
    return this.exitOf(result, result < 0 ? -result : 0);
  }

  private exitOf(r: number, e: number): VcpuExit {
    if (r < 0) {
      if (e === EINTR || e === EAGAIN) {
        // A kick (or the caller's own immediateExit) has been seen: re-arm for the next run().
        this.run8[KVM_RUN.IMMEDIATE_EXIT] = 0;
        return INTR;
      }
      throw new KvmError("KVM_RUN", e, libc.errnoName(e), libc.strerror(e), { vm: this.partition.vmFd, vcpu: this.id });
    }
    const run8 = this.run8;
    const reason = this.run32[KVM_RUN.EXIT_REASON >>> 2]!;
    switch (reason) {
      case KVM_EXIT.IO: {
        const x = this.ioExit;
        const size = run8[KVM_RUN.IO_SIZE]!;
        const count = this.run32[KVM_RUN.IO_COUNT >>> 2]!;
        // data_offset is a u64; its high half is always 0 (offset into this mapping).
        const offset = this.run32[KVM_RUN.IO_DATA_OFFSET >>> 2]!;
        const length = size * count;
        if (offset !== this.ioDataOffset || length !== this.ioDataLength) {
          if (offset + length > run8.byteLength)
            throw new KvmProtocolError("KVM_RUN_IO_OFFSET", "KVM_EXIT_IO data lies outside kvm_run", { vcpu: this.id, offset, length });
          this.ioDataOffset = offset;
          this.ioDataLength = length;
          x.data = run8.subarray(offset, offset + length);
        }
        x.direction = run8[KVM_RUN.IO_DIRECTION] === KVM_EXIT_IO_OUT ? "out" : "in";
        x.port = this.run16[KVM_RUN.IO_PORT >>> 1]!;
        x.size = size as 1 | 2 | 4;
        x.count = count;
        return x;
      }
      case KVM_EXIT.MMIO: {
        const x = this.mmioExit;
        const lo = this.run32[KVM_RUN.MMIO_PHYS_ADDR >>> 2]!;
        const hi = this.run32[(KVM_RUN.MMIO_PHYS_ADDR >>> 2) + 1]!;
        x.gpa = hi * 0x1_0000_0000 + lo;
        const len = this.run32[KVM_RUN.MMIO_LEN >>> 2]!;
        x.data = this.mmioData[len > 8 ? 8 : len]!;
        x.isWrite = run8[KVM_RUN.MMIO_IS_WRITE] !== 0;
        return x;
      }
      case KVM_EXIT.HLT:
        return HLT;
      case KVM_EXIT.SHUTDOWN:
        return SHUTDOWN;
      case KVM_EXIT.INTR:
        return INTR;
      case KVM_EXIT.IRQ_WINDOW_OPEN:
        return IRQ_WINDOW;
      case KVM_EXIT.SYSTEM_EVENT:
        return { reason: "system_event", type: this.run32[KVM_RUN.SYSTEM_EVENT_TYPE >>> 2]!, data: this.u64s(KVM_RUN.SYSTEM_EVENT_NDATA, KVM_RUN.SYSTEM_EVENT_DATA) };
      case KVM_EXIT.INTERNAL_ERROR:
        return this.internalError();
      case KVM_EXIT.FAIL_ENTRY:
        return { reason: "fail_entry", hardwareReason: this.u64(KVM_RUN.FAIL_ENTRY_REASON), cpu: this.run32[KVM_RUN.FAIL_ENTRY_CPU >>> 2]! };
      default:
        return { reason: "unknown", code: reason };
    }
  }

  private internalError(): InternalErrorExit {
    const suberror = this.run32[KVM_RUN.INTERNAL_SUBERROR >>> 2]!;
    const data = this.u64s(KVM_RUN.INTERNAL_NDATA, KVM_RUN.INTERNAL_DATA);
    // emulation_failure: data[0] = flags; then u8 insn_size and 15 instruction bytes.
    if (suberror === KVM_INTERNAL_ERROR.EMULATION && data.length >= 3 && (data[0]! & 1n) !== 0n) {
      const at = KVM_RUN.INTERNAL_DATA + 8;
      const size = Math.min(15, this.run8[at]!);
      return { reason: "internal_error", suberror, data, instructionBytes: this.run8.slice(at + 1, at + 1 + size) };
    }
    return { reason: "internal_error", suberror, data };
  }

  private u64(offset: number): bigint {
    return new DataView(this.run8.buffer, this.run8.byteOffset).getBigUint64(offset, true);
  }

  private u64s(ndataOffset: number, dataOffset: number): bigint[] {
    const n = Math.min(16, this.run32[ndataOffset >>> 2]!);
    return Array.from({ length: n }, (_, i) => this.u64(dataOffset + i * 8));
  }

  /**
   * kvm_run.immediate_exit: when set, the next run() returns "intr" at once
   * (KVM_CAP_IMMEDIATE_EXIT); run() clears it when it returns "intr".
   */
  set immediateExit(on: boolean) {
    this.run8[KVM_RUN.IMMEDIATE_EXIT] = on ? 1 : 0;
  }
  get immediateExit(): boolean {
    return this.run8[KVM_RUN.IMMEDIATE_EXIT] !== 0;
  }

  /** Ask for an "irq_window_open" exit when the guest can take an interrupt (user-space irqchip only). */
  set requestInterruptWindow(on: boolean) {
    this.run8[KVM_RUN.REQUEST_INTERRUPT_WINDOW] = on ? 1 : 0;
  }

  /** kvm_run.ready_for_interrupt_injection and if_flag after the last exit. */
  get readyForInterruptInjection(): boolean {
    return this.run8[KVM_RUN.READY_FOR_INTERRUPT_INJECTION] !== 0;
  }
  get interruptFlag(): boolean {
    return this.run8[KVM_RUN.IF_FLAG] !== 0;
  }

  getRegs(): Regs {
    const buf = new Uint8Array(SIZEOF.kvm_regs);
    this.ioctl("GET_REGS", buf);
    return decodeRegs(buf);
  }

  setRegs(regs: Regs): void {
    this.ioctl("SET_REGS", encodeRegs(regs));
  }

  getSregs(): Sregs {
    const buf = new Uint8Array(SIZEOF.kvm_sregs);
    this.ioctl("GET_SREGS", buf);
    return decodeSregs(buf);
  }

  setSregs(sregs: Sregs): void {
    this.ioctl("SET_SREGS", encodeSregs(sregs));
  }

  getFpu(): Fpu {
    const buf = new Uint8Array(SIZEOF.kvm_fpu);
    this.ioctl("GET_FPU", buf);
    return decodeFpu(buf);
  }

  setFpu(fpu: Fpu): void {
    this.ioctl("SET_FPU", encodeFpu(fpu));
  }

  /**
   * The XSAVE area as raw bytes (struct kvm_xsave; larger than 4 KiB when the
   * VM reports KVM_CAP_XSAVE2, then read with KVM_GET_XSAVE2).
   */
  getXsave(): Uint8Array {
    const size = Math.max(SIZEOF.kvm_xsave, this.partition.xsaveSize);
    const buf = new Uint8Array(size);
    this.ioctl(size > SIZEOF.kvm_xsave ? "GET_XSAVE2" : "GET_XSAVE", buf);
    return buf;
  }

  /** KVM_SET_XSAVE from bytes returned by getXsave() (at least 4096 bytes). */
  setXsave(area: Uint8Array): void {
    if (area.byteLength < SIZEOF.kvm_xsave)
      throw new KvmProtocolError("VCPU_XSAVE_SIZE", `xsave area of ${area.byteLength} bytes, at least 4096 expected`, { vcpu: this.id });
    this.ioctl("SET_XSAVE", area);
  }

  /** Read MSRs. Throws naming the first index KVM refused. */
  getMsrs(indices: readonly number[]): MsrEntry[] {
    const buf = encodeMsrs(indices.map((index) => ({ index, data: 0n })));
    const n = this.ioctl("GET_MSRS", buf, { count: indices.length });
    if (n < indices.length) throw this.msrError("KVM_GET_MSRS", indices[n]!);
    return decodeMsrs(buf, n);
  }

  /** Write MSRs. Throws naming the first entry KVM refused. */
  setMsrs(entries: readonly MsrEntry[]): void {
    const n = this.ioctl("SET_MSRS", encodeMsrs(entries), { count: entries.length });
    if (n < entries.length) throw this.msrError("KVM_SET_MSRS", entries[n]!.index);
  }

  private msrError(call: string, index: number): KvmProtocolError {
    return new KvmProtocolError("KVM_MSR_REFUSED", `${call}: KVM refused MSR 0x${index.toString(16)}`, {
      vm: this.partition.vmFd,
      vcpu: this.id,
      msr: BigInt(index),
    });
  }

  /** The local APIC's register page (struct kvm_lapic_state, 1024 bytes). Needs the in-kernel irqchip. */
  getLapic(): Uint8Array {
    const buf = new Uint8Array(SIZEOF.kvm_lapic_state);
    this.ioctl("GET_LAPIC", buf);
    return buf;
  }

  setLapic(state: Uint8Array): void {
    if (state.byteLength !== SIZEOF.kvm_lapic_state)
      throw new KvmProtocolError("VCPU_LAPIC_SIZE", `lapic state of ${state.byteLength} bytes, 1024 expected`, { vcpu: this.id });
    this.ioctl("SET_LAPIC", state);
  }

  /** KVM_SET_CPUID2: the CPUID leaves the guest sees (usually derived from KvmSystem.supportedCpuid()). */
  setCpuid(entries: readonly CpuidEntry[]): void {
    this.ioctl("SET_CPUID2", encodeCpuid2(entries), { count: entries.length });
  }

  /**
   * KVM_GET_CPUID2: the leaves set by setCpuid. Linux 6.1 (the nested test
   * host's, and Debian 12's) leaves `nent` as the caller gave it, after a
   * successful call and after E2BIG alike, where 6.18 writes the vCPU's count
   * back: so the buffer is filled with a marker leaf first, and the leaves are
   * those KVM wrote over it (it copies exactly its own), E2BIG asking for room.
   */
  getCpuid(): CpuidEntry[] {
    for (let capacity = 128; capacity <= 4096; capacity *= 2) {
      const buf = encodeCpuid2([], capacity);
      const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
      const leaf = (i: number) => SIZEOF.kvm_cpuid2 + i * SIZEOF.kvm_cpuid_entry2; // its `function` field
      for (let i = 0; i < capacity; i++) v.setUint32(leaf(i), UNWRITTEN_LEAF, true);
      try {
        this.ioctl("GET_CPUID2", buf, { capacity });
      } catch (e) {
        if (e instanceof KvmError && e.errno === libc.Errno.E2BIG) continue;
        throw e;
      }
      let written = 0;
      while (written < capacity && v.getUint32(leaf(written), true) !== UNWRITTEN_LEAF) written++;
      v.setUint32(0, written, true);
      return decodeCpuid2(buf);
    }
    throw new KvmProtocolError("KVM_CPUID_TOO_LARGE", "KVM_GET_CPUID2 wants more than 4096 entries", { vcpu: this.id });
  }

  /** KVM_MP_STATE_*: 0 runnable, 1 uninitialized (AP waiting for INIT/SIPI), 3 halted, ... */
  getMpState(): number {
    const buf = new Uint32Array(1);
    this.ioctl("GET_MP_STATE", buf);
    return buf[0]!;
  }

  setMpState(state: number): void {
    this.ioctl("SET_MP_STATE", new Uint32Array([state]), { state });
  }

  /** Pending/injected exceptions, interrupts and NMIs (struct kvm_vcpu_events), for saved state. */
  getVcpuEvents(): VcpuEvents {
    const buf = new Uint8Array(SIZEOF.kvm_vcpu_events);
    this.ioctl("GET_VCPU_EVENTS", buf);
    return decodeVcpuEvents(buf);
  }

  setVcpuEvents(events: VcpuEvents): void {
    this.ioctl("SET_VCPU_EVENTS", events.raw);
  }

  /** Extended control registers (struct kvm_xcrs) as raw bytes, for saved state. */
  getXcrs(): Uint8Array {
    const buf = new Uint8Array(SIZEOF.kvm_xcrs);
    this.ioctl("GET_XCRS", buf);
    return buf;
  }

  setXcrs(xcrs: Uint8Array): void {
    this.ioctl("SET_XCRS", xcrs);
  }

  /** Retire its kickers, unmap kvm_run and close the vCPU fd. Any exit object from run() is dead afterwards. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    // From here no kicker signals this vCPU's thread (it may end, and its pthread_t be reused). A
    // kick in flight is a pthread_kill away from done: wait for it.
    while (Atomics.compareExchange(this.kickGuard, 0, GUARD_OPEN, GUARD_RETIRED) === GUARD_KICKING);
    libc.releaseMapping(this.run8);
    libc.close(this.fd);
  }
}
