/**
 * SyscallThread: a native thread with no V8 isolate that makes system calls
 * on request. It exists for one reason: a vCPU needs a thread of its own
 * (KVM_RUN blocks, and KVM wants every vCPU ioctl from the thread that
 * created the vCPU), and a Node worker per vCPU costs ~10 MiB of private
 * memory (docs/benchmarks.md, "Memory per vCPU"). A thread that only waits
 * and calls `syscall` costs a few KiB of stack; the JavaScript that handles
 * the exits can then live on one thread for many vCPUs.
 *
 * The thread runs a few dozen bytes of x86-64 machine code, written below
 * instruction by instruction and mapped read+execute (never writable and
 * executable at once). It loops over one control block:
 *
 *   +0  u32 state      IDLE 0, REQUESTED 1, DONE 2, EXIT 3
 *   +8  u64 nr         system call number
 *   +16 u64 args[6]
 *   +64 i64 result     raw kernel result: negative is -errno
 *   +72 u64 doorbell   address of a u32 to increment and futex-wake after
 *                      each call (0: none), for one waiter over many threads
 *
 * While the state is not REQUESTED or EXIT it sleeps in FUTEX_WAIT on the
 * state word; it makes the call, stores the result, sets DONE and wakes
 * both the state word and the doorbell. The requester (JavaScript) fills
 * nr and args, sets REQUESTED and wakes the state word; it waits for DONE
 * the same way, or on the doorbell for any of several threads.
 *
 * Signals: the thread inherits the creator's signal mask; a signal that
 * interrupts its call (a vCPU kick) makes the call return -EINTR, as KVM_RUN
 * does on any thread. Scope: x86-64 Linux only, like the rest of Partis.
 */
import * as libc from "./libc.js";
import { KvmProtocolError, SystemCallError } from "./errors.js";
import type { ErrorContext } from "../errors.js";

const SYS_futex = 202;
const FUTEX_WAIT_PRIVATE = 128;
const FUTEX_WAKE_PRIVATE = 129;

const enum State {
  Idle = 0,
  Requested = 1,
  Done = 2,
  Exit = 3,
}

const OFF_NR = 8;
const OFF_ARGS = 16;
const OFF_RESULT = 64;
const OFF_DOORBELL = 72;
/** Bytes of the control block; the scratch area follows it in the same mapping. */
const CONTROL_BYTES = 4096;
/** Scratch memory for ioctl structs (kvm_xsave is 4 KiB; kvm_cpuid2 with 100 entries ~4 KiB). */
export const SCRATCH_BYTES = 16384;

const pthreadCreate = libc.lib.func("int pthread_create(void *thread, void *attr, uint64_t start, uint64_t arg)") as (
  thread: BigUint64Array,
  attr: null,
  start: bigint,
  arg: bigint,
) => number;
const pthreadJoin = libc.lib.func("int pthread_join(uint64_t thread, void *retval)") as (thread: bigint, retval: null) => number;
const mprotect = libc.lib.func("int mprotect(void *addr, size_t len, int prot)") as (addr: unknown, len: number, prot: number) => number;
/** syscall(2) with the futex argument shapes (variadic in C; see libc.ts on fixed prototypes). */
const futexCall = libc.lib.func("long syscall(long nr, uint64_t uaddr, long op, long val, uint64_t timeout)") as (
  nr: number,
  uaddr: number,
  op: number,
  val: number,
  timeout: number,
) => number;

/** The same call on a thread of libuv's pool; the callback runs on the calling thread (koffi's asynchronous calls). */
const futexCallAsync = (futexCall as unknown as { async: (nr: number, uaddr: number, op: number, val: number, timeout: number, cb: (err: unknown, res: number) => void) => void }).async;

/**
 * The thread's code. Labels are resolved by `assembleSyscallLoop` (rel8 jumps only).
 * Register use: rbx holds the control block (callee-saved, restored on exit);
 * `syscall` clobbers only rcx and r11.
 */
type Jump = readonly ["je" | "jz" | "jmp", string];
type Line = readonly number[] | Jump | `${string}:`;

