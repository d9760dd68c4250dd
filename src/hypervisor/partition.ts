/**
 * A partition: one KVM VM, its guest RAM, and the VM-wide ioctls (memory
 * slots, in-kernel irqchip and PIT, GSI routing, irqfd/ioeventfd, MSIs,
 * dirty logging, kvmclock).
 *
 * Guest RAM is one memfd holding every RAM range back to back (each range
 * at its `fileOffset`), mapped MAP_SHARED, so any thread or process that
 * holds the fd can map the same pages for itself. Memory slot N is range N.
 * The memfd is shmem, or hugetlbfs when `hugePageBytes` asks for the host's
 * reserved huge pages (then all of them are reserved at creation).
 *
 * Threads: the fds are process-wide. The thread that creates the partition
 * owns it (destroy() closes the fds); another worker_thread gets its own
 * Partition object over the same VM with `attach(handoff())`, which maps the
 * memfd again for that thread's views and never creates the VM again.
 */
import * as libc from "./libc.js";
import { KvmProtocolError, SystemCallError } from "./errors.js";
import { kvmIoctl, type KvmSystem } from "./system.js";
import {
  KVM_CAP,
  KVM_IOEVENTFD_FLAG_DATAMATCH,
  KVM_IOEVENTFD_FLAG_DEASSIGN,
  KVM_IOEVENTFD_FLAG_PIO,
  KVM_IRQFD_FLAG_DEASSIGN,
  KVM_IRQFD_FLAG_RESAMPLE,
  KVM_MEM_LOG_DIRTY_PAGES,
  KVM_PIT_SPEAKER_DUMMY,
  SIZEOF,
  decodeClock,
  encodeClock,
  encodeDirtyLog,
  encodeIoeventfd,
  encodeIrqLevel,
  encodeIrqRouting,
  encodeIrqfd,
  encodeMemoryRegion,
  encodeMsi,
  encodePitConfig,
  type GsiRoute,
} from "./kvm-abi.js";
import { ChunkedGuestMemory, type GuestMemory, type RamRange } from "../machine/guest-memory.js";
import type { DeviceMemoryRegion } from "./device-memory.js";
import { PartisError, type ErrorContext } from "../errors.js";

export type { GsiRoute } from "./kvm-abi.js";

const PAGE = 4096;

/** Conventional guest-physical spots for KVM's private pages on Intel hosts (as QEMU uses), below the BIOS. */
export const DEFAULT_TSS_GPA = 0xfffbd000;
export const DEFAULT_IDENTITY_MAP_GPA = 0xfffbc000;

/** An eventfd: its number, or an object that has one (e.g. EventFd). */
export type EventFdLike = number | { readonly fd: number };

function fdOf(e: EventFdLike): number {
  return typeof e === "number" ? e : e.fd;
}

export class PartitionConfigError extends PartisError {}

/** Huge-page sizes guest RAM can be backed with (PartitionOptions.hugePageBytes). */
export const HUGE_2M = 2 * 1024 * 1024;
export const HUGE_1G = 1024 * 1024 * 1024;

/** "4 KiB", "2 MiB", "1 GiB". */
function pageLabel(pageBytes: number): string {
  return pageBytes >= HUGE_1G ? `${pageBytes / HUGE_1G} GiB` : pageBytes >= 1 << 20 ? `${pageBytes >> 20} MiB` : `${pageBytes >> 10} KiB`;
}

function hugePagesUnavailable(cause: unknown, pageBytes: number, ramBytes: number, why: string): PartitionConfigError {
  const errnoName = cause instanceof SystemCallError ? cause.errnoName : String(cause);
  return new PartitionConfigError(
    "PARTITION_HUGEPAGES_UNAVAILABLE",
    `guest RAM needs ${ramBytes / pageBytes} huge pages of ${pageLabel(pageBytes)}: ${why} (${errnoName})`,
    { pageBytes, ramBytes, errno: errnoName },
    { cause },
  );
}

