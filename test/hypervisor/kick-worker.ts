/**
 * Worker-thread side of the kick test in multi-vcpu.test.ts: a vCPU halted in
 * the kernel (in-kernel irqchip, `sti; hlt`) until the main thread kicks it.
 * If an MSI arrives instead (the main thread's fallback), the guest's handler
 * does `out 0x82` and the report says it was not kicked. Does nothing on the
 * main thread.
 */
import { isMainThread, parentPort, workerData } from "node:worker_threads";
import { Partition, type PartitionHandoff } from "../../src/hypervisor/partition.js";
import { VirtualProcessor } from "../../src/hypervisor/virtual-processor.js";
import { enterRealMode } from "./guests.js";

export interface KickWorkerReport {
  /** The exit seen after the kick: "intr" when it worked. */
  first: string;
  /** The exit of a second run(): the kick must not stick ("io" from the MSI fallback handler). */
  second: string;
  error?: string;
}

if (!isMainThread && parentPort !== null) {
  const port = parentPort;
  const handoff = workerData as PartitionHandoff;
  const report: KickWorkerReport = { first: "", second: "" };
  try {
    const p = Partition.attach(handoff);
    const vp = VirtualProcessor.create(p, 0);
    try {
      const lapic = vp.getLapic();
      const v = new DataView(lapic.buffer);
      v.setUint32(0xf0, v.getUint32(0xf0, true) | 0x100, true); // APIC software-enabled, for the MSI fallback
      vp.setLapic(lapic);
      enterRealMode(vp);
      port.postMessage({ kind: "ready", handle: vp.kickHandle() });
      report.first = vp.run().reason;
      port.postMessage({ kind: "first", reason: report.first });
      report.second = vp.run().reason; // blocks until the main thread's MSI
    } finally {
      vp.close();
      p.destroy();
    }
  } catch (e) {
    report.error = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  }
  port.postMessage({ kind: "report", report });
}
