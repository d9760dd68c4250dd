/** Errors raised while preparing guest and nested-host images. */
import { PartisError, type ErrorContext } from "../errors.js";

/**
 * A Debian tool (apt-cache, apt-get, dpkg-deb, depmod) failed or gave an
 * answer that cannot be used. `code` is one of APT_RESOLVE_FAILED,
 * APT_DOWNLOAD_FAILED, DPKG_EXTRACT_FAILED, DEPMOD_FAILED, TOOL_MISSING.
 */
export class PackageToolError extends PartisError {
  constructor(code: string, message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super(code, message, context, options);
  }
}

/** A requested kernel module does not exist in the kernel package (neither module nor built-in). */
export class KernelModuleError extends PartisError {
  constructor(message: string, context: ErrorContext = {}) {
    super("KERNEL_MODULE_NOT_FOUND", message, context);
  }
}

/** The image cache cannot be used (lock held too long, unwritable directory, corrupt entry). */
export class ImageCacheError extends PartisError {
  constructor(message: string, context: ErrorContext = {}, options?: { cause?: unknown }) {
    super("IMAGE_CACHE", message, context, options);
  }
}
