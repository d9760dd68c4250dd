/**
 * Errors of the FFI layer. A failed libc call becomes a `SystemCallError`
 * (errno, its symbolic name, the call and its context); a failed KVM ioctl
 * becomes a `KvmError`, which adds the ioctl's name and the VM / vCPU it was
 * aimed at, so an operator reads one line such as
 *   KVM_SET_USER_MEMORY_REGION failed: EINVAL (Invalid argument) [vm=7 slot=1]
 */
import { PartisError, type ErrorContext } from "../errors.js";

export class SystemCallError extends PartisError {
  readonly errno: number;
  /** Symbolic errno ("EINVAL"), or "E?<n>" when unknown. */
  readonly errnoName: string;
  /** The libc function (or ioctl name) that failed. */
  readonly call: string;
  constructor(
    call: string,
    errno: number,
    errnoName: string,
    description: string,
    context: ErrorContext = {},
    code = "SYSCALL_FAILED",
  ) {
    const extra = Object.entries(context)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${typeof v === "bigint" ? "0x" + v.toString(16) : String(v)}`)
      .join(" ");
    super(code, `${call} failed: ${errnoName} (${description})${extra ? ` [${extra}]` : ""}`, { ...context, call, errno, errnoName });
    this.errno = errno;
    this.errnoName = errnoName;
    this.call = call;
  }
}

/** A KVM ioctl failed. `ioctl` is its name as in linux/kvm.h (e.g. "KVM_RUN"). */
export class KvmError extends SystemCallError {
  readonly ioctl: string;
  constructor(ioctl: string, errno: number, errnoName: string, description: string, context: ErrorContext = {}) {
    super(ioctl, errno, errnoName, description, context, "KVM_IOCTL_FAILED");
    this.ioctl = ioctl;
  }
}

/** KVM behaved in a way Partis cannot use (bad API version, short mmap size, malformed reply). */
export class KvmProtocolError extends PartisError {}
