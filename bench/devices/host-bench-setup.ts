/**
 * What the host-side device benchmarks (no guest) share: their command-line
 * options, and guest RAM that is a memfd mapping as in the worker, so disk
 * back ends take the host-address (one preadv/pwritev, io_uring) paths.
 */
import { join } from "node:path";
import { ChunkedGuestMemory } from "../../src/machine/guest-memory.js";
import { libc } from "../../src/hypervisor/index.js";
import type { BlockDevice } from "../../src/storage/block-device.js";
import { createDisk, openDisk } from "../../src/storage/open.js";

/** `--name value` from the command line, else `dflt`. */
export function option(name: string, dflt: string): string {
  const args = process.argv.slice(2);
  const i = args.indexOf(name);
  return i >= 0 && args[i + 1] !== undefined ? args[i + 1]! : dflt;
}

/** Whether `--name` is on the command line. */
export function flag(name: string): boolean {
  return process.argv.slice(2).includes(name);
}

/** A fixed raw image `disk.raw` of `bytes` in `dir`, every byte written (0x5a), so reads find data, not holes. */
export function filledRawImage(dir: string, bytes: number): BlockDevice {
  const path = join(dir, "disk.raw");
  createDisk(path, "raw", { type: "fixed", size: bytes });
  const disk = openDisk(path);
  const fill = new Uint8Array(1024 * 1024).fill(0x5a);
  for (let o = 0; o < bytes; o += fill.length) disk.write(o, fill.subarray(0, Math.min(fill.length, bytes - o)));
  return disk;
}

/** `bytes` of guest RAM at guest-physical 0, one memfd mapping (host-mapped: hostAddresses works). */
export function memfdGuestRam(bytes: number, name = "bench-guest-ram"): ChunkedGuestMemory {
  return new ChunkedGuestMemory(
    [{ gpa: 0, length: bytes, fileOffset: 0 }],
    (off, len) => {
      const fd = libc.memfdCreate(name);
      libc.ftruncate(fd, bytes);
      return libc.mapSharedFile(fd, off, len);
    },
    undefined,
    (v) => Number(libc.addressOfView(v)),
  );
}