/** Everything another thread of this process needs to attach to the partition: plain numbers. */
export interface PartitionHandoff {
  readonly vmFd: number;
  readonly memfd: number;
  readonly ranges: readonly RamRange[];
  readonly vcpuMmapSize: number;
  /** Host address of the owner's mapping of each slot (range), for re-registering slots. */
  readonly slotAddresses: readonly number[];
  /** Slots whose dirty logging is on, at the time of the handoff. */
  readonly dirtyLogSlots: readonly number[];
  /** KVM_CAP_XSAVE2 size on this VM (0 when absent). */
  readonly xsaveSize: number;
}

/** An ioeventfd registration: KVM signals `eventfd` instead of exiting on a matching guest write. */
export interface IoEventFdSpec {
  readonly space: "pio" | "mmio";
  readonly addr: number | bigint;
  /** Access size that matches (1, 2, 4 or 8; 0 = any length, MMIO only, KVM_CAP_IOEVENTFD_ANY_LENGTH). */
  readonly length: number;
  /** Only writes of this value signal (when given). */
  readonly datamatch?: number | bigint;
  readonly eventfd: EventFdLike;
}

export interface PartitionOptions {
  readonly ranges: readonly RamRange[];
  /**
   * Back guest RAM with the host's reserved huge pages of this size (a
   * hugetlbfs memfd: 2 MiB or 1 GiB) instead of shmem. The pages are reserved
   * for the whole of RAM when the partition is created, so a pool too small
   * fails here (PARTITION_HUGEPAGES_UNAVAILABLE), never as a fault later; every
   * range must be aligned to the page size. Absent: shmem, with transparent
   * huge pages where the host allows them.
   */
  readonly hugePageBytes?: number;
}

interface Slot {
  readonly range: RamRange;
  /** Host address of the mapping registered with KVM. */
  readonly address: bigint;
  /** The owner's mapping (undefined in an attached partition, which does not own it). */
  readonly pointer: libc.CPointer | undefined;
  flags: number;
  bitmap: Uint8Array | undefined;
}

/** A device-memory slot (mapDeviceMemory): guest-physical span and the host mapping KVM uses. */
interface DeviceSlot {
  readonly gpa: number;
  readonly size: number;
  readonly address: bigint;
  /** The partition's own mapping of a {fd, offset, size} region (undefined when the caller lent a view). */
  readonly pointer: libc.CPointer | undefined;
  readonly flags: number;
  bitmap: Uint8Array | undefined;
}

export interface DeviceMemoryOptions {
  /** Track guest writes (KVM_MEM_LOG_DIRTY_PAGES), read with `deviceMemoryDirtyLog`. */
  readonly logDirty?: boolean;
}

function validateRanges(ranges: readonly RamRange[], pageBytes: number): number {
  if (ranges.length === 0) throw new PartitionConfigError("PARTITION_NO_RAM", "a partition needs at least one RAM range");
  let fileSize = 0;
  const sorted = [...ranges].sort((a, b) => a.gpa - b.gpa);
  for (let i = 0; i < sorted.length; i++) {
    const r = sorted[i]!;
    const ctx: ErrorContext = { gpa: BigInt(r.gpa), length: r.length, fileOffset: r.fileOffset, pageBytes };
    for (const v of [r.gpa, r.length, r.fileOffset])
      if (!Number.isSafeInteger(v) || v < 0 || v % pageBytes !== 0)
        throw new PartitionConfigError("PARTITION_RAM_ALIGNMENT", `RAM range fields must be non-negative integers aligned to the ${pageLabel(pageBytes)} page`, ctx);
    if (r.length === 0) throw new PartitionConfigError("PARTITION_RAM_EMPTY", "empty RAM range", ctx);
    const prev = sorted[i - 1];
    if (prev !== undefined && prev.gpa + prev.length > r.gpa)
      throw new PartitionConfigError("PARTITION_RAM_OVERLAP", "RAM ranges overlap in guest-physical space", ctx);
    fileSize = Math.max(fileSize, r.fileOffset + r.length);
  }
  const byFile = [...ranges].sort((a, b) => a.fileOffset - b.fileOffset);
  for (let i = 1; i < byFile.length; i++)
    if (byFile[i - 1]!.fileOffset + byFile[i - 1]!.length > byFile[i]!.fileOffset)
      throw new PartitionConfigError("PARTITION_RAM_OVERLAP", "RAM ranges overlap in the backing memfd", {
        fileOffset: byFile[i]!.fileOffset,
      });
  return fileSize;
}

