/**
 * Start-up tracing for the boot path: with PARTIS_TRACE_BOOT=1, each process
 * and thread on the way from `partis run` to the first guest instruction
 * writes "partis-trace <wall ms> <where> <what>" to stderr, so the phases can
 * be lined up across processes (benchmarks, slow hosts).
 */
import { writeSync } from "node:fs";

const enabled = process.env.PARTIS_TRACE_BOOT === "1";

export function bootTrace(where: string, what: string): void {
  if (enabled) writeSync(2, `partis-trace ${Date.now()} ${where} ${what}\n`);
}