const PROGRAM: readonly Line[] = [
  [0x53], // push rbx
  [0x48, 0x89, 0xfb], // mov rbx, rdi            ; rdi = control block (the start routine's argument)
  "wait:",
  [0x8b, 0x03], // mov eax, [rbx]                 ; state
  [0x83, 0xf8, State.Requested], // cmp eax, REQUESTED
  ["je", "go"],
  [0x83, 0xf8, State.Exit], // cmp eax, EXIT
  ["je", "quit"],
  [0x89, 0xc2], // mov edx, eax                   ; futex(&state, FUTEX_WAIT_PRIVATE, state, NULL)
  [0x48, 0x89, 0xdf], // mov rdi, rbx
  [0xbe, FUTEX_WAIT_PRIVATE, 0, 0, 0], // mov esi, FUTEX_WAIT_PRIVATE
  [0x45, 0x31, 0xd2], // xor r10d, r10d
  [0xb8, SYS_futex, 0, 0, 0], // mov eax, SYS_futex
  [0x0f, 0x05], // syscall                        ; returns at once if the state moved on
  ["jmp", "wait"],
  "go:",
  [0x48, 0x8b, 0x43, OFF_NR], // mov rax, [rbx+8]
  [0x48, 0x8b, 0x7b, OFF_ARGS], // mov rdi, [rbx+16]
  [0x48, 0x8b, 0x73, OFF_ARGS + 8], // mov rsi, [rbx+24]
  [0x48, 0x8b, 0x53, OFF_ARGS + 16], // mov rdx, [rbx+32]
  [0x4c, 0x8b, 0x53, OFF_ARGS + 24], // mov r10, [rbx+40]
  [0x4c, 0x8b, 0x43, OFF_ARGS + 32], // mov r8, [rbx+48]
  [0x4c, 0x8b, 0x4b, OFF_ARGS + 40], // mov r9, [rbx+56]
  [0x0f, 0x05], // syscall
  [0x48, 0x89, 0x43, OFF_RESULT], // mov [rbx+64], rax
  [0xc7, 0x03, State.Done, 0, 0, 0], // mov dword [rbx], DONE   ; x86 stores are ordered: result first
  [0x48, 0x89, 0xdf], // mov rdi, rbx             ; futex(&state, FUTEX_WAKE_PRIVATE, INT_MAX)
  [0xbe, FUTEX_WAKE_PRIVATE, 0, 0, 0], // mov esi, FUTEX_WAKE_PRIVATE
  [0xba, 0xff, 0xff, 0xff, 0x7f], // mov edx, 0x7fffffff
  [0xb8, SYS_futex, 0, 0, 0], // mov eax, SYS_futex
  [0x0f, 0x05], // syscall
  [0x48, 0x8b, 0x7b, OFF_DOORBELL], // mov rdi, [rbx+72]
  [0x48, 0x85, 0xff], // test rdi, rdi
  ["jz", "wait"],
  [0xf0, 0xff, 0x07], // lock inc dword [rdi]    ; doorbell sequence
  [0xbe, FUTEX_WAKE_PRIVATE, 0, 0, 0], // mov esi, FUTEX_WAKE_PRIVATE
  [0xba, 0xff, 0xff, 0xff, 0x7f], // mov edx, 0x7fffffff
  [0xb8, SYS_futex, 0, 0, 0], // mov eax, SYS_futex
  [0x0f, 0x05], // syscall
  ["jmp", "wait"],
  "quit:",
  [0x31, 0xc0], // xor eax, eax                   ; return NULL: the thread ends
  [0x5b], // pop rbx
  [0xc3], // ret
];

const JUMP_OPCODES = { je: 0x74, jz: 0x74, jmp: 0xeb } as const;

function isJump(line: readonly number[] | Jump): line is Jump {
  return typeof line[0] === "string";
}

/** Machine code for PROGRAM, rel8 jumps resolved (every target is within ±127 bytes). */
export function assembleSyscallLoop(): Uint8Array {
  const items = PROGRAM;
  const labels = new Map<string, number>();
  let at = 0;
  for (const it of items) {
    if (typeof it === "string") labels.set(it.slice(0, -1), at);
    else at += isJump(it) ? 2 : it.length;
  }
  const out: number[] = [];
  for (const it of items) {
    if (typeof it === "string") continue;
    if (isJump(it)) {
      const target = labels.get(it[1]);
      if (target === undefined) throw new Error(`syscall loop: no label ${it[1]}`);
      const rel = target - (out.length + 2);
      if (rel < -128 || rel > 127) throw new Error(`syscall loop: jump to ${it[1]} out of rel8 range`);
      out.push(JUMP_OPCODES[it[0]], rel & 0xff);
    } else out.push(...it);
  }
  return Uint8Array.from(out);
}

/** The loop's code page in this isolate (threads started from here run it), while any runs. */
let code: { readonly pointer: unknown; readonly address: bigint } | undefined;

