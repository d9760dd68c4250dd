/**
 * What `partis run` checks before anything starts: the host's KVM, --cpus,
 * --memory, the kernel and initrd files and whether they fit. Bad input is a
 * UsageError (exit 2) with one line. Loaded by run-command after the worker
 * process has been started, so these modules load while the worker does.
 */
import { accessSync, constants, existsSync, statSync } from "node:fs";
import { dirname } from "node:path";
import { UsageError, HostCapabilityError } from "../errors.js";
import { probeHost, stockGuestVerdict, type HostReport } from "../hypervisor/host.js";
import type { DeviceOptions } from "./device-options.js";
import { DEVICE_FLAGS } from "./early-threads.js";
import { DEFAULT_FRAMEBUFFER_HEIGHT, DEFAULT_FRAMEBUFFER_WIDTH, FRAMEBUFFER_MAX_BYTES } from "../devices/display/linear-framebuffer.js";
import { planMemory, MIN_RAM_BYTES, RAM_GRANULE } from "../machine/memory-map.js";
import { HUGE_1G, HUGE_2M } from "../hypervisor/partition.js";
import { planLinuxLoad, KernelImageError, LinuxLoadError } from "../machine/linux-boot.js";
import { unpackKernel } from "../images/kernel-unpack.js";
import { readKernelHead } from "../images/kernel-file.js";
import { MAX_VCPUS } from "../machine/cpuid.js";
import { parseByteSize, formatByteSize } from "./byte-size.js";
import { kvmDevicePath, type VmConfig } from "../worker/vm-config.js";
import { DEFAULT_APPEND, type RunOptions } from "./run-command.js";

/** This host, probed once per `partis run`. */
export function probeRunHost(): HostReport {
  return probeHost(kvmDevicePath());
}

/** The default guest's kernel and initrd, prepared on first use; warns when this host cannot run it directly. */
export async function defaultGuest(host: HostReport): Promise<{ kernel: string; initrd?: string }> {
  requireKvm(host); // before fetching and building a guest that could not run here
  const verdict = stockGuestVerdict(host);
  if (!verdict.ok)
    process.stderr.write(`partis run: warning: ${verdict.why}\npartis run: hint: \`partis host nested -- partis run\` runs it in the nested test host\n`);
  const { prepareDefaultGuest } = await import("../images/default-guest.js");
  return prepareDefaultGuest({ log: (l) => process.stderr.write(`partis run: ${l}\n`) });
}

function requireKvm(host: HostReport): void {
  if (!host.kvm.present) throw new HostCapabilityError("NO_KVM", `/dev/kvm is missing: ${host.kvm.reason ?? "load kvm_intel or kvm_amd"}`);
  if (!host.kvm.accessible) throw new HostCapabilityError("KVM_DENIED", `/dev/kvm is not usable: ${host.kvm.reason ?? "permission denied"}`);
}

function requireFile(path: string, what: string): number {
  let st;
  try {
    st = statSync(path);
  } catch {
    throw new UsageError(`${what} ${path}: no such file`);
  }
  if (!st.isFile()) throw new UsageError(`${what} ${path}: not a regular file`);
  try {
    accessSync(path, constants.R_OK);
  } catch {
    throw new UsageError(`${what} ${path}: not readable`);
  }
  return st.size;
}

/** Whether any device flag was given: only then is device-options.ts loaded, and the storage layer behind it (start-up time). */
export function requestsDevices(opts: DeviceOptions): boolean {
  return (Object.keys(DEVICE_FLAGS) as (keyof DeviceOptions)[]).some((k) => {
    const v = opts[k];
    return Array.isArray(v) ? v.length > 0 : v !== undefined && v !== false;
  });
}

