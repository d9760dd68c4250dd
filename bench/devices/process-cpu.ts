/**
 * CPU time of a process from /proc/<pid>/stat, as the in-guest benchmarks
 * sample the VMM around each pattern: user+system seconds, and the part of
 * it that was guest time (field 43).
 */
import { readFileSync } from "node:fs";

/** USER_HZ on Linux/x86-64: /proc's clock ticks per second. */
export const CLK_TCK = 100;

export function cpuOf(pid: number): { total: number; guest: number } {
  const s = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = s.slice(s.lastIndexOf(")") + 2).split(" "); // f[0] is field 3 (state)
  const field = (n: number): number => Number(f[n - 3]);
  return { total: (field(14) + field(15)) / CLK_TCK, guest: field(43) / CLK_TCK };
}
