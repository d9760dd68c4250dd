/**
 * Device memory: host memory that a device shares with the guest by mapping it
 * as an extra KVM memory slot (a linear framebuffer; later a ROM or a
 * shared-memory BAR). The guest reads and writes it without VM exits; the host
 * reads it through `bytes`.
 *
 * Each region is its own memfd, mapped MAP_SHARED, so another thread (a VNC or
 * web console) can map the same pages with `DeviceMemory.attach(handoff())`,
 * and `Partition.mapDeviceMemory(gpa, region)` registers it with KVM.
 */
import * as libc from "./libc.js";
import { PartisError } from "../errors.js";

export class DeviceMemoryError extends PartisError {}

const PAGE = 4096;

/** A page-aligned span of a file that can back a KVM memory slot. */
export interface DeviceMemoryRegion {
  readonly fd: number;
  /** Offset in the file (page-aligned). */
  readonly offset: number;
  /** Bytes (a positive multiple of the page size). */
  readonly size: number;
}

/** Plain data for `DeviceMemory.attach` on another thread of this process. */
export interface DeviceMemoryHandoff {
  readonly fd: number;
  readonly size: number;
}

export class DeviceMemory implements DeviceMemoryRegion {
  readonly offset = 0;
  private closed = false;

  private constructor(
    readonly fd: number,
    readonly size: number,
    /** Live view of the whole region (this thread's mapping). */
    readonly bytes: Uint8Array,
    /** The creating object closes the memfd; attached ones only unmap. */
    private readonly owner: boolean,
  ) {}

  /** A zero-filled memfd of `size` bytes (page multiple), mapped read/write. */
  static create(name: string, size: number): DeviceMemory {
    if (!Number.isSafeInteger(size) || size <= 0 || size % PAGE !== 0)
      throw new DeviceMemoryError("DEVICE_MEMORY_SIZE", `device memory "${name}" must be a positive multiple of ${PAGE} bytes, not ${size}`, {
        name,
        size,
      });
    const fd = libc.memfdCreate(`partis-${name}`);
    try {
      libc.ftruncate(fd, size);
      return new DeviceMemory(fd, size, libc.mapSharedFile(fd, 0, size), true);
    } catch (e) {
      libc.close(fd);
      throw e;
    }
  }

  /** Map a region created by another thread of this process (same pages). */
  static attach(h: DeviceMemoryHandoff): DeviceMemory {
    if (!Number.isSafeInteger(h.size) || h.size <= 0 || h.size % PAGE !== 0)
      throw new DeviceMemoryError("DEVICE_MEMORY_SIZE", `device memory handoff has a bad size ${h.size}`, { size: h.size });
    return new DeviceMemory(h.fd, h.size, libc.mapSharedFile(h.fd, 0, h.size), false);
  }

  handoff(): DeviceMemoryHandoff {
    return { fd: this.fd, size: this.size };
  }

  /**
   * Unmap this thread's view (and close the memfd when this object created it).
   * A KVM slot made from the region keeps its own mapping until unmapped there.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    libc.releaseMapping(this.bytes);
    if (this.owner) libc.close(this.fd);
  }

  get isClosed(): boolean {
    return this.closed;
  }
}
