/** Partition-level ioctls and validation that need no running guest. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { Partition, PartitionConfigError } from "../../src/hypervisor/partition.js";
import { KvmError } from "../../src/hypervisor/errors.js";
import { KVM_CAP } from "../../src/hypervisor/kvm-abi.js";
import { noKvm } from "../fixtures/kvm.js";


test("bad RAM layouts are refused before KVM is asked", { skip: noKvm }, () => {
  const sys = KvmSystem.open();
  try {
    const bad = [
      [],
      [{ gpa: 0x800, length: 0x1000, fileOffset: 0 }],
      [
        { gpa: 0, length: 0x2000, fileOffset: 0 },
        { gpa: 0x1000, length: 0x1000, fileOffset: 0x2000 },
      ],
      [
        { gpa: 0, length: 0x2000, fileOffset: 0 },
        { gpa: 0x10000, length: 0x1000, fileOffset: 0x1000 },
      ],
    ];
    for (const ranges of bad) assert.throws(() => Partition.create(sys, { ranges }), PartitionConfigError, JSON.stringify(ranges));
  } finally {
    sys.close();
  }
});

test("irqchip, PIT, TSS and identity-map addresses, GSI routing, kvmclock", { skip: noKvm }, () => {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 1 << 20, fileOffset: 0 }] });
  try {
    p.setTssAddr(0xfffbd000);
    p.setIdentityMapAddr(0xfffbc000);
    p.createIrqchip();
    p.createPit2();
    assert.ok(p.checkExtension(KVM_CAP.IRQFD) > 0);
    // Legacy ISA IRQs to the IOAPIC plus one MSI route.
    p.setGsiRouting([
      ...Array.from({ length: 16 }, (_, pin) => ({ gsi: pin, kind: "irqchip" as const, irqchip: 2, pin })),
      { gsi: 24, kind: "msi", addressLo: 0xfee00000, addressHi: 0, data: 0x41 },
    ]);
    p.setIrqLine(4, true);
    p.setIrqLine(4, false);
    const { clock } = p.getClock();
    p.setClock(clock + 1_000_000_000n);
    assert.ok(p.getClock().clock >= clock + 1_000_000_000n);
    assert.throws(() => p.createIrqchip(), KvmError); // only once per VM
    assert.throws(() => p.dirtyLog(7), PartitionConfigError);
  } finally {
    p.destroy();
    sys.close();
  }
});

test("handoff is plain data and attach maps the same RAM without a new VM", { skip: noKvm }, () => {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, {
    ranges: [
      { gpa: 0, length: 1 << 20, fileOffset: 0 },
      { gpa: 2 ** 32, length: 1 << 20, fileOffset: 1 << 20 },
    ],
  });
  try {
    const h = p.handoff();
    assert.deepEqual(structuredClone(h), h);
    const q = Partition.attach(h);
    assert.equal(q.vmFd, p.vmFd);
    p.guestMemory.write(2 ** 32 + 10, Uint8Array.of(1, 2, 3));
    assert.deepEqual(Array.from(q.guestMemory.bytes(2 ** 32 + 10, 3)), [1, 2, 3]);
    q.destroy(); // an attached partition leaves the VM alone
    assert.ok(p.checkExtension(KVM_CAP.USER_MEMORY) > 0);
    assert.deepEqual(Array.from(p.guestMemory.bytes(2 ** 32 + 10, 3)), [1, 2, 3]);
  } finally {
    p.destroy();
    sys.close();
  }
});