export class Partition {
  private memory: GuestMemory | undefined;
  private readonly slots: Slot[];
  /** Mappings made for `guestMemory` by this thread, released by destroy(). */
  private readonly views: Uint8Array[] = [];
  /** Extra slots mapped by mapDeviceMemory, by slot number (all above the RAM slots). */
  private readonly deviceSlots = new Map<number, DeviceSlot>();
  private destroyed = false;

  private constructor(
    readonly vmFd: number,
    readonly memfd: number,
    readonly ranges: readonly RamRange[],
    readonly vcpuMmapSize: number,
    /** True for a Partition made by attach(): destroy() does not close the VM. */
    readonly attached: boolean,
    slots: Slot[],
    readonly xsaveSize: number,
  ) {
    this.slots = slots;
  }

  /**
   * Guest RAM as this thread sees it: the memfd mapped again, for this
   * thread's own use (loading the guest, device DMA). Mapped on first use, so
   * threads that never touch guest RAM themselves (vCPU threads: their exits
   * carry the data) add no mapping of it.
   */
  get guestMemory(): GuestMemory {
    this.assertLive();
    this.memory ??= new ChunkedGuestMemory(
      this.ranges,
      (fileOffset, length) => {
        const v = libc.mapSharedFile(this.memfd, fileOffset, length);
        this.views.push(v);
        return v;
      },
      undefined,
      (v) => Number(libc.addressOfView(v)),
    );
    return this.memory;
  }

  /**
   * Create a VM with the given RAM ranges: a memfd sized for all of them, one
   * MAP_SHARED mapping and one memory slot per range (slot i = ranges[i]).
   */
  static create(system: KvmSystem, opts: PartitionOptions): Partition {
    const ranges = opts.ranges.map((r) => ({ gpa: r.gpa, length: r.length, fileOffset: r.fileOffset }));
    const huge = opts.hugePageBytes;
    if (huge !== undefined && huge !== HUGE_2M && huge !== HUGE_1G)
      throw new PartitionConfigError("PARTITION_HUGEPAGE_SIZE", `huge pages of ${huge} bytes: only 2 MiB and 1 GiB pages back guest RAM`, { pageBytes: huge });
    const fileSize = validateRanges(ranges, huge ?? PAGE);
    const vmFd = kvmIoctl(system.fd, "CREATE_VM", 0);
    let memfd = -1;
    const slots: Slot[] = [];
    try {
      if (huge === undefined) memfd = libc.memfdCreate("partis-guest-ram");
      else {
        try {
          memfd = libc.memfdCreate("partis-guest-ram", libc.MFD_CLOEXEC | libc.MFD_HUGETLB | libc.mfdHugePageSize(huge));
        } catch (e) {
          const noPool = e instanceof SystemCallError && ["EINVAL", "ENODEV", "ENOENT"].includes(e.errnoName);
          if (!noPool) throw e;
          throw hugePagesUnavailable(e, huge, fileSize, "this kernel has no hugetlbfs pool of that page size");
        }
      }
      libc.ftruncate(memfd, fileSize);
      ranges.forEach((range, slot) => {
        // shmem: MAP_NORESERVE, pages come as the guest touches them. hugetlb: no
        // MAP_NORESERVE, so the mapping reserves the range's huge pages now; without
        // a reservation a pool that runs dry would SIGBUS the guest mid-run.
        const flags = huge === undefined ? libc.MAP_SHARED | libc.MAP_NORESERVE : libc.MAP_SHARED;
        let pointer: libc.CPointer;
        try {
          pointer = libc.mmap(range.length, libc.PROT_READ | libc.PROT_WRITE, flags, memfd, range.fileOffset, { slot });
        } catch (e) {
          if (huge === undefined) throw e;
          throw hugePagesUnavailable(e, huge, fileSize, "the host's pool has too few free huge pages (or a hugetlb cgroup limit refused them)");
        }
        // Transparent huge pages for shmem-backed RAM where the host allows them:
        // KVM then maps the guest with 2 MiB pages, far fewer faults while the guest
        // touches RAM. (hugetlb RAM is huge pages already.)
        if (huge === undefined) libc.adviseHugePages(pointer, range.length);
        const s: Slot = { range, address: libc.addressOf(pointer), pointer, flags: 0, bitmap: undefined };
        slots.push(s);
        kvmIoctl(vmFd, "SET_USER_MEMORY_REGION", Partition.regionBytes(slot, s), { vm: vmFd, slot, gpa: BigInt(range.gpa) });
      });
      let xsaveSize = 0;
      try {
        xsaveSize = kvmIoctl(vmFd, "CHECK_EXTENSION", KVM_CAP.XSAVE2);
      } catch {
        xsaveSize = 0;
      }
      return new Partition(vmFd, memfd, ranges, system.vcpuMmapSize, false, slots, xsaveSize);
    } catch (e) {
      for (const s of slots) if (s.pointer !== undefined) libc.munmap(s.pointer, s.range.length);
      if (memfd >= 0) libc.close(memfd);
      libc.close(vmFd);
      throw e;
    }
  }

