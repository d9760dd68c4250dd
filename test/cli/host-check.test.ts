/** `partis host check`: the verdict from a host report, and the command's exit status. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { checkHost } from "../../src/cli/host-command.js";
import type { HostReport } from "../../src/hypervisor/host.js";
import { noKvm } from "../fixtures/kvm.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const GiB = 2 ** 30;

function report(over: Partial<HostReport> = {}): HostReport {
  return {
    kind: "vmx",
    nx: true,
    is64bit: true,
    machine: "x86_64",
    cpuModel: "Test CPU",
    logicalCpus: 8,
    kvmModules: ["kvm", "kvm_intel"],
    memTotalBytes: 16 * GiB,
    memAvailableBytes: 12 * GiB,
    hugePagePools: [],
    kvm: { present: true, accessible: true, apiVersion: 12, maxVcpus: 1024 },
    ...over,
  };
}

test("VT-x host with usable KVM: ok, stock guests yes", () => {
  const r = checkHost(report());
  assert.equal(r.ok, true);
  assert.equal(r.stockGuests, true);
  assert.match(r.summary, /can run Partis VMs \(hardware-assisted: Intel VT-x/);
});

test("AMD-V host: ok", () => {
  const r = checkHost(report({ kind: "svm", kvmModules: ["kvm", "kvm_amd"] }));
  assert.equal(r.ok, true);
  assert.match(r.summary, /AMD-V/);
});

test("PVM host: VMs run, stock guests need the nested test host, explained once", () => {
  const r = checkHost(report({ kind: "pvm", kvmModules: ["kvm", "kvm_pvm"] }));
  assert.equal(r.ok, true);
  assert.equal(r.stockGuests, false);
  assert.match(r.summary, /stock guests need the nested test host/);
  assert.equal(r.lines.filter((l) => /instruction emulator/.test(l)).length, 1);
});

test("reserved huge-page pools are listed with what --hugepages can still take; empty pools are not", () => {
  const r = checkHost(
    report({
      hugePagePools: [
        { pageBytes: 2 ** 21, total: 512, available: 256 },
        { pageBytes: GiB, total: 0, available: 0 },
      ],
    }),
  );
  assert.ok(r.lines.includes("     reserved huge pages (partis run --hugepages 2M): 256 of 512 available (512 MiB)"), r.lines.join("\n"));
  assert.equal(r.lines.filter((l) => l.includes("--hugepages 1G")).length, 0);
  assert.equal(r.ok, true);
});

test("no /dev/kvm: not ok, the reason in one line", () => {
  const r = checkHost(report({ kvm: { present: false, accessible: false, reason: "/dev/kvm does not exist" } }));
  assert.equal(r.ok, false);
  assert.equal(r.summary, "this host cannot run Partis VMs: /dev/kvm does not exist");
});

test("/dev/kvm without permission: not ok", () => {
  const r = checkHost(report({ kvm: { present: true, accessible: false, reason: "/dev/kvm: permission denied (EACCES)" } }));
  assert.equal(r.ok, false);
  assert.match(r.summary, /permission denied/);
});

test("no NX, 32-bit, too little memory: each is a failure", () => {
  assert.match(checkHost(report({ nx: false })).summary, /no NX/);
  assert.match(checkHost(report({ is64bit: false, machine: "i686" })).summary, /not 64-bit/);
  assert.match(checkHost(report({ memTotalBytes: 128 * 2 ** 20 })).summary, /below/);
});

test("no /dev/kvm: the nested test host is named as the way to stock guests; no PVM explanation for a device that is not there", () => {
  const r = checkHost(
    report({ kind: "pvm", kvmModules: ["kvm_pvm"], kvm: { present: false, accessible: false, reason: "/dev/kvm does not exist: kvm_pvm is loaded but registered no KVM device" } }),
  );
  assert.equal(r.ok, false);
  assert.equal(r.lines.filter((l) => /instruction emulator/.test(l)).length, 0);
  assert.ok(r.lines.some((l) => l.startsWith("FAIL virtualization: PVM module (kvm_pvm) loaded, without a KVM device")), r.lines.join("\n"));
  assert.ok(r.lines.some((l) => /^note the nested test host .*needs no \/dev\/kvm/.test(l)), r.lines.join("\n"));
});

test("VT-x CPU without /dev/kvm: the device line fails, the CPU's virtualization line does not", () => {
  const r = checkHost(report({ kvm: { present: false, accessible: false, reason: "/dev/kvm does not exist: no KVM module is loaded (load kvm_intel or kvm_amd)" } }));
  assert.equal(r.ok, false);
  assert.ok(r.lines.some((l) => l.startsWith("FAIL /dev/kvm present: /dev/kvm does not exist: no KVM module is loaded")), r.lines.join("\n"));
  assert.ok(r.lines.includes("ok   virtualization: hardware-assisted: Intel VT-x (kvm_intel)"), r.lines.join("\n"));
});

test("the command exits 0 here when KVM works", { skip: noKvm }, () => {
  const ok = spawnSync(process.execPath, [CLI, "host", "check"], { encoding: "utf8" });
  assert.equal(ok.status, 0, ok.stdout + ok.stderr);
});

test("the command exits 1 with one summary line when KVM is missing", () => {
  const missing = spawnSync(process.execPath, [CLI, "host", "check"], { encoding: "utf8", env: { ...process.env, PARTIS_KVM_DEVICE: "/nonexistent-kvm" } });
  assert.equal(missing.status, 1);
  assert.match(missing.stdout.trim().split("\n").at(-1)!, /^this host cannot run Partis VMs: .*nonexistent-kvm/);
});