/** The loop's code, mapped read+execute while this isolate has SyscallThreads (unmapped after the last stops). */
function loopCode(): bigint {
  if (code !== undefined) return code.address;
  const bytes = assembleSyscallLoop();
  const page = libc.mmap(4096, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS, -1, 0, { what: "syscall thread code" });
  libc.viewOf(page, 4096).set(bytes);
  if (mprotect(page, 4096, libc.PROT_READ | libc.PROT_EXEC) !== 0) {
    const e = libc.lastError("mprotect", { what: "syscall thread code" });
    libc.munmap(page, 4096);
    throw e;
  }
  code = { pointer: page, address: libc.addressOf(page) };
  return code.address;
}

/** After the last thread of this isolate has been joined: nothing runs the code any more. */
function releaseLoopCode(): void {
  if (code === undefined) return;
  libc.munmap(code.pointer, 4096);
  code = undefined;
}

function putU64(words: Uint32Array, byteOffset: number, value: number | bigint): void {
  const i = byteOffset >>> 2;
  if (typeof value === "bigint") {
    const v = BigInt.asUintN(64, value);
    words[i] = Number(v & 0xffffffffn);
    words[i + 1] = Number(v >> 32n);
  } else if (value >= 0) {
    words[i] = value >>> 0;
    words[i + 1] = Math.floor(value / 4294967296);
  } else {
    // Small negatives (fd -1, AT_FDCWD): two's complement over 64 bits.
    words[i] = value >>> 0;
    words[i + 1] = 0xffffffff;
  }
}

/**
 * Many SyscallThreads, one waiter: each thread increments the doorbell and
 * wakes it after every call, so a single JavaScript thread can sleep until
 * any of them is done.
 */
export class SyscallDoorbell {
  private readonly word: Int32Array;
  /** struct timespec for timed waits, in the same page. */
  private readonly timeout: BigInt64Array;
  private readonly timeoutAddress: number;
  readonly address: bigint;
  private readonly addressNumber: number;
  private closed = false;

  private constructor(private readonly view: Uint8Array) {
    this.word = new Int32Array(view.buffer, view.byteOffset, 1);
    this.timeout = new BigInt64Array(view.buffer, view.byteOffset + 16, 2);
    this.address = libc.addressOfView(view);
    this.addressNumber = Number(this.address);
    this.timeoutAddress = this.addressNumber + 16;
  }

  static create(): SyscallDoorbell {
    return new SyscallDoorbell(libc.alignedBuffer(64, 64));
  }

  /** The current sequence: read it, look for done threads, then `wait(sequence)` if none. */
  get sequence(): number {
    return Atomics.load(this.word, 0);
  }

  /** Spin up to `times` reads for the doorbell to move past `sequence`; true if it did (then no sleep is needed). */
  poll(sequence: number, times: number): boolean {
    for (let i = 0; i < times; i++) if (Atomics.load(this.word, 0) !== sequence) return true;
    return false;
  }

  /** Sleep until the doorbell moves past `sequence` (returns at once if it already has), or `timeoutMs`. */
  wait(sequence: number, timeoutMs?: number): void {
    let ts = 0;
    if (timeoutMs !== undefined) {
      this.timeout[0] = BigInt(Math.floor(timeoutMs / 1000));
      this.timeout[1] = BigInt(Math.round((timeoutMs % 1000) * 1e6));
      ts = this.timeoutAddress;
    }
    futexWait(this.addressNumber, sequence, ts);
  }

  /**
   * `wait` on a thread of libuv's pool, for a waiter that must not block (the
   * event loop's thread): `woken` runs on the calling thread once the doorbell
   * has moved past `sequence`, or after `timeoutMs`. One such wait at a time
   * per doorbell (they share the timeout), and none beside a blocking `wait`.
   */
  waitAsync(sequence: number, timeoutMs: number, woken: () => void): void {
    this.timeout[0] = BigInt(Math.floor(timeoutMs / 1000));
    this.timeout[1] = BigInt(Math.round((timeoutMs % 1000) * 1e6));
    // EAGAIN, EINTR, ETIMEDOUT alike: the caller looks at the word again.
    futexCallAsync(SYS_futex, this.addressNumber, FUTEX_WAIT_PRIVATE, sequence | 0, this.timeoutAddress, woken);
  }

