/**
 * Worker-thread side of multi-vcpu.test.ts: attach to the partition from a
 * handoff, create one vCPU on this thread, run it for a number of exits and
 * report. Does nothing when loaded on the main thread (e.g. by a test runner).
 */
import { isMainThread, parentPort, workerData } from "node:worker_threads";
import { Partition, type PartitionHandoff } from "../../src/hypervisor/partition.js";
import { VirtualProcessor } from "../../src/hypervisor/virtual-processor.js";
import { gettid } from "../../src/hypervisor/libc.js";
import { enterRealMode } from "./guests.js";

export interface VcpuWorkerInput {
  handoff: PartitionHandoff;
  id: number;
  exits: number;
}

export interface VcpuWorkerReport {
  id: number;
  tid: number;
  exits: number;
  /** Exits whose port/value were not (0x80, id). */
  wrong: number;
  /** What this thread's own mapping shows at 0x7000 + id and 0x7100 + id. */
  marker: number;
  counter: number;
  error?: string;
}

if (!isMainThread && parentPort !== null) {
  const input = workerData as VcpuWorkerInput;
  const report: VcpuWorkerReport = { id: input.id, tid: gettid(), exits: 0, wrong: 0, marker: -1, counter: -1 };
  try {
    const p = Partition.attach(input.handoff);
    const vp = VirtualProcessor.create(p, input.id);
    try {
      enterRealMode(vp, 0x1000, { rbx: BigInt(input.id) });
      for (let i = 0; i < input.exits; i++) {
        const exit = vp.run();
        if (exit.reason !== "io" || exit.port !== 0x80 || exit.data[0] !== input.id) report.wrong++;
        report.exits++;
      }
      report.marker = p.guestMemory.bytes(0x7000 + input.id, 1)[0]!;
      report.counter = p.guestMemory.bytes(0x7100 + input.id, 1)[0]!;
    } finally {
      vp.close();
      p.destroy();
    }
  } catch (e) {
    report.error = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  }
  parentPort.postMessage(report);
}
