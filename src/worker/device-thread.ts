/**
 * The device thread of a worker (node:worker_threads): it owns every PCI device
 * of the VM and their back ends (disk images, TAP devices, sockets).
 *
 * It blocks in poll(2) on: the mailbox doorbell (register and config accesses
 * forwarded by vCPU threads), the ioeventfds of virtqueue doorbells (guest
 * notifications that never leave the kernel as exits), and the back ends' fds
 * (frames from a TAP, bytes from a console socket). Everything a device does
 * happens here, one event at a time, so device models need no locks.
 *
 * Start-up: attach to the partition (its own mapping of guest RAM), build the
 * devices from the VM's device list, give their BARs addresses (as firmware
 * would), then post "ready". Stop: the stop word turns non-zero and the
 * doorbell rings.
 */
import { awaitThreadData } from "./thread-prestart.js";
import { parentPort, workerData } from "node:worker_threads";
import { Session } from "node:inspector";
import { writeFileSync } from "node:fs";
import { Partition, type PartitionHandoff } from "../hypervisor/partition.js";
import { EventFd } from "../hypervisor/eventfd.js";
import { setThreadName, threadCpuTimeNs } from "../hypervisor/libc.js";
import { PollLoop } from "./poll-loop.js";
import type { PciDeviceServices, FdWatch, DoorbellMap } from "../devices/pci/device-thread-services.js";
import { pciIntxGsi } from "../machine/acpi/dsdt.js";
import type { PciConfig } from "../devices/pci/pci-config.js";
import type { IrqLine } from "../devices/dependencies.js";
import { DeviceMailbox, type MailboxHandoff } from "./device-mailbox.js";
import { DeviceBus, type BarWindows } from "./device-bus.js";
import { IntxRouter, MsiRouter } from "./interrupt-routing.js";
import { planPci, type DeviceSpec } from "./device-plan.js";
import { assembleDevice, type AssembledDevice } from "./device-assembly.js";
import { bootTrace } from "./boot-trace.js";
import { StateReportRequest, describeIsolateMemory, writeReport } from "./state-report.js";

export interface DeviceThreadData {
  readonly vmName: string;
  readonly handoff: PartitionHandoff;
  readonly mailbox: MailboxHandoff;
  readonly devices: readonly DeviceSpec[];
  readonly windows: BarWindows;
  readonly vcpus: number;
  /** Word 0 non-zero: stop. */
  readonly stop: SharedArrayBuffer;
  /** State report requests (state-report.ts): answered on the next wake-up (the doorbell rings with each). */
  readonly report: SharedArrayBuffer;
}

export type DeviceThreadMessage =
  | { readonly type: "ready"; readonly functions: readonly { bdf: number; name: string }[] }
  | { readonly type: "error"; readonly message: string }
  | { readonly type: "warning"; readonly message: string }
  | { readonly type: "stats"; readonly stats: Readonly<Record<string, number>> };

/** ioeventfd doorbells for one device. */
class Doorbells implements DoorbellMap {
  private readonly bells = new Map<number, { eventfd: EventFd; watch: FdWatch; gpa: number | undefined; length: number }>();
  constructor(private readonly partition: Partition, private readonly loop: PollLoop, private readonly warn: (m: string) => void) {}

  mapDoorbell(key: number, gpa: number | undefined, length: number, onRing: () => void): void {
    let bell = this.bells.get(key);
    if (bell === undefined) {
      const eventfd = EventFd.create({ nonBlocking: true });
      const watch = this.loop.watch(eventfd.fd, () => {
        if (eventfd.take() !== 0) onRing();
      });
      bell = { eventfd, watch, gpa: undefined, length };
      this.bells.set(key, bell);
    }
    if (bell.gpa === gpa && bell.length === length) return;
    if (bell.gpa !== undefined) this.partition.removeIoeventfd({ space: "mmio", addr: bell.gpa, length: bell.length, eventfd: bell.eventfd });
    bell.gpa = undefined;
    if (gpa === undefined) return;
    try {
      this.partition.ioeventfd({ space: "mmio", addr: gpa, length, eventfd: bell.eventfd });
      bell.gpa = gpa;
      bell.length = length;
    } catch (e) {
      // The write then arrives as an MMIO exit and reaches the device through its BAR.
      this.warn(`ioeventfd at 0x${gpa.toString(16)} refused (${(e as Error).message}); notifications take the exit path`);
    }
  }

  close(): void {
    for (const b of this.bells.values()) {
      b.watch.close();
      if (b.gpa !== undefined) {
        try {
          this.partition.removeIoeventfd({ space: "mmio", addr: b.gpa, length: b.length, eventfd: b.eventfd });
        } catch {
          /* partition gone */
        }
      }
      b.eventfd.close();
    }
  }
}

/**
 * PARTIS_PROFILE_DEVICES=<dir>: a V8 CPU profile of this thread, written as
 * <dir>/devices-<pid>.cpuprofile when the VM stops (open it in Chrome DevTools).
 */
function startProfiler(): (() => void) | undefined {
  const dir = process.env.PARTIS_PROFILE_DEVICES;
  if (dir === undefined || dir === "") return undefined;
  const session = new Session();
  session.connect();
  session.post("Profiler.enable");
  session.post("Profiler.setSamplingInterval", { interval: 200 });
  session.post("Profiler.start");
  return () =>
    session.post("Profiler.stop", (err, r) => {
      if (err === null) writeFileSync(`${dir}/devices-${process.pid}.cpuprofile`, JSON.stringify(r.profile));
      session.disconnect();
    });
}