  /** Release its memory. Only once every thread that rings it has stopped (they write to it). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    libc.releaseMapping(this.view);
  }
}

/** futex(FUTEX_WAIT_PRIVATE); `timespec`: the address of a struct timespec, 0 for none. */
function futexWait(address: number, expected: number, timespec = 0): void {
  // EAGAIN (the word moved), EINTR, ETIMEDOUT: the caller looks at the word again either way.
  futexCall(SYS_futex, address, FUTEX_WAIT_PRIVATE, expected | 0, timespec);
}

function futexWake(address: number): void {
  futexCall(SYS_futex, address, FUTEX_WAKE_PRIVATE, 0x7fffffff, 0);
}

/**
 * Threads started and not stopped. Their control blocks must outlive any
 * JavaScript reference: a collected view would unmap memory the native
 * thread is still reading.
 */
const running = new Set<SyscallThread>();

export class SyscallThread {
  private readonly words: Uint32Array;
  private readonly state: Int32Array;
  private readonly controlAddress: number;
  private readonly scratchView: Uint8Array;
  /** The scratch area's host address (what the kernel is given). */
  readonly scratchAddress: number;
  private stopped = false;

  private constructor(
    private readonly block: Uint8Array,
    /** pthread_t of the native thread: what pthread_kill (a vCPU kick) needs. */
    readonly thread: bigint,
    private readonly context: ErrorContext,
    /** Held so that it outlives the thread, which writes to it after every call. */
    readonly doorbell: SyscallDoorbell | undefined,
  ) {
    this.words = new Uint32Array(block.buffer, block.byteOffset, CONTROL_BYTES >>> 2);
    this.state = new Int32Array(block.buffer, block.byteOffset, 1);
    this.controlAddress = Number(libc.addressOfView(block));
    this.scratchView = block.subarray(CONTROL_BYTES, CONTROL_BYTES + SCRATCH_BYTES);
    this.scratchAddress = this.controlAddress + CONTROL_BYTES;
  }

  /**
   * Start a native thread. `doorbell`: ring it after every call (for a
   * thread that waits on several). `context` goes into errors (e.g. the vCPU).
   */
  static start(options: { doorbell?: SyscallDoorbell; context?: ErrorContext } = {}): SyscallThread {
    const code = loopCode();
    const block = libc.alignedBuffer(CONTROL_BYTES + SCRATCH_BYTES);
    const words = new Uint32Array(block.buffer, block.byteOffset, 32);
    if (options.doorbell !== undefined) putU64(words, OFF_DOORBELL, options.doorbell.address);
    const out = new BigUint64Array(1);
    const r = pthreadCreate(out, null, code, libc.addressOfView(block));
    if (r !== 0) {
      libc.releaseMapping(block);
      if (running.size === 0) releaseLoopCode();
      throw new SystemCallError("pthread_create", r, libc.errnoName(r), libc.strerror(r), { what: "syscall thread", ...options.context });
    }
    const t = new SyscallThread(block, out[0]!, options.context ?? {}, options.doorbell);
    running.add(t);
    return t;
  }

  /** Its memory is gone once it has stopped: every use after that is refused, never a stray access. */
  private checkRunning(): void {
    if (this.stopped) throw new KvmProtocolError("SYSCALL_THREAD_STOPPED", "the syscall thread has stopped", this.context);
  }

  /** Name the thread (as ps and top show it; 15 bytes at most), through the thread itself. */
  setName(name: string): void {
    const scratch = this.scratch;
    scratch.fill(0, 0, 16);
    scratch.set(new TextEncoder().encode(name).subarray(0, 15));
    this.call(SYS_prctl, PR_SET_NAME, this.scratchAddress);
  }

  /** Scratch memory for call arguments, SCRATCH_BYTES long (refused once the thread has stopped). */
  get scratch(): Uint8Array {
    this.checkRunning();
    return this.scratchView;
  }

  /** True while a posted call has not been taken (requested or done); false once stopped. */
  get busy(): boolean {
    if (this.stopped) return false;
    const s = Atomics.load(this.state, 0);
    return s === State.Requested || s === State.Done;
  }

  /** True when the posted call has finished and its result waits in `take()`. */
  get done(): boolean {
    this.checkRunning();
    return Atomics.load(this.state, 0) === State.Done;
  }

