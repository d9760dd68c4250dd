/**
 * Reading kernel files for a boot: only what is needed. Checking and planning a
 * bzImage boot needs its setup code and header (the first KERNEL_HEAD_BYTES)
 * and its size, not the megabytes of compressed kernel behind them.
 * Light imports only: the worker loads it on its start-up path.
 */
import { closeSync, fstatSync, openSync } from "node:fs";
import { preadFully } from "../storage/raw.js";
import { KERNEL_HEAD_BYTES, LinuxLoadError, type KernelFileHead, type UnpackedKernelImage } from "../machine/linux-boot.js";
import type { KernelExtent } from "../machine/kernel-elf.js";

/** The first KERNEL_HEAD_BYTES of a kernel file (its setup code and header) and its size. */
export function readKernelHead(path: string): KernelFileHead {
  const fd = openSync(path, "r");
  try {
    const size = fstatSync(fd).size;
    const head = new Uint8Array(Math.min(size, KERNEL_HEAD_BYTES));
    preadFully(fd, head, 0);
    return { head, size };
  } finally {
    closeSync(fd);
  }
}

/**
 * An unpacked kernel's flat image opened for loading: `read` fills each
 * extent straight into the view it is given (guest RAM), so the tens of
 * megabytes are read once and never held in a buffer. Close it after loading.
 */
export function openUnpackedKernel(layout: Omit<UnpackedKernelImage, "read"> & { readonly imagePath: string }): UnpackedKernelImage & { close(): void } {
  const fd = openSync(layout.imagePath, "r");
  const size = fstatSync(fd).size;
  return {
    entry: layout.entry,
    loadStart: layout.loadStart,
    loadEnd: layout.loadEnd,
    extents: layout.extents,
    imageBytes: layout.imageBytes,
    read: (x: KernelExtent, into: Uint8Array): void => {
      if (x.offset + x.length > size)
        throw new LinuxLoadError("UNPACKED_KERNEL_TRUNCATED", `${layout.imagePath} ends at ${size}; an extent needs ${x.offset + x.length}`, { offset: x.offset, length: x.length });
      preadFully(fd, into.subarray(0, x.length), x.offset);
    },
    close: () => closeSync(fd),
  };
}
