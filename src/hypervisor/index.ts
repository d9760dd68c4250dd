/**
 * The hypervisor binding: the only layer of Partis that calls libc (through
 * koffi). System (/dev/kvm), Partition (a VM), VirtualProcessor (a vCPU),
 * host capability probing, eventfds, native threads for vCPUs
 * (SyscallThread), and the raw libc entry points other
 * layers need (aligned buffers, shared mappings).
 */
export { KvmSystem, kvmIoctl, type CpuidEntry } from "./system.js";
export {
  Partition,
  PartitionConfigError,
  DEFAULT_TSS_GPA,
  DEFAULT_IDENTITY_MAP_GPA,
  type EventFdLike,
  type PartitionHandoff, type PartitionOptions, type IoEventFdSpec, type GsiRoute } from "./partition.js";
export {
  VirtualProcessor,
  VcpuKicker,
  installKickHandler,
  KICK_SIGNAL,
  type VcpuKickHandle,
  type VcpuExit,
  type VcpuExitReason,
  type IoExit,
  type MmioExit,
  type SystemEventExit,
  type InternalErrorExit,
  type FailEntryExit,
  type Regs,
  type Sregs,
  type Segment,
  type DescriptorTable,
  type Fpu,
  type MsrEntry,
  type VcpuEvents,
} from "./virtual-processor.js";
export { EventFd } from "./eventfd.js";
export { SyscallThread, SyscallDoorbell } from "./syscall-thread.js";
export { probeHost, hostCanRunStockGuests, stockGuestVerdict, PVM_EXPLANATION, type HostReport, type VirtualizationKind } from "./host.js";
export { KvmError, KvmProtocolError, SystemCallError } from "./errors.js";
export { KVM_CAP, KVM_EXIT, KVM_SYSTEM_EVENT, KVM_INTERNAL_ERROR, KVM_MP_STATE } from "./kvm-abi.js";
export * as libc from "./libc.js";