  /**
   * Hand the thread a system call without waiting. Arguments are integers
   * (addresses as Numbers or BigInts; small negatives are sign-extended).
   */
  post(nr: number, a0: number | bigint = 0, a1: number | bigint = 0, a2: number | bigint = 0, a3: number | bigint = 0, a4: number | bigint = 0, a5: number | bigint = 0): void {
    this.checkRunning();
    if (Atomics.load(this.state, 0) !== State.Idle) throw new KvmProtocolError("SYSCALL_THREAD_BUSY", "the syscall thread has a call in flight", { nr, ...this.context });
    const w = this.words;
    w[OFF_NR >>> 2] = nr;
    w[(OFF_NR >>> 2) + 1] = 0;
    putU64(w, OFF_ARGS, a0);
    putU64(w, OFF_ARGS + 8, a1);
    putU64(w, OFF_ARGS + 16, a2);
    putU64(w, OFF_ARGS + 24, a3);
    putU64(w, OFF_ARGS + 32, a4);
    putU64(w, OFF_ARGS + 40, a5);
    Atomics.store(this.state, 0, State.Requested);
    futexWake(this.controlAddress);
  }

  /** The finished call's raw result (negative: -errno); the thread is idle again after. */
  take(): number {
    this.checkRunning();
    if (Atomics.load(this.state, 0) !== State.Done) throw new KvmProtocolError("SYSCALL_THREAD_NOT_DONE", "no finished call to take", this.context);
    const lo = this.words[OFF_RESULT >>> 2]!;
    const hi = this.words[(OFF_RESULT >>> 2) + 1]!;
    Atomics.store(this.state, 0, State.Idle);
    return hi >= 0x80000000 ? (hi - 0x100000000) * 4294967296 + lo : hi * 4294967296 + lo;
  }

  /** Block until the posted call is done; returns its raw result. */
  wait(): number {
    this.checkRunning();
    for (;;) {
      const s = Atomics.load(this.state, 0);
      if (s === State.Done) return this.take();
      if (s !== State.Requested) throw new KvmProtocolError("SYSCALL_THREAD_IDLE", "waited with no call in flight", this.context);
      futexWait(this.controlAddress, s);
    }
  }

  /** Make a system call on the thread and wait for it; returns the raw result (negative: -errno). */
  call(nr: number, a0: number | bigint = 0, a1: number | bigint = 0, a2: number | bigint = 0, a3: number | bigint = 0, a4: number | bigint = 0, a5: number | bigint = 0): number {
    this.post(nr, a0, a1, a2, a3, a4, a5);
    return this.wait();
  }

  /**
   * ioctl(2) on the thread. A struct argument is copied into the scratch area
   * and back (the kernel may write it); an integer goes as it is. Raw result.
   */
  ioctl(fd: number, request: number, arg: ArrayBufferView | number | bigint | null): number {
    this.checkRunning();
    if (arg === null) return this.call(SYS_ioctl, fd, request, 0);
    if (!ArrayBuffer.isView(arg)) return this.call(SYS_ioctl, fd, request, arg);
    const bytes = new Uint8Array(arg.buffer, arg.byteOffset, arg.byteLength);
    if (bytes.length > SCRATCH_BYTES) throw new KvmProtocolError("SYSCALL_THREAD_ARGUMENT", `an ioctl argument of ${bytes.length} bytes exceeds the ${SCRATCH_BYTES}-byte scratch area`, { request, ...this.context });
    this.scratchView.set(bytes);
    const r = this.call(SYS_ioctl, fd, request, this.scratchAddress);
    bytes.set(this.scratchView.subarray(0, bytes.length));
    return r;
  }

  /**
   * End the thread and wait for it. A call in flight is waited for first:
   * one that may block (KVM_RUN of a halted vCPU) must be kicked out by the
   * caller before.
   */
  stop(): void {
    if (this.stopped) return;
    if (Atomics.load(this.state, 0) === State.Requested) this.wait();
    this.stopped = true;
    Atomics.store(this.state, 0, State.Exit);
    futexWake(this.controlAddress);
    const r = pthreadJoin(this.thread, null);
    running.delete(this);
    libc.releaseMapping(this.block);
    if (running.size === 0) releaseLoopCode();
    if (r !== 0) throw new SystemCallError("pthread_join", r, libc.errnoName(r), libc.strerror(r), { what: "syscall thread", ...this.context });
  }
}

const SYS_ioctl = 16;
const SYS_prctl = 157;
const PR_SET_NAME = 15;

/** System call numbers (x86-64) the callers of this module use. */
export const SYS = { ioctl: SYS_ioctl, gettid: 186, rt_sigprocmask: 14, futex: SYS_futex } as const;

/** The signal mask argument rt_sigprocmask takes (kernel sigset: 8 bytes on x86-64). */
export const KERNEL_SIGSET_BYTES = 8;
