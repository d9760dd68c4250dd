/**
 * Fatal exits: a triple fault gives "shutdown"; an instruction KVM's
 * emulator cannot handle gives "internal_error" with its bytes (on PVM, where
 * CPL0 code is emulated; on VT-x/AMD-V the same guest triple-faults instead).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { KvmSystem } from "../../src/hypervisor/system.js";
import { DEFAULT_TSS_GPA, Partition } from "../../src/hypervisor/partition.js";
import { VirtualProcessor, type VcpuExit } from "../../src/hypervisor/virtual-processor.js";
import { CODE_GPA, code, enterLongMode, writeLongModeTables } from "./guests.js";
import { noKvm } from "../fixtures/kvm.js";

const isPvm = fs.existsSync("/sys/module/kvm_pvm");

function describe(exit: VcpuExit): string {
  return JSON.stringify(exit, (_k, v: unknown) => (typeof v === "bigint" ? `0x${v.toString(16)}` : v instanceof Uint8Array ? Array.from(v) : v));
}

function runLongMode(bytes: Uint8Array): VcpuExit {
  const sys = KvmSystem.open();
  const p = Partition.create(sys, { ranges: [{ gpa: 0, length: 2 << 20, fileOffset: 0 }] });
  p.setTssAddr(DEFAULT_TSS_GPA); // needed by VT-x hosts for real mode; harmless elsewhere
  const vp = VirtualProcessor.create(p, 0);
  try {
    vp.setCpuid(sys.supportedCpuid());
    writeLongModeTables(p);
    p.guestMemory.write(CODE_GPA, bytes);
    enterLongMode(vp); // IDT limit 0: any exception escalates to a triple fault
    const exit = vp.run();
    // Copy what is needed: the exit object belongs to the vCPU.
    return exit.reason === "internal_error" ? { ...exit, data: [...exit.data] } : exit;
  } finally {
    vp.close();
    p.destroy();
    sys.close();
  }
}

test("triple fault (ud2 with no IDT) exits with shutdown", { skip: noKvm }, () => {
  const exit = runLongMode(code([0x0f, 0x0b]));
  assert.equal(exit.reason, "shutdown", describe(exit));
});

test(
  isPvm
    ? "PVM: INT n at CPL0 in long mode is an emulation failure (internal_error, suberror 1, instruction bytes cd 30)"
    : "INT n at CPL0 with no IDT triple-faults (shutdown)",
  { skip: noKvm },
  () => {
    const exit = runLongMode(code([0xcd, 0x30], [0xf4])); // int 0x30; hlt
    if (!isPvm) {
      assert.equal(exit.reason, "shutdown", describe(exit));
      return;
    }
    assert.equal(exit.reason, "internal_error", describe(exit));
    if (exit.reason !== "internal_error") return;
    assert.equal(exit.suberror, 1);
    assert.deepEqual(Array.from(exit.instructionBytes ?? []).slice(0, 2), [0xcd, 0x30]);
  },
);
