/** host.ts parsing with sample /proc text (no hardware needed), plus one live probe. */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  classifyVirtualization,
  hostCanRunStockGuests,
  is64bitHost,
  missingKvmReason,
  parseCpuinfo,
  parseMeminfo,
  probeHost,
  readHugePagePools,
  stockGuestVerdict,
  type HostReport,
} from "../../src/hypervisor/host.js";

const INTEL = `processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc vmx ept vpid
vmx flags\t: vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep nx lm vmx
`;

const AMD = `processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7763 64-Core Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm svm npt nrip_save
`;

/** A PVM guest VM: no vmx/svm; /dev/kvm comes from kvm_pvm. */
const PVM = `processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc hypervisor lahf_lm

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu nx lm hypervisor
`;

const MEMINFO = `MemTotal:       24684288 kB
MemFree:        24440000 kB
MemAvailable:   24393108 kB
Buffers:            2000 kB
Cached:           150000 kB
`;

function report(kind: HostReport["kind"], accessible = true): HostReport {
  return {
    kind,
    nx: true,
    is64bit: true,
    machine: "x86_64",
    cpuModel: "",
    logicalCpus: 2,
    kvmModules: [],
    memTotalBytes: 1,
    memAvailableBytes: 1,
    hugePagePools: [],
    kvm: accessible ? { present: true, accessible: true, apiVersion: 12, maxVcpus: 1024 } : { present: true, accessible: false, reason: "/dev/kvm is not readable" },
  };
}

test("cpuinfo: Intel VT-x host", () => {
  const cpu = parseCpuinfo(INTEL);
  assert.equal(cpu.logicalCpus, 2);
  assert.equal(cpu.vendor, "GenuineIntel");
  assert.match(cpu.model, /Xeon/);
  assert.ok(cpu.flags.has("vmx") && cpu.flags.has("nx") && cpu.flags.has("lm"));
  assert.ok(!cpu.flags.has("vnmi"), "the 'vmx flags' line is not the flags line");
  assert.equal(classifyVirtualization(cpu.flags, ["kvm_intel"]), "vmx");
});

test("cpuinfo: AMD-V host", () => {
  const cpu = parseCpuinfo(AMD);
  assert.equal(cpu.logicalCpus, 1);
  assert.equal(classifyVirtualization(cpu.flags, ["kvm_amd"]), "svm");
});

test("cpuinfo: PVM host (no vmx/svm, kvm_pvm loaded)", () => {
  const cpu = parseCpuinfo(PVM);
  assert.equal(cpu.logicalCpus, 2);
  assert.equal(classifyVirtualization(cpu.flags, ["kvm_pvm"]), "pvm");
  assert.equal(classifyVirtualization(cpu.flags, []), "unknown");
  // kvm_pvm owns /dev/kvm even if the CPU also reports a hardware extension.
  assert.equal(classifyVirtualization(parseCpuinfo(AMD).flags, ["kvm_pvm"]), "pvm");
});

test("64-bit detection and meminfo", () => {
  assert.equal(is64bitHost(new Set(["lm"]), "i686"), true);
  assert.equal(is64bitHost(new Set(), "i686"), false);
  assert.deepEqual(parseMeminfo(MEMINFO), { memTotalBytes: 24684288 * 1024, memAvailableBytes: 24393108 * 1024 });
  assert.deepEqual(parseMeminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nCached: 50 kB\n"), { memTotalBytes: 1024000, memAvailableBytes: 150 * 1024 });
});

test("stock guests: yes on vmx/svm, no on pvm (with the reason), no without access", () => {
  assert.equal(hostCanRunStockGuests(report("vmx")), true);
  assert.equal(hostCanRunStockGuests(report("svm")), true);
  assert.equal(hostCanRunStockGuests(report("pvm")), false);
  assert.match(stockGuestVerdict(report("pvm")).why, /PVM/);
  assert.equal(hostCanRunStockGuests(report("unknown")), false);
  assert.equal(hostCanRunStockGuests(report("vmx", false)), false);
});

test("huge-page pools: read from a sysfs-like tree, smallest page first, available = free - reserved + surplus still allowed", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "partis-hugepages-"));
  try {
    const pool = (name: string, files: Record<string, string>): void => {
      fs.mkdirSync(path.join(dir, name));
      for (const [f, v] of Object.entries(files)) fs.writeFileSync(path.join(dir, name, f), `${v}\n`);
    };
    pool("hugepages-1048576kB", { nr_hugepages: "2", free_hugepages: "2", resv_hugepages: "0" });
    pool("hugepages-2048kB", { nr_hugepages: "300", free_hugepages: "120", resv_hugepages: "20", nr_overcommit_hugepages: "10", surplus_hugepages: "4" });
    pool("hugepages-64kB", { nr_hugepages: "garbage", free_hugepages: "1" }); // unreadable: left out
    fs.writeFileSync(path.join(dir, "README"), "not a pool");
    assert.deepEqual(readHugePagePools(dir), [
      { pageBytes: 2 << 20, total: 300, available: 106 }, // 120 free - 20 promised + (10 - 4) surplus still allowed
      { pageBytes: 1 << 30, total: 2, available: 2 },
    ]);
    assert.deepEqual(readHugePagePools(path.join(dir, "missing")), []);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("probeHost on this machine returns a consistent report", () => {
  const r = probeHost();
  assert.ok(["vmx", "svm", "pvm", "unknown"].includes(r.kind));
  assert.ok(r.memTotalBytes > 0 && r.memAvailableBytes > 0);
  assert.equal(typeof r.nx, "boolean");
  if (r.kvm.accessible) assert.equal(r.kvm.apiVersion, 12);
});

test("no KVM device: the reason tells a missing module, a module that registered no device (PVM inside PVM), and a missing node", () => {
  assert.equal(missingKvmReason("/dev/kvm", [], false), "/dev/kvm does not exist: no KVM module is loaded (load kvm_intel or kvm_amd)");
  const pvm = missingKvmReason("/dev/kvm", ["kvm_pvm"], false);
  assert.match(pvm, /^\/dev\/kvm does not exist: kvm_pvm is loaded but registered no KVM device/);
  assert.match(pvm, /itself a PVM guest/);
  assert.match(missingKvmReason("/dev/kvm", ["kvm_intel"], false), /kvm_intel is loaded but registered no KVM device .*firmware/);
  assert.match(missingKvmReason("/dev/kvm", ["kvm_amd"], true), /mknod \/dev\/kvm c 10 232/);
  assert.equal(missingKvmReason("/srv/kvm", ["kvm_amd"], true), "/srv/kvm does not exist");
});

test("probeHost with a device path that does not exist: not present, with a reason naming the path", () => {
  const r = probeHost("/nonexistent-kvm");
  assert.equal(r.kvm.present, false);
  assert.equal(r.kvm.accessible, false);
  assert.equal(r.kvm.reason, "/nonexistent-kvm does not exist");
});
