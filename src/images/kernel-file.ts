/**
 * Reading kernel files for a boot: only what is needed. Checking and planning a
 * bzImage boot needs its setup code and header (the first KERNEL_HEAD_BYTES)
 * and its size, not the megabytes of compressed kernel behind them.
 * Built-ins only: the worker loads it on its start-up path.
 */
import { closeSync, fstatSync, openSync, readSync } from "node:fs";
import { KERNEL_HEAD_BYTES, type KernelFileHead } from "../machine/linux-boot.js";

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