  /** Attach to a partition created by another thread of this process. */
  static attach(h: PartitionHandoff): Partition {
    if (h.slotAddresses.length !== h.ranges.length) throw new KvmProtocolError("PARTITION_HANDOFF", "handoff: one slot address per range expected");
    const slots: Slot[] = h.ranges.map((range, i) => ({
      range,
      address: BigInt(h.slotAddresses[i]!),
      pointer: undefined,
      flags: h.dirtyLogSlots.includes(i) ? KVM_MEM_LOG_DIRTY_PAGES : 0,
      bitmap: undefined,
    }));
    return new Partition(h.vmFd, h.memfd, h.ranges, h.vcpuMmapSize, true, slots, h.xsaveSize);
  }

  /** Plain data for `Partition.attach` on another worker_thread (structured-clone safe). */
  handoff(): PartitionHandoff {
    this.assertLive();
    return {
      vmFd: this.vmFd,
      memfd: this.memfd,
      ranges: this.ranges.map((r) => ({ ...r })),
      vcpuMmapSize: this.vcpuMmapSize,
      slotAddresses: this.slots.map((s) => Number(s.address)),
      dirtyLogSlots: this.slots.flatMap((s, i) => ((s.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0 ? [i] : [])),
      xsaveSize: this.xsaveSize,
    };
  }

  private static regionBytes(slot: number, s: Slot): Uint8Array {
    return encodeMemoryRegion({
      slot,
      flags: s.flags,
      guestPhysAddr: BigInt(s.range.gpa),
      memorySize: BigInt(s.range.length),
      userspaceAddr: s.address,
    });
  }

  private ioctl(name: Parameters<typeof kvmIoctl>[1], arg: ArrayBufferView | number | bigint | null, context: ErrorContext = {}): number {
    this.assertLive();
    return kvmIoctl(this.vmFd, name, arg, { vm: this.vmFd, ...context });
  }

  private assertLive(): void {
    if (this.destroyed) throw new KvmProtocolError("PARTITION_DESTROYED", "partition already destroyed", { vm: this.vmFd });
  }

  /** KVM_CHECK_EXTENSION on the VM fd (some capabilities answer per VM). */
  checkExtension(cap: number): number {
    return this.ioctl("CHECK_EXTENSION", cap, { cap });
  }

  /** In-kernel PIC ×2 + IOAPIC + per-vCPU local APICs. Call before creating vCPUs. */
  createIrqchip(): void {
    this.ioctl("CREATE_IRQCHIP", 0);
  }

  /** In-kernel i8254 PIT (needs the irqchip). The speaker port is left to user space. */
  createPit2(flags = KVM_PIT_SPEAKER_DUMMY): void {
    this.ioctl("CREATE_PIT2", encodePitConfig(flags));
  }

  /**
   * Three pages of guest-physical space KVM may use for the real-mode TSS.
   * Needed on Intel (VT-x) hosts before the first run; harmless elsewhere
   * (AMD and PVM accept it). Usually DEFAULT_TSS_GPA.
   */
  setTssAddr(gpa: number): void {
    this.ioctl("SET_TSS_ADDR", gpa, { gpa: BigInt(gpa) });
  }

  /** One page for the identity-map page table KVM uses for unpaged guests (Intel hosts without unrestricted guest). */
  setIdentityMapAddr(gpa: number | bigint): void {
    const arg = new BigUint64Array([BigInt(gpa)]);
    this.ioctl("SET_IDENTITY_MAP_ADDR", arg, { gpa: BigInt(gpa) });
  }

  /** Replace the whole GSI routing table. */
  setGsiRouting(routes: readonly GsiRoute[]): void {
    this.ioctl("SET_GSI_ROUTING", encodeIrqRouting(routes), { routes: routes.length });
  }

  /** KVM_IRQ_LINE: drive a GSI input of the in-kernel irqchip. */
  setIrqLine(gsi: number, level: boolean): void {
    this.ioctl("IRQ_LINE", encodeIrqLevel(gsi, level ? 1 : 0), { gsi });
  }

  /**
   * KVM_SIGNAL_MSI. Returns > 0 when delivered, 0 when the guest blocked it.
   */
  signalMsi(address: number | bigint, data: number): number {
    const a = BigInt(address);
    return this.ioctl("SIGNAL_MSI", encodeMsi(Number(a & 0xffffffffn), Number(a >> 32n), data), { address: a, data });
  }

  /**
   * Writing to `eventfd` raises `gsi`. With `resampleFd`, the GSI is level-
   * triggered: KVM deasserts it at EOI and signals `resampleFd` so the device
   * can re-assert if still pending.
   */
  irqfd(gsi: number, eventfd: EventFdLike, resampleFd?: EventFdLike): void {
    const fd = fdOf(eventfd);
    const flags = resampleFd === undefined ? 0 : KVM_IRQFD_FLAG_RESAMPLE;
    this.ioctl("IRQFD", encodeIrqfd(fd, gsi, flags, resampleFd === undefined ? 0 : fdOf(resampleFd)), { gsi, eventfd: fd });
  }

  removeIrqfd(gsi: number, eventfd: EventFdLike): void {
    const fd = fdOf(eventfd);
    this.ioctl("IRQFD", encodeIrqfd(fd, gsi, KVM_IRQFD_FLAG_DEASSIGN), { gsi, eventfd: fd });
  }

  private ioeventfdBytes(spec: IoEventFdSpec, deassign: boolean): Uint8Array {
    let flags = spec.space === "pio" ? KVM_IOEVENTFD_FLAG_PIO : 0;
    if (spec.datamatch !== undefined) flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
    if (deassign) flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
    return encodeIoeventfd(BigInt(spec.datamatch ?? 0), BigInt(spec.addr), spec.length, fdOf(spec.eventfd), flags);
  }

  /** Register an ioeventfd: guest writes matching `spec` signal the eventfd in the kernel, without an exit. */
  ioeventfd(spec: IoEventFdSpec): void {
    this.ioctl("IOEVENTFD", this.ioeventfdBytes(spec, false), { space: spec.space, addr: BigInt(spec.addr), length: spec.length });
  }

  /** Remove a registration made by `ioeventfd` (same spec). */
  removeIoeventfd(spec: IoEventFdSpec): void {
    this.ioctl("IOEVENTFD", this.ioeventfdBytes(spec, true), { space: spec.space, addr: BigInt(spec.addr), length: spec.length });
  }

  private slot(slot: number): Slot {
    const s = this.slots[slot];
    if (s === undefined) throw new PartitionConfigError("PARTITION_NO_SLOT", `no memory slot ${slot}`, { vm: this.vmFd, slot });
    return s;
  }

  /** Turn dirty-page logging of a slot on (or off). */
  enableDirtyLog(slot: number, on = true): void {
    const s = this.slot(slot);
    const flags = on ? s.flags | KVM_MEM_LOG_DIRTY_PAGES : s.flags & ~KVM_MEM_LOG_DIRTY_PAGES;
    const before = s.flags;
    s.flags = flags;
    try {
      this.ioctl("SET_USER_MEMORY_REGION", Partition.regionBytes(slot, s), { slot });
    } catch (e) {
      s.flags = before;
      throw e;
    }
  }

  /**
   * KVM_GET_DIRTY_LOG: bitmap of the slot's pages written by the guest since
   * the last call (bit i of byte j = page j*8+i of the range), which KVM then
   * clears. Returns a fresh copy. Writes by the host through guestMemory are
   * not tracked.
   */
  dirtyLog(slot: number): Uint8Array {
    const s = this.slot(slot);
    const pages = s.range.length / PAGE;
    const bytes = Math.ceil(pages / 64) * 8;
    if (s.bitmap === undefined) s.bitmap = libc.alignedBuffer(bytes, 8);
    s.bitmap.fill(0);
    this.ioctl("GET_DIRTY_LOG", encodeDirtyLog(slot, libc.addressOfView(s.bitmap)), { slot });
    return s.bitmap.slice(0, Math.ceil(pages / 8));
  }

  /** kvmclock in ns (KVM_GET_CLOCK), for saved state. */
  getClock(): { clock: bigint; flags: number } {
    const buf = new Uint8Array(SIZEOF.kvm_clock_data);
    this.ioctl("GET_CLOCK", buf);
    return decodeClock(buf);
  }

  setClock(clock: bigint): void {
    this.ioctl("SET_CLOCK", encodeClock(clock));
  }

  /**
   * Release this thread's mappings. The owner also closes the VM and the memfd
   * (after every vCPU and attached partition is gone). Views from guestMemory
   * must not be used afterwards.
   */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const v of this.views) libc.releaseMapping(v);
    this.views.length = 0;
    for (const s of this.slots) {
      if (s.bitmap !== undefined) libc.releaseMapping(s.bitmap);
      s.bitmap = undefined;
    }
    if (this.attached) return;
    libc.close(this.vmFd);
    this.releaseDeviceSlots();
    for (const s of this.slots) if (s.pointer !== undefined) libc.munmap(s.pointer, s.range.length);
    libc.close(this.memfd);
  }

  get isDestroyed(): boolean {
    return this.destroyed;
  }

  // --- device memory ------------------------------------------------------------------------

  /**
   * Map host memory into the guest at `gpa` as an extra memory slot (numbered
   * above the RAM slots): guest accesses go straight to the host pages, without
   * exits. `memory` is either a region of a file (`DeviceMemory`, or any
   * {fd, offset, size}; the partition maps it itself and unmaps it on
   * unmapDeviceMemory/destroy) or a page-aligned view made by src/hypervisor/libc
   * (`mapSharedFile`, `alignedBuffer`), which the caller keeps mapped until the
   * slot is unmapped. Only the partition's creating thread may map device memory.
   * Returns the slot number.
   */
  mapDeviceMemory(gpa: number, memory: Uint8Array | DeviceMemoryRegion, options: DeviceMemoryOptions = {}): number {
    this.assertLive();
    if (this.attached)
      throw new PartitionConfigError("PARTITION_ATTACHED", "device memory is mapped by the thread that created the partition", { vm: this.vmFd });
    const size = memory instanceof Uint8Array ? memory.byteLength : memory.size;
    const ctx: ErrorContext = { vm: this.vmFd, gpa: Number.isSafeInteger(gpa) ? BigInt(gpa) : String(gpa), size };
    if (!Number.isSafeInteger(gpa) || gpa < 0 || gpa % PAGE !== 0 || !Number.isSafeInteger(size) || size <= 0 || size % PAGE !== 0)
      throw new PartitionConfigError("PARTITION_DEVICE_MEMORY_ALIGNMENT", "device memory needs a page-aligned guest address and a positive page-multiple size", ctx);
    const overlaps = (start: number, length: number): boolean => gpa < start + length && start < gpa + size;
    for (const r of this.ranges)
      if (overlaps(r.gpa, r.length)) throw new PartitionConfigError("PARTITION_DEVICE_MEMORY_OVERLAP", "device memory overlaps guest RAM", ctx);
    for (const d of this.deviceSlots.values())
      if (overlaps(d.gpa, d.size)) throw new PartitionConfigError("PARTITION_DEVICE_MEMORY_OVERLAP", "device memory overlaps other device memory", ctx);

    let address: bigint;
    let pointer: libc.CPointer | undefined;
    if (memory instanceof Uint8Array) {
      try {
        address = libc.addressOfView(memory);
      } catch {
        throw new PartitionConfigError("PARTITION_DEVICE_MEMORY_VIEW", "device memory view was not made by src/hypervisor/libc (no host address)", ctx);
      }
      if (address % BigInt(PAGE) !== 0n)
        throw new PartitionConfigError("PARTITION_DEVICE_MEMORY_ALIGNMENT", "device memory view does not start on a page boundary", ctx);
    } else {
      if (!Number.isSafeInteger(memory.offset) || memory.offset < 0 || memory.offset % PAGE !== 0)
        throw new PartitionConfigError("PARTITION_DEVICE_MEMORY_ALIGNMENT", "device memory file offset must be page-aligned", { ...ctx, fileOffset: memory.offset });
      pointer = libc.mmap(size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, memory.fd, memory.offset, { gpa: BigInt(gpa) });
      address = libc.addressOf(pointer);
    }

    let slot = this.slots.length;
    while (this.deviceSlots.has(slot)) slot++;
    const flags = options.logDirty === true ? KVM_MEM_LOG_DIRTY_PAGES : 0;
    try {
      this.ioctl(
        "SET_USER_MEMORY_REGION",
        encodeMemoryRegion({ slot, flags, guestPhysAddr: BigInt(gpa), memorySize: BigInt(size), userspaceAddr: address }),
        { slot, gpa: BigInt(gpa) },
      );
    } catch (e) {
      if (pointer !== undefined) libc.munmap(pointer, size);
      throw e;
    }
    this.deviceSlots.set(slot, { gpa, size, address, pointer, flags, bitmap: undefined });
    return slot;
  }

  /** Remove a slot made by mapDeviceMemory: the guest range becomes unbacked (MMIO exits) again. */
  unmapDeviceMemory(slot: number): void {
    const d = this.deviceSlot(slot);
    this.ioctl(
      "SET_USER_MEMORY_REGION",
      encodeMemoryRegion({ slot, flags: 0, guestPhysAddr: BigInt(d.gpa), memorySize: 0n, userspaceAddr: d.address }),
      { slot, gpa: BigInt(d.gpa) },
    );
    this.deviceSlots.delete(slot);
    if (d.pointer !== undefined) libc.munmap(d.pointer, d.size);
    if (d.bitmap !== undefined) libc.releaseMapping(d.bitmap);
  }

  /** The device-memory slots mapped now: slot number, guest-physical address and size. */
  deviceMemorySlots(): { slot: number; gpa: number; size: number }[] {
    return [...this.deviceSlots].map(([slot, d]) => ({ slot, gpa: d.gpa, size: d.size }));
  }

  /**
   * KVM_GET_DIRTY_LOG of a device-memory slot mapped with `logDirty`: one bit
   * per page the guest wrote since the last call (bit i of byte j = page j*8+i).
   * Returns a fresh copy.
   */
  deviceMemoryDirtyLog(slot: number): Uint8Array {
    const d = this.deviceSlot(slot);
    if ((d.flags & KVM_MEM_LOG_DIRTY_PAGES) === 0)
      throw new PartitionConfigError("PARTITION_NO_DIRTY_LOG", `device memory slot ${slot} was mapped without logDirty`, { vm: this.vmFd, slot });
    const pages = d.size / PAGE;
    if (d.bitmap === undefined) d.bitmap = libc.alignedBuffer(Math.ceil(pages / 64) * 8, 8);
    d.bitmap.fill(0);
    this.ioctl("GET_DIRTY_LOG", encodeDirtyLog(slot, libc.addressOfView(d.bitmap)), { slot });
    return d.bitmap.slice(0, Math.ceil(pages / 8));
  }

  private deviceSlot(slot: number): DeviceSlot {
    this.assertLive();
    const d = this.deviceSlots.get(slot);
    if (d === undefined) throw new PartitionConfigError("PARTITION_NO_SLOT", `no device memory slot ${slot}`, { vm: this.vmFd, slot });
    return d;
  }

  /** After the VM is closed: drop the partition's own device-memory mappings. */
  private releaseDeviceSlots(): void {
    for (const d of this.deviceSlots.values()) {
      if (d.pointer !== undefined) libc.munmap(d.pointer, d.size);
      if (d.bitmap !== undefined) libc.releaseMapping(d.bitmap);
    }
    this.deviceSlots.clear();
  }
}
