/**
 * Reading kernel files for a boot: only what is needed. Checking and planning a
 * bzImage boot needs its setup code and header (the first KERNEL_HEAD_BYTES)
 * and its size, not the megabytes of compressed kernel behind them.
 * Built-ins only: the worker loads it on its start-up path.
 */
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { KERNEL_HEAD_BYTES, LinuxLoadError, type KernelFileHead, type UnpackedKernelImage } from "../machine/linux-boot.js";
import type { KernelExtent } from "../machine/kernel-elf.js";

/** The first KERNEL_HEAD_BYTES of a kernel file (its setup code and header) and its size. */
export function readKernelHead(path: string): KernelFileHead {
  const fd = openSync(path, "r");
  try {
    const size = fstatSync(fd).size;
    const head = new Uint8Array(Math.min(size, KERNEL_HEAD_BYTES));
    let got = 0;
    while (got < head.length) {
      const n = readSync(fd, head, got, head.length - got, got);
      if (n === 0) break;
      got += n;
    }
    return { head: head.subarray(0, got), size };
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
  return {
    entry: layout.entry,
    loadStart: layout.loadStart,
    loadEnd: layout.loadEnd,
    extents: layout.extents,
    imageBytes: layout.imageBytes,
    read: (x: KernelExtent, into: Uint8Array): void => {
      let got = 0;
      while (got < x.length) {
        const n = readSync(fd, into, got, x.length - got, x.offset + got);
        if (n === 0)
          throw new LinuxLoadError("UNPACKED_KERNEL_TRUNCATED", `${layout.imagePath} ends at ${x.offset + got}; an extent needs ${x.offset + x.length}`, { offset: x.offset, length: x.length });
        got += n;
      }
    },
    close: () => closeSync(fd),
  };
}
