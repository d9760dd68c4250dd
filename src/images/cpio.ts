/**
 * Writer for the "newc" cpio format (SVR4 without CRC, magic 070701), the
 * format the Linux kernel unpacks as an initramfs
 * (Documentation/driver-api/early-userspace/buffer-format.rst).
 *
 * Entries are written in the order given; a directory must come before the
 * entries inside it. The archive is built in memory: initramfs images are tens
 * of megabytes at most.
 */

export type CpioEntry =
  | { kind: "dir"; path: string; mode?: number }
  | { kind: "file"; path: string; data: Uint8Array; mode?: number }
  | { kind: "symlink"; path: string; target: string }
  | { kind: "chardev"; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

function hex8(n: number): string {
  return (n >>> 0).toString(16).padStart(8, "0");
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

/** Serialises entries into one newc archive, ending with the TRAILER!!! record. */
export function writeNewcCpio(entries: readonly CpioEntry[], mtime = 0): Buffer {
  const chunks: Buffer[] = [];
  let ino = 1;
  const push = (name: string, mode: number, data: Uint8Array, rdevMajor = 0, rdevMinor = 0, nlink = 1): void => {
    const nameBytes = Buffer.from(name + "\0", "utf8");
    const header =
      "070701" +
      hex8(ino++) +
      hex8(mode) +
      hex8(0) + // uid
      hex8(0) + // gid
      hex8(nlink) +
      hex8(mtime) +
      hex8(data.length) +
      hex8(0) + // devmajor
      hex8(0) + // devminor
      hex8(rdevMajor) +
      hex8(rdevMinor) +
      hex8(nameBytes.length) +
      hex8(0); // check
    chunks.push(Buffer.from(header, "ascii"), nameBytes, Buffer.alloc(pad4(110 + nameBytes.length)));
    if (data.length > 0) {
      chunks.push(Buffer.from(data.buffer, data.byteOffset, data.length), Buffer.alloc(pad4(data.length)));
    }
  };
  for (const e of entries) {
    const name = e.path.replace(/^\/+/, "");
    if (name === "" || name.split("/").includes("..")) throw new Error(`bad cpio path: ${e.path}`);
    switch (e.kind) {
      case "dir":
        push(name, S_IFDIR | (e.mode ?? 0o755), new Uint8Array(0), 0, 0, 2);
        break;
      case "file":
        push(name, S_IFREG | (e.mode ?? 0o644), e.data);
        break;
      case "symlink":
        push(name, S_IFLNK | 0o777, Buffer.from(e.target, "utf8"));
        break;
      case "chardev":
        push(name, S_IFCHR | (e.mode ?? 0o600), new Uint8Array(0), e.major, e.minor);
        break;
    }
  }
  push("TRAILER!!!", 0, new Uint8Array(0), 0, 0, 1);
  return Buffer.concat(chunks);
}

/** One entry as read back by {@link readNewcCpio} (for tests and inspection). */
export interface CpioRecord {
  path: string;
  mode: number;
  data: Buffer;
}

/** Parses a newc archive (uncompressed); stops at TRAILER!!!. Throws on malformed input. */
export function readNewcCpio(archive: Buffer): CpioRecord[] {
  const out: CpioRecord[] = [];
  let off = 0;
  for (;;) {
    if (off + 110 > archive.length) throw new Error(`cpio truncated at ${off}`);
    const magic = archive.toString("ascii", off, off + 6);
    if (magic !== "070701" && magic !== "070702") throw new Error(`bad cpio magic at ${off}`);
    const field = (i: number): number => parseInt(archive.toString("ascii", off + 6 + i * 8, off + 14 + i * 8), 16);
    const mode = field(1);
    const size = field(6);
    const nameSize = field(11);
    const nameStart = off + 110;
    const path = archive.toString("utf8", nameStart, nameStart + nameSize - 1);
    const dataStart = nameStart + nameSize + pad4(110 + nameSize);
    if (dataStart + size > archive.length) throw new Error(`cpio entry ${path} truncated`);
    if (path === "TRAILER!!!") return out;
    out.push({ path, mode, data: archive.subarray(dataStart, dataStart + size) });
    off = dataStart + size + pad4(size);
  }
}
