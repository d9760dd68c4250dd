/**
 * A VMM process's memory as the boot benches count it, from /proc: overhead
 * = VmRSS − RssShmem (guest RAM is a memfd in every VMM measured, so
 * RssShmem is the guest RAM touched and the rest is the VMM's own), split
 * into private (RssAnon) and program files (RssFile), plus the transparent
 * huge pages in the private part (AnonHugePages, smaps_rollup). KiB each.
 */
import { readFileSync } from "node:fs";

export interface VmmMemory {
  readonly overheadKiB: number;
  readonly privateKiB: number;
  readonly fileKiB: number;
  readonly hugeKiB: number;
}

/** The `kB` fields of a /proc status-like text. */
function kibFields(text: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const line of text.split("\n")) {
    const m = /^(\w+):\s+(\d+) kB/.exec(line);
    if (m) out[m[1]!] = Number(m[2]);
  }
  return out;
}

export function readVmmMemory(pid: number): VmmMemory {
  const s = kibFields(readFileSync(`/proc/${pid}/status`, "utf8"));
  return {
    overheadKiB: (s["VmRSS"] ?? 0) - (s["RssShmem"] ?? 0),
    privateKiB: s["RssAnon"] ?? 0,
    fileKiB: s["RssFile"] ?? 0,
    hugeKiB: kibFields(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"))["AnonHugePages"] ?? 0,
  };
}
