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
   * The vCPUs' threads (vcpu-thread.ts, VcpuThreadKind): "worker" (default), a
   * Node worker per vCPU; "native", a native thread per vCPU (~44 KiB instead
   * of ~10 MiB) whose exits one worker handles for all; "native-main", native
   * threads whose exits the VM's main thread handles (no vCPU isolate).
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
