/**
 * `partis host check`: the seed's hardware requirements as a command. A
 * 64-bit host, KVM present and usable, hardware-assisted virtualization
 * (VT-x / AMD-V) or PVM (what that means for guests), NX/DEP, memory.
 * Exit 0 when a VM can run here, non-zero with a one-line reason otherwise.
 */
import { readFileSync } from "node:fs";
import type { Command } from "commander";
import { probeHost, stockGuestVerdict, PVM_EXPLANATION, type HostReport } from "../hypervisor/host.js";
import { formatByteSize } from "./byte-size.js";
import { kvmDevicePath } from "../worker/vm-config.js";

const SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/** The selected shmem THP mode ("never", "advise", ...), or undefined without THP. */
function shmemHugePageMode(): string | undefined {
  try {
    return /\[(\w+)\]/.exec(readFileSync(SHMEM_THP, "utf8"))?.[1];
  } catch {
    return undefined;
  }
}

/** Below this a host cannot give even the smallest guest plus the worker. */
const MIN_HOST_MEMORY = 256 * 2 ** 20;

export interface HostCheckResult {
  readonly ok: boolean;
  /** One line: why the host can or cannot run VMs. */
  readonly summary: string;
  readonly lines: readonly string[];
  readonly stockGuests: boolean;
  readonly report: HostReport;
}

export function checkHost(report: HostReport = probeHost(kvmDevicePath())): HostCheckResult {
  const lines: string[] = [];
  const problems: string[] = [];
  const mark = (ok: boolean) => (ok ? "ok  " : "FAIL");
  lines.push(`${mark(report.is64bit)} 64-bit host (${report.machine})`);
  if (!report.is64bit) problems.push(`host is not 64-bit (${report.machine})`);
  lines.push(`${mark(report.kvm.present)} /dev/kvm present${report.kvm.present ? "" : ": " + (report.kvm.reason ?? "missing")}`);
  if (!report.kvm.present) problems.push(report.kvm.reason ?? "/dev/kvm is missing (load kvm_intel or kvm_amd)");
  else {
    lines.push(`${mark(report.kvm.accessible)} /dev/kvm usable${report.kvm.accessible ? ` (API ${report.kvm.apiVersion}, up to ${report.kvm.maxVcpus} vCPUs)` : ": " + (report.kvm.reason ?? "")}`);
    if (!report.kvm.accessible) problems.push(report.kvm.reason ?? "/dev/kvm is not usable");
  }
  const kindText = {
    vmx: "hardware-assisted: Intel VT-x (kvm_intel)",
    svm: "hardware-assisted: AMD-V (kvm_amd)",
    pvm: report.kvm.present ? "PVM (kvm_pvm): no VT-x/AMD-V; guest kernel code is emulated" : "PVM module (kvm_pvm) loaded, without a KVM device",
    unknown: "unknown (no vmx/svm flag and no kvm_pvm module)",
  }[report.kind];
  // A VT-x/AMD-V CPU is fine without /dev/kvm (that line fails above); a PVM module without its device is not.
  lines.push(`${mark(report.kind !== "unknown" && (report.kind !== "pvm" || report.kvm.present))} virtualization: ${kindText}`);
  lines.push(`${mark(report.nx)} NX/DEP (no-execute) ${report.nx ? "available" : "missing"}`);
  if (!report.nx) problems.push("the CPU has no NX (no-execute / DEP) support");
  const memOk = report.memTotalBytes >= MIN_HOST_MEMORY;
  lines.push(`${mark(memOk)} memory: ${formatByteSize(report.memTotalBytes)} total, ${formatByteSize(report.memAvailableBytes)} available`);
  if (!memOk) problems.push(`host memory ${formatByteSize(report.memTotalBytes)} is below ${formatByteSize(MIN_HOST_MEMORY)}`);
  lines.push(`     CPUs: ${report.logicalCpus} (${report.cpuModel})`);
  const thp = shmemHugePageMode();
  if (thp !== undefined)
    lines.push(
      thp === "never" || thp === "deny"
        ? `note huge pages for guest RAM: off (shmem THP "${thp}"); \`echo advise > ${SHMEM_THP}\` lets guests use 2 MiB pages (faster boot and memory access)`
        : `ok   huge pages for guest RAM: shmem THP "${thp}"`,
    );
  for (const pool of report.hugePagePools)
    if (pool.total > 0 || pool.available > 0)
      lines.push(
        `     reserved huge pages (partis run --hugepages ${pool.pageBytes >= 2 ** 30 ? `${pool.pageBytes / 2 ** 30}G` : `${pool.pageBytes >> 20}M`}): ${pool.available} of ${pool.total} available (${formatByteSize(pool.available * pool.pageBytes)})`,
      );
  const verdict = stockGuestVerdict(report);
  const pvm = report.kind === "pvm" && report.kvm.present;
  if (pvm) lines.push(`note ${PVM_EXPLANATION}`);
  const notHere = pvm ? "not here (PVM, see above)" : "not here: " + verdict.why;
  lines.push(`${verdict.ok ? "ok  " : "note"} stock guests (unmodified Linux): ${verdict.ok ? "yes" : notHere}`);
  if (!report.kvm.present)
    lines.push("note the nested test host (`partis host nested -- partis run`) needs no /dev/kvm here: QEMU emulates an AMD-V machine in software, slowly");
  const ok = problems.length === 0;
  const summary = ok
    ? verdict.ok
      ? `this host can run Partis VMs (${kindText})`
      : `this host can run Partis VMs with KVM, but stock guests need the nested test host (\`partis host nested -- partis run\`): ${kindText}`
    : `this host cannot run Partis VMs: ${problems[0]}`;
  return { ok, summary, lines, stockGuests: verdict.ok, report };
}

export function registerHostCommands(program: Command): Command {
  const host = program.command("host").description("inspect this host");
  host
    .command("check")
    .description("check the hardware requirements (KVM, VT-x/AMD-V or PVM, NX, memory)")
    .option("--json", "print the findings as JSON")
    .action((opts: { json?: boolean }) => {
      const r = checkHost();
      if (opts.json) {
        console.log(JSON.stringify({ ok: r.ok, stockGuests: r.stockGuests, summary: r.summary, host: r.report }, null, 2));
      } else {
        for (const l of r.lines) console.log(l);
        console.log(r.summary);
      }
      process.exitCode = r.ok ? 0 : 1;
    });
  return host;
}