/**
 * The thread's life: attach to the partition, serve the devices until told to
 * stop, then release this thread's mappings of guest RAM. Thread-local
 * finalizers do not run when a thread ends and mappings are process-wide:
 * left mapped, every reboot would keep the old guest RAM alive (and, with
 * --hugepages, its reserved pages, so the next boot could not reserve its own).
 */
function main(data: DeviceThreadData): void {
  setThreadName("partis-devices");
  const partition = Partition.attach(data.handoff);
  try {
    serveDevices(data, partition);
  } finally {
    partition.destroy();
  }
}

function serveDevices(data: DeviceThreadData, partition: Partition): void {
  const stopProfiler = startProfiler();
  const port = parentPort!;
  const stop = new Int32Array(data.stop, 0, 1);
  const mailbox = DeviceMailbox.attach(data.mailbox);
  const server = mailbox.server();
  const portShadow = mailbox.portShadow();
  const postedWrites = mailbox.postedWritePorts();
  const loop = new PollLoop((e) => warn(`device work failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`));
  const bus = new DeviceBus();
  const intx = new IntxRouter(partition);
  const msi = new MsiRouter(partition);
  const warned = new Set<string>();
  const warn = (message: string): void => {
    if (warned.has(message) || warned.size > 100) return;
    warned.add(message);
    port.postMessage({ type: "warning", message } satisfies DeviceThreadMessage);
  };
  const doorbellSets: Doorbells[] = [];
  const assembled: AssembledDevice[] = [];

  const plan = planPci(data.devices);
  for (const f of plan) {
    const slot = (f.bdf >> 3) & 31;
    const doorbells = new Doorbells(partition, loop, warn);
    doorbellSets.push(doorbells);
    // The function's INTx line is made on first use: its pin is known once the model exists.
    let pciRef: { pci: PciConfig } | undefined;
    let intxLine: IrqLine | undefined;
    const services: PciDeviceServices = {
      memory: partition.guestMemory,
      intx: {
        setLevel: (level) => {
          const pin = pciRef?.pci.identity.interruptPin ?? 0;
          if (pin === 0) return;
          intxLine ??= intx.line(`fn${f.bdf}`, pciIntxGsi(slot, pin - 1), pciRef?.pci);
          intxLine.setLevel(level);
        },
      },
      msi: msi.sink(),
      loop,
      doorbells,
      portShadow,
      postedWrites,
    };
    const a = assembleDevice(f, data.devices, services, {
      vmName: data.vmName,
      vcpus: data.vcpus,
      isaIrq: (irq) => intx.line(`isa${irq}`, irq, undefined),
      warn,
    });
    pciRef = a.device;
    assembled.push(a);
    bus.attach(f.bdf, a.device);
  }
  bus.assignBars(data.windows);
  for (const a of assembled) a.device.pci.onMappingChanged?.();

  const doorbell = EventFd.borrow(mailbox.doorbellFd);
  let failures = 0;
  const handle = (r: Parameters<DeviceBus["service"]>[0]): void => {
    try {
      bus.service(r);
    } catch (e) {
      // A device model bug must not take the VM down: the access reads all-ones.
      r.data.fill(0xff, 0, Math.min(r.data.length, Math.max(r.size, 1) * Math.max(r.count, 1)));
      if (failures++ < 20) warn(`device access failed: ${(e as Error).stack ?? String(e)}`);
    }
  };
  const stats = { doorbellWakeups: 0, requests: 0, pollWakeups: 0 };
  const runDeferred = (): void => loop.runDeferred();
  loop.watch(doorbell.fd, () => {
    doorbell.take();
    stats.doorbellWakeups++;
    stats.requests += server.serve(handle, runDeferred);
  });

  bootTrace("devices", "ready");
  port.postMessage({
    type: "ready",
    functions: assembled.map((a, i) => ({ bdf: plan[i]!.bdf, name: a.device.name })),
  } satisfies DeviceThreadMessage);

  const report = StateReportRequest.attach(data.report);
  while (Atomics.load(stop, 0) === 0) {
    loop.runOnce(250);
    stats.pollWakeups++;
    // Requests posted between the doorbell read and the drain are caught here too.
    stats.requests += server.drain(handle);
    // Work the answered accesses started (an IDE DMA transfer): the vCPUs are already going on.
    loop.runDeferred();
    if (report.take()) {
      const lines = [`devices: ${stats.requests} register requests served, ${stats.doorbellWakeups} doorbell wake-ups`];
      for (const a of assembled) lines.push(...(a.device.describeState?.() ?? [`${a.device.name}: (no state report)`]));
      lines.push(describeIsolateMemory("device thread"));
      writeReport(lines);
    }
  }
  const deviceStats: Record<string, number> = {};
  assembled.forEach((a) => {
    for (const [k, v] of Object.entries(a.stats?.() ?? {})) deviceStats[`${a.device.name}.${k}`] = Math.round(v * 10) / 10;
  });
  port.postMessage(
    { type: "stats", stats: { ...stats, postedWrites: server.postedWrites, unclaimedAccesses: bus.unclaimedAccesses, cpuMs: Math.round(Number(threadCpuTimeNs()) / 1e5) / 10, ...deviceStats } } satisfies DeviceThreadMessage,
  );
  stopProfiler?.();

  for (const a of assembled) a.close();
  for (const d of doorbellSets) d.close();
  msi.close();
}

bootTrace("devices", "modules loaded");
/** Started with its data, or prestarted (thread-prestart.ts): then the data is the first message. */
const threadData = await awaitThreadData<DeviceThreadData>(workerData, parentPort);
// A prestarted thread the VM did not need: end quietly.
if (threadData === null) process.exit(0);
try {
  main(threadData);
} catch (e) {
  parentPort?.postMessage({ type: "error", message: e instanceof Error ? e.message : String(e) } satisfies DeviceThreadMessage);
}
