/**
 * The configuration a worker boots a VM from. Plain data: the CLI (and later
 * the service) builds and validates it, the worker receives it over its
 * control channel.
 */
import type { DeviceSpec } from "./device-plan.js";
import type { UnpackedKernel } from "../images/kernel-unpack.js";
import type { VcpuThreadKind } from "./vcpu-thread.js";

export interface VmConfig {
  /** Display name (messages, logs). */
  readonly name: string;
  readonly memoryBytes: number;
  /** Guest RAM on the host's reserved huge pages of this size (2 MiB or 1 GiB); absent: shmem. */
  readonly hugePageBytes?: number;
  readonly cpus: number;
  /**
   * The vCPUs' threads (vcpu-thread.ts, VcpuThreadKind): "worker", a Node
   * worker per vCPU; "native", a native thread per vCPU (~44 KiB instead of
   * ~10 MiB) whose exits one worker handles for all; "native-main", native
   * threads whose exits the VM's main thread handles (no vCPU isolate).
   * Absent: chosen from the devices (vcpuThreadsFor).
   */
  readonly vcpuThreads?: VcpuThreadKind;
  readonly kernelPath: string;
  /**
   * The kernel decompressed on the host (src/images/kernel-unpack.ts): loaded
   * as is and entered at startup_64. Absent: the bzImage decompresses itself.
   */
  readonly unpackedKernel?: UnpackedKernel;
  readonly initrdPath?: string;
  readonly cmdline: string;
  /** PCI devices (disks, NICs, channels), in the order they were given. */
  readonly devices?: readonly DeviceSpec[];
  /** A linear framebuffer (VESA-style, announced in boot_params) of this size. */
  readonly framebuffer?: { readonly width: number; readonly height: number };
  /** Write the framebuffer as a PPM image here when the VM stops. */
  readonly screenshotPath?: string;
}

/**
 * Device kinds whose guest drivers exit to user space at every register
 * access (port I/O): the PIIX IDE controller (PIO transfers, and the register
 * protocol around each DMA command) and the NE2000. Their exits are what a
 * vCPU's own worker serves fastest (docs/architecture.md, "vCPU threads").
 */
export const EXIT_BOUND_DEVICE_KINDS: ReadonlySet<DeviceSpec["kind"]> = new Set<DeviceSpec["kind"]>(["ide-disk", "ide-cdrom", "ne2k"]);

/**
 * The vCPU threads a VM runs on: the configuration's choice, else "worker"
 * when a device is exit-bound (EXIT_BOUND_DEVICE_KINDS) and "native-main"
 * otherwise: a guest on virtio devices (ioeventfd and irqfd, no exit per
 * request) and the in-kernel LAPIC exits to user space rarely, so it keeps
 * no V8 isolate per vCPU (~10 MiB each) for them. `partis run`'s early
 * threads (src/cli/early-threads.ts) apply the same rule to the raw flags.
 */
export function vcpuThreadsFor(config: Pick<VmConfig, "vcpuThreads" | "devices">): VcpuThreadKind {
  if (config.vcpuThreads !== undefined) return config.vcpuThreads;
  return (config.devices ?? []).some((d) => EXIT_BOUND_DEVICE_KINDS.has(d.kind)) ? "worker" : "native-main";
}

/** How a worker's VM ended. */
export type VmOutcome =
  | { readonly kind: "poweroff"; readonly source: string }
  | { readonly kind: "reset"; readonly source: string }
  | { readonly kind: "crash"; readonly reason: string }
  /** The VM could not run: a back end failed to start (a TAP refused, a disk vanished). */
  | { readonly kind: "failed"; readonly reason: string };

/** Worker process exit statuses, read by the CLI (and the service). */
export const WORKER_EXIT = {
  poweroff: 0,
  failed: 1,
  badConfig: 2,
  reset: 10,
  crash: 11,
} as const;

/** Messages over the worker's control channel (Node IPC). */
export type ControlRequest =
  | { readonly type: "start"; readonly config: VmConfig }
  /** Press the ACPI power button: the guest shuts itself down. */
  | { readonly type: "shutdown" }
  /** Stop at once (power pulled). */
  | { readonly type: "stop" };

export type ControlEvent =
  | { readonly type: "running"; readonly vcpus: number }
  | { readonly type: "exited"; readonly outcome: VmOutcome }
  | { readonly type: "error"; readonly code: string; readonly message: string };

/** The KVM device: /dev/kvm unless PARTIS_KVM_DEVICE names another (tests, unusual hosts). */
export function kvmDevicePath(): string {
  return process.env.PARTIS_KVM_DEVICE ?? "/dev/kvm";
}
