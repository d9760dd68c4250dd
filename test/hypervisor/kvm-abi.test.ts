/**
 * kvm-abi.ts against the C headers: compile a small C program that prints
 * every ioctl number, struct size and the kvm_run offsets we use, and compare.
 * Skipped (with the reason) when gcc or linux/kvm.h is missing.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { KVM, KVM_CAP, KVM_EXIT, KVM_RUN, SIZEOF } from "../../src/hypervisor/kvm-abi.js";

function haveToolchain(): string | undefined {
  try {
    execFileSync("gcc", ["--version"], { stdio: "ignore" });
  } catch {
    return "gcc not installed";
  }
  if (!fs.existsSync("/usr/include/linux/kvm.h")) return "linux/kvm.h not installed (linux-libc-dev)";
  return undefined;
}

const skip = haveToolchain();

test("kvm-abi matches linux/kvm.h", { skip }, () => {
  const lines: string[] = [];
  const ioctlName = (k: string): string => `KVM_${k}`;
  for (const k of Object.keys(KVM)) lines.push(`P("ioctl.${k}", (unsigned long)${ioctlName(k)});`);
  for (const k of Object.keys(KVM_CAP)) lines.push(`P("cap.${k}", (unsigned long)KVM_CAP_${k});`);
  for (const k of Object.keys(KVM_EXIT)) lines.push(`P("exit.${k}", (unsigned long)KVM_EXIT_${k});`);
  for (const k of Object.keys(SIZEOF)) if (k !== "kvm_run_header") lines.push(`P("sizeof.${k}", sizeof(struct ${k}));`);
  const runFields: Record<string, string> = {
    REQUEST_INTERRUPT_WINDOW: "request_interrupt_window",
    IMMEDIATE_EXIT: "immediate_exit",
    EXIT_REASON: "exit_reason",
    READY_FOR_INTERRUPT_INJECTION: "ready_for_interrupt_injection",
    IF_FLAG: "if_flag",
    FLAGS: "flags",
    CR8: "cr8",
    APIC_BASE: "apic_base",
    IO_DIRECTION: "io.direction",
    IO_SIZE: "io.size",
    IO_PORT: "io.port",
    IO_COUNT: "io.count",
    IO_DATA_OFFSET: "io.data_offset",
    MMIO_PHYS_ADDR: "mmio.phys_addr",
    MMIO_DATA: "mmio.data",
    MMIO_LEN: "mmio.len",
    MMIO_IS_WRITE: "mmio.is_write",
    FAIL_ENTRY_REASON: "fail_entry.hardware_entry_failure_reason",
    FAIL_ENTRY_CPU: "fail_entry.cpu",
    HW_EXIT_REASON: "hw.hardware_exit_reason",
    INTERNAL_SUBERROR: "internal.suberror",
    INTERNAL_NDATA: "internal.ndata",
    INTERNAL_DATA: "internal.data",
    SYSTEM_EVENT_TYPE: "system_event.type",
    SYSTEM_EVENT_NDATA: "system_event.ndata",
    SYSTEM_EVENT_DATA: "system_event.data",
    EX_EXCEPTION: "ex.exception",
    EX_ERROR_CODE: "ex.error_code",
    KVM_VALID_REGS: "kvm_valid_regs",
    KVM_DIRTY_REGS: "kvm_dirty_regs",
  };
  for (const [k, f] of Object.entries(runFields)) lines.push(`P("run.${k}", offsetof(struct kvm_run, ${f}));`);
  const src = `#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
#define P(n, v) printf("%s %lu\\n", n, (unsigned long)(v))
int main(void) {
${lines.join("\n")}
return 0; }
`;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "partis-kvm-abi-"));
  try {
    fs.writeFileSync(path.join(dir, "abi.c"), src);
    execFileSync("gcc", ["-o", path.join(dir, "abi"), path.join(dir, "abi.c")], { stdio: "pipe" });
    const out = execFileSync(path.join(dir, "abi"), { encoding: "utf8" });
    const c = new Map(out.trim().split("\n").map((l) => l.split(" ") as [string, string]));
    const check = (key: string, ours: number): void => assert.equal(ours, Number(c.get(key)), key);
    for (const [k, v] of Object.entries(KVM)) check(`ioctl.${k}`, v);
    for (const [k, v] of Object.entries(KVM_CAP)) check(`cap.${k}`, v);
    for (const [k, v] of Object.entries(KVM_EXIT)) check(`exit.${k}`, v);
    for (const [k, v] of Object.entries(SIZEOF)) if (k !== "kvm_run_header") check(`sizeof.${k}`, v);
    for (const k of Object.keys(runFields)) check(`run.${k}`, KVM_RUN[k as keyof typeof KVM_RUN]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
