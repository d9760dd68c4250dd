/**
 * SyscallThread (a native thread without a V8 isolate that makes system
 * calls on request) and vCPUs created and run on such threads: the calls
 * happen on that thread, errors come back as -errno, kicks reach it, and one
 * JavaScript thread can drive several vCPUs through a doorbell.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition } from "../../src/hypervisor/partition.js";
import { VcpuKicker, VirtualProcessor } from "../../src/hypervisor/virtual-processor.js";
import { SyscallDoorbell, SyscallThread, SYS, assembleSyscallLoop } from "../../src/hypervisor/syscall-thread.js";
import { KvmError, KvmProtocolError } from "../../src/hypervisor/errors.js";
import { gettid, ioctl, open, close, O_RDWR } from "../../src/hypervisor/libc.js";
import { CODE_GPA, code, enterRealMode } from "./guests.js";
import { noKvm } from "../fixtures/kvm.js";


/** A 1 MiB partition (TSS set, for VT-x hosts in real mode) for `body`, destroyed after it. */
function withPartition(body: (p: Partition) => void): void {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 0x100000, fileOffset: 0 }] });
  try {
    p.setTssAddr(DEFAULT_TSS_GPA);
    body(p);
  } finally {
    p.destroy();
    sys.close();
  }
}

function threadCount(): number {
  return fs.readdirSync("/proc/self/task").length;
}