/** Validate everything before anything starts: bad input exits 2 with nothing running. */
export async function resolveRunConfig(opts: RunOptions, guest: { kernel: string; initrd?: string } | undefined, host: HostReport): Promise<VmConfig> {
  if (!/^\d+$/.test(opts.cpus.trim())) throw new UsageError(`--cpus: "${opts.cpus}" is not a whole number`);
  const cpus = Number(opts.cpus);
  const maxCpus = Math.min(host.kvm.maxVcpus ?? MAX_VCPUS, MAX_VCPUS);
  if (cpus < 1 || cpus > maxCpus) throw new UsageError(`--cpus: ${cpus} is outside 1..${maxCpus} (KVM's maximum here)`);
  const vcpuThreads = opts.vcpuThreads ?? "auto";
  if (vcpuThreads !== "auto" && vcpuThreads !== "worker" && vcpuThreads !== "native" && vcpuThreads !== "native-main")
    throw new UsageError(`--vcpu-threads: "${vcpuThreads}" is not auto, worker, native or native-main`);

  let memoryBytes = parseByteSize(opts.memory, "--memory", "M");
  memoryBytes = Math.ceil(memoryBytes / RAM_GRANULE) * RAM_GRANULE;
  if (memoryBytes < MIN_RAM_BYTES) throw new UsageError(`--memory: ${opts.memory} is below the minimum of ${formatByteSize(MIN_RAM_BYTES)}`);
  if (memoryBytes > host.memTotalBytes)
    throw new UsageError(`--memory: ${opts.memory} is more than this host has (${formatByteSize(host.memTotalBytes)} in all)`);
  const hugePageBytes = resolveHugePages(opts, memoryBytes, host);
  const plan = planMemory(memoryBytes);

  const kernelPath = opts.kernel ?? guest?.kernel;
  if (kernelPath === undefined) throw new UsageError("no kernel: pass --kernel");
  requireFile(kernelPath, "--kernel");
  const initrdPath = opts.initrd ?? (opts.kernel === undefined ? guest?.initrd : undefined);
  const initrdSize = initrdPath === undefined ? 0 : requireFile(initrdPath, "--initrd");
  const cmdline = opts.append ?? DEFAULT_APPEND;
  try {
    planLinuxLoad(plan, readKernelHead(kernelPath), initrdSize, cmdline);
  } catch (e) {
    if (e instanceof KernelImageError) throw new UsageError(`--kernel ${kernelPath}: ${e.message}`);
    if (e instanceof LinuxLoadError) throw new UsageError(`${e.code === "INITRD_DOES_NOT_FIT" ? `--initrd ${initrdPath}` : `--kernel ${kernelPath}`}: ${e.message}`);
    throw e;
  }
  const devices = requestsDevices(opts) ? (await import("./device-options.js")).resolveDevices(opts, opts.name, cpus) : [];
  const framebuffer = resolveFramebuffer(opts);
  // The host comes last: a mistyped flag is told as such on any host, KVM or not.
  requireKvm(host);
  return {
    name: opts.name,
    memoryBytes,
    ...(hugePageBytes !== undefined ? { hugePageBytes } : {}),
    cpus,
    ...(vcpuThreads !== "auto" ? { vcpuThreads } : {}),
    kernelPath,
    ...(initrdPath !== undefined ? { initrdPath } : {}),
    cmdline,
    ...(devices.length > 0 ? { devices } : {}),
    ...(framebuffer !== undefined ? { framebuffer } : {}),
    ...(opts.screenshot !== undefined ? { screenshotPath: opts.screenshot } : {}),
  };
}

/**
 * `--hugepages [2M|1G]`: the page size, once guest RAM is a whole number of
 * such pages and the host's pool has that many available now (the worker
 * reserves them all when it creates the partition, so none can run out later).
 */
