/**
 * Program pages: the resident pages of this process's program files (the
 * `node` binary, shared libraries, koffi's addon), and releasing the ones
 * start-up alone needed.
 *
 * Why: a VMM process's RSS counts every page of its program files it has
 * mapped. For a Node process that is ~34 MiB before any JavaScript runs and
 * ~44 MiB once Partis's modules are loaded: the dynamic linker's tables, the
 * V8 start-up snapshot, the parser and compilers that loaded the modules. A
 * running VM touches a fraction of it (its exit paths, the interpreter and
 * the code the JIT made). `releaseProgramPages()` drops this process's page
 * table entries for the read-only, private file mappings that hold no
 * private copy of a page (no `Anonymous` pages): their contents are the
 * file's, so the next access maps the same page-cache page again (a minor
 * fault, no I/O while the file stays cached). Nothing is freed that
 * another process maps, and nothing the process wrote is lost; the page
 * cache keeps the pages until the host needs the memory.
 *
 * What is never touched: writable mappings, shared mappings (guest RAM, the
 * kvm_run areas, device memory), anonymous memory, mappings of deleted files
 * (memfds), locked or I/O mappings, and any read-only mapping holding a
 * private copy (the relocated RELRO part of a library): releasing that would
 * put the file's unrelocated bytes back.
 */
import { readFileSync } from "node:fs";
import * as libc from "./libc.js";

/** One mapping of /proc/self/smaps, with what `releaseProgramPages` looks at. */
export interface ProcessMapping {
  readonly start: bigint;
  readonly end: bigint;
  /** "r-xp", "rw-s", ... */
  readonly perms: string;
  /** The path, or a pseudo-name ("[heap]", "anon_inode:kvm-vcpu:0"), or "" for anonymous memory. */
  readonly name: string;
  readonly rssKiB: number;
  readonly anonymousKiB: number;
  /** The VmFlags line's two-letter flags ("rd", "ex", "lo", "io", ...). */
  readonly flags: readonly string[];
}

const HEADER = /^([0-9a-f]+)-([0-9a-f]+) ([-rwxsp]{4}) [0-9a-f]+ [0-9a-f]+:[0-9a-f]+ \d+\s*(.*)$/;

/** Parse /proc/<pid>/smaps. Mappings whose Anonymous or Rss line is missing are reported with -1 (never released). */
export function parseSmaps(text: string): ProcessMapping[] {
  const out: ProcessMapping[] = [];
  let cur: { start: bigint; end: bigint; perms: string; name: string; rssKiB: number; anonymousKiB: number; flags: string[] } | undefined;
  for (const line of text.split("\n")) {
    const h = HEADER.exec(line);
    if (h !== null) {
      if (cur !== undefined) out.push(cur);
      cur = { start: BigInt("0x" + h[1]!), end: BigInt("0x" + h[2]!), perms: h[3]!, name: h[4]!, rssKiB: -1, anonymousKiB: -1, flags: [] };
      continue;
    }
    if (cur === undefined) continue;
    const colon = line.indexOf(":");
    if (colon < 0) continue;
    const key = line.slice(0, colon);
    const value = line.slice(colon + 1).trim();
    if (key === "Rss") cur.rssKiB = Number.parseInt(value, 10);
    else if (key === "Anonymous") cur.anonymousKiB = Number.parseInt(value, 10);
    else if (key === "VmFlags") cur.flags = value.split(/\s+/).filter(Boolean);
  }
  if (cur !== undefined) out.push(cur);
  return out;
}

/** VmFlags that rule a mapping out: locked, I/O or PFN mappings, and anything madvise refuses or must not drop. */
const KEEP_FLAGS = new Set(["lo", "io", "pf", "dc", "ht", "nr", "um", "uw"]);

/**
 * Whether a mapping's resident pages may be released: a private, read-only
 * mapping of a file that still exists, with pages resident and none of them a
 * private copy.
 */
export function isReleasableProgramMapping(m: ProcessMapping): boolean {
  if (m.perms !== "r--p" && m.perms !== "r-xp") return false;
  if (!m.name.startsWith("/") || m.name.endsWith("(deleted)") || m.name.startsWith("/memfd:")) return false;
  if (m.anonymousKiB !== 0 || m.rssKiB <= 0) return false;
  return !m.flags.some((f) => KEEP_FLAGS.has(f));
}

export interface ProgramPagesRelease {
  /** Mappings released. */
  readonly mappings: number;
  /** Their resident size just before (KiB). */
  readonly residentKiB: number;
}

const MADV_DONTNEED = 4;

/**
 * Release this process's resident pages of program files that hold no
 * private data (see the file's comment). Safe while other threads run:
 * they fault the pages they use back in. A mapping the kernel refuses is
 * left as it is.
 */
export function releaseProgramPages(): ProgramPagesRelease {
  let mappings = 0;
  let residentKiB = 0;
  for (const m of parseSmaps(readFileSync("/proc/self/smaps", "utf8"))) {
    if (!isReleasableProgramMapping(m)) continue;
    if (libc.adviseRange(m.start, Number(m.end - m.start), MADV_DONTNEED)) {
      mappings++;
      residentKiB += m.rssKiB;
    }
  }
  return { mappings, residentKiB };
}