/** CPU time (utime + stime, clock ticks) of one thread of this process. */
function threadTicks(tid: number): number {
  const stat = fs.readFileSync(`/proc/self/task/${tid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

/** A real-mode guest: marker = id at 0x7000+id, then forever: out 0x80, id; inc counter at 0x7100+id. */
const GUEST = code(
  [0x88, 0x9f, 0x00, 0x70], // mov [bx+0x7000], bl
  [0x89, 0xd8], //             loop: mov ax, bx
  [0xe6, 0x80], //             out 0x80, al
  [0xfe, 0x87, 0x00, 0x71], // inc byte [bx+0x7100]
  [0xeb, 0xf6], //             jmp loop
);

test("the syscall loop assembles to the reviewed bytes (checked instruction by instruction with objdump)", () => {
  // objdump -D -b binary -mi386:x86-64 of these bytes reads back the comments of PROGRAM in
  // syscall-thread.ts: wait at 0x04, go at 0x26, quit at 0x81. A change to the program must be
  // disassembled and reviewed again before this string is updated.
  const golden =
    "534889fb8b0383f801741b83f803747189c24889dfbe800000004531d2b8ca0000000f05ebde" +
    "488b4308488b7b10488b7318488b53204c8b53284c8b43304c8b4b380f0548894340c70302000000" +
    "4889dfbe81000000baffffff7fb8ca0000000f05488b7b484885ff7499f0ff07be81000000baffffff7f" +
    "b8ca0000000f05eb8331c05bc3";
  assert.equal(Buffer.from(assembleSyscallLoop()).toString("hex"), golden);
});

test("a native thread makes the calls: its own tid, raw -errno results, and it is gone after stop()", () => {
  const before = threadCount();
  const t = SyscallThread.start();
  try {
    assert.equal(threadCount(), before + 1);
    const tid = t.call(SYS.gettid);
    assert.ok(tid > 0);
    assert.notEqual(tid, gettid(), "the call ran on another thread");
    assert.ok(fs.existsSync(`/proc/self/task/${tid}`), "that thread belongs to this process");
    for (let i = 0; i < 1000; i++) assert.equal(t.call(SYS.gettid), tid, "always the same thread");
    assert.equal(t.ioctl(987654, 0xae00, 0), -9, "ioctl on a closed fd: -EBADF");
  } finally {
    t.stop();
  }
  assert.equal(threadCount(), before, "the thread ended and was joined");
  // Its memory is gone: every use is refused with an error, never a stray access.
  const stopped = (e: unknown) => e instanceof KvmProtocolError && e.code === "SYSCALL_THREAD_STOPPED";
  assert.throws(() => t.call(SYS.gettid), stopped);
  assert.throws(() => t.ioctl(0, 0xae00, new Uint8Array(8)), stopped);
  assert.throws(() => t.scratch, stopped);
  assert.throws(() => t.done, stopped);
  assert.equal(t.busy, false);
});

test("struct arguments go through the scratch area both ways; misuse of the request protocol is refused", { skip: noKvm }, () => {
  const t = SyscallThread.start();
  const kvm = open("/dev/kvm", O_RDWR);
  try {
    assert.equal(t.ioctl(kvm, 0xae00, 0), 12, "KVM_GET_API_VERSION");
    // KVM_GET_SUPPORTED_CPUID with nent = 100: the kernel writes nent and the entries back.
    const cpuid = new Uint32Array(2 + 100 * 10);
    cpuid[0] = 100;
    const r = t.ioctl(kvm, 0xc008ae05, cpuid);
    assert.equal(r, 0);
    assert.ok(cpuid[0]! > 0 && cpuid[0]! <= 100, `nent written back: ${cpuid[0]}`);
    const direct = new Uint32Array(2 + 100 * 10);
    direct[0] = 100;
    ioctl(kvm, 0xc008ae05, direct, "KVM_GET_SUPPORTED_CPUID");
    // The same leaves as the ioctl made on this thread (values may differ: some carry the APIC id of
    // the CPU the calling thread happens to be on).
    const leaves = (t: Uint32Array): string[] => Array.from({ length: t[0]! }, (_, i) => `${t[2 + i * 10]!.toString(16)}.${t[3 + i * 10]}`);
    assert.deepEqual(leaves(cpuid), leaves(direct));
    assert.deepEqual(cpuid.subarray(2, 12), direct.subarray(2, 12), "leaf 0 (vendor, highest leaf) identical");
    assert.ok(cpuid[2 + 3]! > 0, "leaf 0 eax (the highest basic leaf) is filled in");
    assert.throws(() => t.ioctl(kvm, 0xae00, new Uint8Array(1 << 20)), (e: unknown) => e instanceof KvmProtocolError && e.code === "SYSCALL_THREAD_ARGUMENT");

    t.post(SYS.gettid);
    assert.throws(() => t.post(SYS.gettid), (e: unknown) => e instanceof KvmProtocolError && e.code === "SYSCALL_THREAD_BUSY");
    assert.ok(t.wait() > 0);
    assert.throws(() => t.take(), (e: unknown) => e instanceof KvmProtocolError && e.code === "SYSCALL_THREAD_NOT_DONE");
    assert.throws(() => t.wait(), (e: unknown) => e instanceof KvmProtocolError && e.code === "SYSCALL_THREAD_IDLE");
  } finally {
    close(kvm);
    t.stop();
  }
});

test("a vCPU created on a native thread runs there: port-I/O exits, registers, and a KVM error with errno", { skip: noKvm }, () => {
  withPartition((p) => {
    const t = SyscallThread.start({ context: { vcpu: 3 } });
    try {
      const tid = t.call(SYS.gettid);
      p.guestMemory.write(CODE_GPA, GUEST);
      const vp = VirtualProcessor.create(p, 3, { on: t });
      try {
        assert.equal(vp.syscallThread, t);
        enterRealMode(vp, CODE_GPA, { rbx: 3n });
        assert.equal(vp.getRegs().rbx, 3n, "registers round-trip through the native thread");
        const ticks = threadTicks(tid);
        for (let i = 0; i < 20_000; i++) {
          const exit = vp.run();
          assert.equal(exit.reason, "io");
          if (exit.reason === "io") {
            assert.equal(exit.port, 0x80);
            assert.equal(exit.data[0], 3);
          }
        }
        assert.equal(p.guestMemory.bytes(0x7000 + 3, 1)[0], 3, "the guest wrote its marker");
        assert.equal(p.guestMemory.bytes(0x7100 + 3, 1)[0], (20_000 - 1) & 0xff, "one counter step per exit");
        assert.ok(threadTicks(tid) > ticks, "the guest's time is charged to the native thread (KVM_RUN ran there)");
        // A second vCPU with the same id: KVM refuses with EEXIST, reported as a KvmError.
        assert.throws(
          () => VirtualProcessor.create(p, 3, { on: t }),
          (e: unknown) => e instanceof KvmError && e.errnoName === "EEXIST" && e.ioctl === "KVM_CREATE_VCPU",
        );
      } finally {
        vp.close();
      }
    } finally {
      t.stop();
    }
  });
});

test("a vCPU halted in the kernel on a native thread is kicked out (intr) from JavaScript; once closed, it is never signalled again", { skip: noKvm }, () => {
  withPartition((p) => {
    const t = SyscallThread.start();
    try {
      p.createIrqchip();
      p.guestMemory.write(CODE_GPA, code([0xfb], [0xf4], [0xeb, 0xfd])); // sti; idle: hlt; jmp idle
      const vp = VirtualProcessor.create(p, 0, { on: t });
      const kicker = VcpuKicker.attach(vp.kickHandle());
      try {
        enterRealMode(vp);
        vp.startRun();
        const until = Date.now() + 300;
        while (Date.now() < until) assert.equal(t.done, false, "halted in the kernel: KVM_RUN does not return");
        kicker.kick();
        const exit = vp.finishRun(t.wait());
        assert.equal(exit.reason, "intr");
        assert.equal(vp.immediateExit, false, "re-armed for the next run");
        const guard = new Int32Array(vp.kickHandle().guard);
        assert.equal(guard[0], 0, "open again after the kick");
        vp.close();
        assert.equal(guard[0], 2, "closing the vCPU retires its kickers");
        vp.interrupt(); // closed: does nothing
        assert.equal(guard[0], 2);
      } finally {
        kicker.close();
        vp.close();
      }
    } finally {
      t.stop();
    }
  });
});

test("one JavaScript thread drives four vCPUs on native threads through a doorbell", { skip: noKvm }, () => {
  withPartition((p) => {
    const doorbell = SyscallDoorbell.create();
    const threads = Array.from({ length: 4 }, (_, id) => SyscallThread.start({ doorbell, context: { vcpu: id } }));
    const vcpus: VirtualProcessor[] = [];
    try {
      p.guestMemory.write(CODE_GPA, GUEST);
      for (const [id, t] of threads.entries()) {
        const vp = VirtualProcessor.create(p, id, { on: t });
        vcpus.push(vp);
        enterRealMode(vp, CODE_GPA, { rbx: BigInt(id) });
      }
      const tids = new Set(threads.map((t) => t.call(SYS.gettid)));
      assert.equal(tids.size, 4, "four threads");
      const target = 5000;
      const exits = [0, 0, 0, 0];
      for (const vp of vcpus) vp.startRun();
      let running = 4;
      while (running > 0) {
        const seq = doorbell.sequence;
        let served = 0;
        for (const [id, vp] of vcpus.entries()) {
          const t = threads[id]!;
          if (!t.done) continue;
          served++;
          const exit = vp.finishRun(t.take());
          assert.equal(exit.reason, "io");
          if (exit.reason === "io") assert.equal(exit.data[0], id, "each exit comes from its own vCPU");
          if (++exits[id]! < target) vp.startRun();
          else running--;
        }
        if (served === 0) doorbell.wait(seq, 5000);
      }
      assert.deepEqual(exits, [target, target, target, target]);
      for (let id = 0; id < 4; id++) {
        assert.equal(p.guestMemory.bytes(0x7000 + id, 1)[0], id, `vCPU ${id} marker`);
        assert.equal(p.guestMemory.bytes(0x7100 + id, 1)[0], (target - 1) & 0xff, `vCPU ${id} counter`);
      }
    } finally {
      for (const vp of vcpus) vp.close();
      for (const t of threads) t.stop();
      doorbell.close();
    }
  });
});

test("waitAsync: the event loop stays free while libuv's pool waits on the doorbell; a call rings it, a quiet doorbell times out", async () => {
  const doorbell = SyscallDoorbell.create();
  const t = SyscallThread.start({ doorbell });
  try {
    t.setName("partis-test");
    assert.equal(fs.readFileSync(`/proc/self/task/${t.call(SYS.gettid)}/comm`, "utf8").trim(), "partis-test");
    // Rung: a call posted while the wait is on wakes it (the event loop turned meanwhile: the timer ran).
    let sequence = doorbell.sequence;
    let loopTurned = false;
    const rung = new Promise<void>((resolve) => doorbell.waitAsync(sequence, 30_000, resolve));
    setTimeout(() => {
      loopTurned = true;
      t.post(SYS.gettid);
    }, 20);
    await rung;
    assert.ok(loopTurned);
    assert.notEqual(doorbell.sequence, sequence);
    assert.ok(t.take() > 0);
    // Quiet: it ends at its timeout, the doorbell where it was.
    sequence = doorbell.sequence;
    await new Promise<void>((resolve) => doorbell.waitAsync(sequence, 50, resolve));
    assert.equal(doorbell.sequence, sequence);
  } finally {
    t.stop();
    doorbell.close();
  }
});
