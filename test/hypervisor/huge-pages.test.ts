/**
 * Guest RAM backed by the host's reserved huge pages (a hugetlbfs memfd):
 * the pages are reserved when the partition is created and given back when it
 * is destroyed, a guest runs on them, other threads map the same pages, and a
 * pool too small is refused at creation with nothing left open.
 *
 * Reserving pages changes the host's pool (nr_hugepages): the test grows the
 * 2 MiB pool by what it needs and puts the old size back (needs root, see
 * test/fixtures/huge-page-pool.ts).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, HUGE_2M, Partition, PartitionConfigError } from "../../src/hypervisor/partition.js";
import { VirtualProcessor } from "../../src/hypervisor/virtual-processor.js";
import { available2M, hugePagesUnusable, reserve2M } from "../fixtures/huge-page-pool.js";
import { CODE_GPA, code, enterLongMode, imm32, imm64, writeLongModeTables } from "./guests.js";

/** Sizes (kB) of this process's mappings whose KernelPageSize is 2048 kB. */
function hugeMappingsKb(): number[] {
  const out: number[] = [];
  let size = 0;
  for (const line of fs.readFileSync("/proc/self/smaps", "utf8").split("\n")) {
    const s = /^Size:\s+(\d+) kB/.exec(line);
    if (s !== null) size = Number(s[1]);
    if (/^KernelPageSize:\s+2048 kB/.test(line)) out.push(size);
  }
  return out;
}

function openFds(): number {
  return fs.readdirSync("/proc/self/fd").length;
}

test("a guest runs on hugetlb RAM: pages reserved at creation, shared with an attached thread's view, given back", { skip: hugePagesUnusable }, () => {
  const restore = reserve2M(2);
  let sys: KvmSystem | undefined;
  try {
    sys = KvmSystem.open();
    const before = available2M();
    const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 2 * HUGE_2M, fileOffset: 0 }], hugePageBytes: HUGE_2M });
    let vp: VirtualProcessor | undefined;
    try {
      vp = VirtualProcessor.create(p, 0);
      assert.equal(available2M(), before - 2, "both pages are reserved before the guest touches them");
      assert.ok(hugeMappingsKb().includes(4096), `a 4 MiB mapping with 2 MiB kernel pages (saw ${JSON.stringify(hugeMappingsKb())})`);
      p.setTssAddr(DEFAULT_TSS_GPA);
      vp.setCpuid(sys.supportedCpuid());
      writeLongModeTables(p);
      // mov rax, imm64; mov [0x3ff000], rax (the second huge page); out 0x80, al; hlt
      p.guestMemory.write(CODE_GPA, code([0x48, 0xb8, ...imm64(0x1122334455667788n)], [0x48, 0x89, 0x04, 0x25, ...imm32(0x3ff000)], [0xe6, 0x80], [0xf4]));
      enterLongMode(vp);
      const exit = vp.run();
      assert.equal(exit.reason, "io");
      if (exit.reason === "io") assert.equal(exit.port, 0x80);
      const attached = Partition.attach(p.handoff());
      try {
        assert.equal(new DataView(attached.guestMemory.bytes(0x3ff000, 8).slice().buffer).getBigUint64(0, true), 0x1122334455667788n);
      } finally {
        attached.destroy();
      }
    } finally {
      vp?.close();
      p.destroy();
    }
    assert.equal(available2M(), before, "destroy gives the pages back to the pool");
  } finally {
    sys?.close();
    restore();
  }
});

test("hugetlb RAM: a pool too small, a misaligned range and an unknown page size are refused with nothing left open", { skip: hugePagesUnusable }, () => {
  const sys = KvmSystem.open();
  try {
    const fds = openFds();
    const pages = available2M() + 1; // available2M counts the surplus pages the kernel may still add
    assert.throws(
      () => Partition.create(sys, { ranges: [{ gpa: 0, length: pages * HUGE_2M, fileOffset: 0 }], hugePageBytes: HUGE_2M }),
      (e: unknown) => e instanceof PartitionConfigError && e.code === "PARTITION_HUGEPAGES_UNAVAILABLE" && e.message.includes(`${pages} huge pages of 2 MiB`),
    );
    assert.equal(openFds(), fds, "no VM or memfd left open");
    assert.throws(
      () => Partition.create(sys, { ranges: [{ gpa: 0, length: 1 << 20, fileOffset: 0 }], hugePageBytes: HUGE_2M }),
      (e: unknown) => e instanceof PartitionConfigError && e.code === "PARTITION_RAM_ALIGNMENT",
    );
    assert.throws(
      () => Partition.create(sys, { ranges: [{ gpa: 0, length: 4 << 20, fileOffset: 0 }], hugePageBytes: 4 << 20 }),
      (e: unknown) => e instanceof PartitionConfigError && e.code === "PARTITION_HUGEPAGE_SIZE",
    );
    assert.equal(openFds(), fds);
  } finally {
    sys.close();
  }
});
