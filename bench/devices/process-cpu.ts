/**
 * CPU time of a process from /proc/<pid>/stat, as the in-guest benchmarks
 * sample the VMM around each pattern: user+system seconds, and the part of
 * it that was guest time (field 43).
 */
import { readdirSync, readFileSync } from "node:fs";

/** USER_HZ on Linux/x86-64: /proc's clock ticks per second. */
export const CLK_TCK = 100;

export function cpuOf(pid: number): { total: number; guest: number } {
  const s = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = s.slice(s.lastIndexOf(")") + 2).split(" "); // f[0] is field 3 (state)
  const field = (n: number): number => Number(f[n - 3]);
  return { total: (field(14) + field(15)) / CLK_TCK, guest: field(43) / CLK_TCK };
}

/**
 * Per-thread CPU of the VMM (PARTIS_BENCH_THREADS=1): tid -> {comm, user+system s, guest s}.
 * Says which thread (vCPU: the one with guest time; device thread; main) a
 * pattern's CPU went to.
 */
export function threadCpuOf(pid: number): Map<number, { comm: string; total: number; guest: number }> {
  const out = new Map<number, { comm: string; total: number; guest: number }>();
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const t of tids) {
    try {
      const s = readFileSync(`/proc/${pid}/task/${t}/stat`, "utf8");
      const comm = s.slice(s.indexOf("(") + 1, s.lastIndexOf(")"));
      const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
      const field = (n: number): number => Number(f[n - 3]);
      out.set(Number(t), { comm, total: (field(14) + field(15)) / CLK_TCK, guest: field(43) / CLK_TCK });
    } catch {}
  }
  return out;
}