function resolveHugePages(opts: RunOptions, memoryBytes: number, host: HostReport): number | undefined {
  if (opts.hugepages === undefined || opts.hugepages === false) return undefined;
  const given = opts.hugepages === true ? "2M" : opts.hugepages;
  let pageBytes: number | undefined;
  try {
    pageBytes = parseByteSize(given, "--hugepages", "M"); // a bare number is MiB: 2 or 1024, as Proxmox writes them
  } catch {
    pageBytes = undefined;
  }
  if (pageBytes !== HUGE_2M && pageBytes !== HUGE_1G) throw new UsageError(`--hugepages: "${given}" is not a huge-page size (2M or 1G)`);
  const size = formatByteSize(pageBytes);
  if (memoryBytes % pageBytes !== 0)
    throw new UsageError(`--hugepages ${size}: --memory ${formatByteSize(memoryBytes)} is not a whole number of ${size} pages`);
  const pool = host.hugePagePools.find((p) => p.pageBytes === pageBytes);
  if (pool === undefined) throw new UsageError(`--hugepages ${size}: this host's kernel has no ${size} huge-page pool`);
  const pages = memoryBytes / pageBytes;
  if (pool.available < pages) {
    const knob = `/sys/kernel/mm/hugepages/hugepages-${pageBytes >> 10}kB/nr_hugepages`;
    throw new UsageError(
      `--hugepages ${size}: the guest needs ${pages} huge pages of ${size}; the host has ${pool.available} available (of ${pool.total} in its pool; grow it with ${knob})`,
    );
  }
  return pageBytes;
}

function resolveFramebuffer(opts: RunOptions): { width: number; height: number } | undefined {
  if (opts.screenshot !== undefined) {
    const dir = dirname(opts.screenshot);
    if (!existsSync(dir)) throw new UsageError(`--screenshot ${opts.screenshot}: directory ${dir} does not exist`);
  }
  if (opts.framebuffer === undefined && opts.screenshot === undefined) return undefined;
  if (opts.framebuffer === undefined || opts.framebuffer === true) return { width: DEFAULT_FRAMEBUFFER_WIDTH, height: DEFAULT_FRAMEBUFFER_HEIGHT };
  const m = /^(\d+)x(\d+)$/.exec(String(opts.framebuffer));
  if (m === null) throw new UsageError(`--framebuffer: "${String(opts.framebuffer)}" is not WIDTHxHEIGHT (e.g. 1024x768)`);
  const width = Number(m[1]);
  const height = Number(m[2]);
  if (width < 320 || height < 200 || width > 4096 || height > 2160 || width * height * 4 > FRAMEBUFFER_MAX_BYTES)
    throw new UsageError(`--framebuffer: ${width}x${height} is outside 320x200..4096x2160 (at most ${FRAMEBUFFER_MAX_BYTES >> 20} MiB of pixels)`);
  return { width, height };
}

/**
 * `--kernel-unpack auto` (the default) or `host`: the kernel decompressed on
 * the host, from the cache or unpacked now (once). Under `auto` a kernel that
 * cannot be unpacked here (no payload description, a format without a tool)
 * boots compressed as before; `host` makes that bad input (exit 2).
 */
export async function withUnpackedKernel(config: VmConfig, opts: Pick<RunOptions, "kernelUnpack">): Promise<VmConfig> {
  const mode = opts.kernelUnpack;
  if (mode !== "auto" && mode !== "host" && mode !== "guest") throw new UsageError(`--kernel-unpack: "${mode}" is not auto, host or guest`);
  if (mode === "guest") return config;
  const cannot = (why: string): VmConfig => {
    if (mode === "host") throw new UsageError(`--kernel-unpack host: ${config.kernelPath} cannot be unpacked on the host: ${why}`);
    return config;
  };
  const r = await unpackKernel(config.kernelPath, { log: (l) => process.stderr.write(`partis run: ${l}\n`) });
  if (!r.ok) return cannot(r.why);
  try {
    planLinuxLoad(planMemory(config.memoryBytes), readKernelHead(config.kernelPath), 0, config.cmdline, r.kernel);
  } catch (e) {
    if (e instanceof LinuxLoadError) return cannot(e.message);
    throw e;
  }
  return { ...config, unpackedKernel: r.kernel };
}
