/**
 * Typed errors shared by every layer. Each carries the domain context a user
 * or an operator needs (which VM, which disk, which offset, which ioctl), so
 * the CLI can print one clear line and never a bare stack trace.
 */

export type ErrorContext = Readonly<Record<string, string | number | bigint | boolean | undefined>>;

export class PartisError extends Error {
  /** Stable machine-readable code, e.g. "KVM_IOCTL_FAILED", "VHD_BAD_CHECKSUM". */
  readonly code: string;
  readonly context: ErrorContext;
  constructor(code: string, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
    this.context = context;
  }
}

/** Bad input from a user (CLI flags, config): the CLI exits with status 2. */
export class UsageError extends PartisError {
  constructor(message: string, context: ErrorContext = {}) {
    super("USAGE", message, context);
  }
}

/** The host cannot run what was asked (no /dev/kvm, not enough memory...): exit status 2. */
export class HostCapabilityError extends PartisError {}
