/**
 * Several vCPUs of one partition, each created and run on its own
 * worker_thread (KVM wants vCPU ioctls from the creating thread), attached
 * through Partition.handoff()/attach(); guest RAM is shared by all threads.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition } from "../../src/hypervisor/partition.js";
import { gettid } from "../../src/hypervisor/libc.js";
import { CODE_GPA, code } from "./guests.js";
import type { VcpuWorkerInput, VcpuWorkerReport } from "./vcpu-worker.js";
import type { KickWorkerReport } from "./kick-worker.js";
import { VcpuKicker, type VcpuKickHandle } from "../../src/hypervisor/virtual-processor.js";
import { noKvm } from "../fixtures/kvm.js";


const GUEST = code(
  [0x88, 0x9f, 0x00, 0x70], // mov [bx+0x7000], bl     marker = vCPU id
  [0x89, 0xd8], //             loop: mov ax, bx
  [0xe6, 0x80], //             out 0x80, al
  [0xfe, 0x87, 0x00, 0x71], // inc byte [bx+0x7100]    per-vCPU counter
  [0xeb, 0xf6], //             jmp loop
);

function runWorker(input: VcpuWorkerInput): Promise<VcpuWorkerReport> {
  return new Promise((resolve, reject) => {
    const w = new Worker(new URL("./vcpu-worker.js", import.meta.url), { workerData: input });
    w.once("message", (m: VcpuWorkerReport) => resolve(m));
    w.once("error", reject);
    w.once("exit", (code) => {
      if (code !== 0) reject(new Error(`vCPU worker ${input.id} exited with ${code}`));
    });
  });
}

test("three vCPUs on three worker threads share one partition", { skip: noKvm }, async () => {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 0x100000, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA); // needed by VT-x hosts for real mode; harmless elsewhere
  try {
    p.guestMemory.write(CODE_GPA, GUEST);
    const exits = 500;
    const handoff = p.handoff();
    const reports = await Promise.all([1, 2, 3].map((id) => runWorker({ handoff, id, exits })));
    const tids = new Set([gettid()]);
    for (const r of reports) {
      assert.equal(r.error, undefined, r.error);
      assert.equal(r.exits, exits);
      assert.equal(r.wrong, 0, `vCPU ${r.id} saw unexpected exits`);
      assert.equal(r.marker, r.id, "the worker's own mapping sees what its vCPU wrote");
      assert.equal(r.counter, (exits - 1) & 0xff);
      // The creating thread's mapping sees the same bytes.
      assert.equal(p.guestMemory.bytes(0x7000 + r.id, 1)[0], r.id);
      assert.equal(p.guestMemory.bytes(0x7100 + r.id, 1)[0], (exits - 1) & 0xff);
      tids.add(r.tid);
    }
    assert.equal(tids.size, 4, "every vCPU ran on a thread of its own");
  } finally {
    p.destroy();
    sys.close();
  }
});

test("VcpuKicker: the main thread kicks a vCPU halted in the kernel on a worker thread; run() returns intr once", { skip: noKvm }, async () => {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 0x100000, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA);
  try {
    p.createIrqchip();
    p.guestMemory.write(CODE_GPA, code([0xfb], [0xf4], [0xeb, 0xfd])); // sti; idle: hlt; jmp idle
    p.guestMemory.write(0x1020, code([0xe6, 0x82], [0xcf])); //          handler: out 0x82, al; iret
    const ivt = p.guestMemory.bytes(0x30 * 4, 4);
    new DataView(ivt.buffer, ivt.byteOffset, 4).setUint32(0, 0x1020, true);

    const w = new Worker(new URL("./kick-worker.js", import.meta.url), { workerData: p.handoff() });
    const messages: { kind: string; handle?: VcpuKickHandle; reason?: string; report?: KickWorkerReport }[] = [];
    let wake: () => void = () => {};
    w.on("message", (m: (typeof messages)[number]) => {
      messages.push(m);
      wake();
    });
    const next = async (kind: string, ms: number): Promise<(typeof messages)[number] | undefined> => {
      const deadline = Date.now() + ms;
      for (;;) {
        const i = messages.findIndex((m) => m.kind === kind);
        if (i >= 0) return messages.splice(i, 1)[0];
        const left = deadline - Date.now();
        if (left <= 0) return undefined;
        await new Promise<void>((resolve) => {
          wake = resolve;
          setTimeout(resolve, left);
        });
      }
    };

    const ready = await next("ready", 10_000);
    assert.ok(ready?.handle, "worker ready");
    const kicker = VcpuKicker.attach(ready.handle);
    try {
      await new Promise((r) => setTimeout(r, 200)); // let the vCPU halt in the kernel
      kicker.kick();
      const first = await next("first", 5_000);
      // Unblock the second run() (and, if the kick failed, the first) with an MSI to vector 0x30.
      p.signalMsi(0xfee00000, 0x30);
      if (first === undefined) p.signalMsi(0xfee00000, 0x30);
      const done = await next("report", 10_000);
      assert.ok(done?.report, "worker finished");
      assert.equal(done.report.error, undefined, done.report.error);
      assert.equal(done.report.first, "intr", "the kick made run() return intr");
      assert.equal(done.report.second, "io", "the next run() entered the guest again (immediate_exit was re-armed)");
    } finally {
      kicker.close();
      await w.terminate();
    }
  } finally {
    p.destroy();
    sys.close();
  }
});
