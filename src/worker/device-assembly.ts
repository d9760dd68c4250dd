/**
 * Builds the device models of a VM from its device list, on the device thread:
 * opens the back ends (disk images, network ports, console sockets) and hands
 * each model its services. The resolver from configuration to a live device,
 * in one place.
 */
import type { IrqLine } from "../devices/dependencies.js";
import type { PciDevice } from "../devices/pci/pci-config.js";
import type { PciDeviceServices } from "../devices/pci/device-thread-services.js";
import { DevicePlanError, type DeviceSpec, type PlannedFunction } from "./device-plan.js";

export interface AssembledDevice {
  readonly device: PciDevice;
  /** Release back ends (close files, sockets). */
  close(): void;
}

export interface AssemblyContext {
  readonly vmName: string;
  readonly vcpus: number;
  /** An ISA interrupt line (IDE compatibility mode: 14 and 15). */
  isaIrq(irq: number): IrqLine;
}

export function assembleDevice(f: PlannedFunction, devices: readonly DeviceSpec[], services: PciDeviceServices, ctx: AssemblyContext): AssembledDevice {
  void services;
  void ctx;
  const spec = devices[f.specIndex]!;
  throw new DevicePlanError("DEVICE_UNAVAILABLE", `${spec.kind} devices are not available in this build`, { device: spec.id });
}
