/** An in-memory BlockDevice for virtio-blk tests (with optional injected failures and call counts). */
import { DiskError, type AllocationExtent, type BlockDevice } from "../../../src/storage/block-device.js";

export class MemDisk implements BlockDevice {
  readonly path = "mem";
  readonly format = "raw" as const;
  readonly type = "raw" as const;
  readonly parent = undefined;
  readonly data: Uint8Array;
  flushes = 0;
  discards: [number, number][] = [];
  reads = 0;
  writes = 0;
  /** Throw a DiskError on the next read/write when set. */
  failNext = false;
  constructor(
    readonly size: number,
    readonly readOnly = false,
    readonly logicalSectorSize = 512,
    readonly physicalSectorSize = 4096,
  ) {
    this.data = new Uint8Array(size);
  }
  private check(offset: number, length: number): void {
    if (this.failNext) {
      this.failNext = false;
      throw new DiskError("DISK_IO", "injected failure", this.path, { offset });
    }
    if (offset < 0 || offset + length > this.size) throw new DiskError("DISK_RANGE", "out of range", this.path, { offset, length });
  }
  read(offset: number, buf: Uint8Array): void {
    this.check(offset, buf.length);
    this.reads++;
    buf.set(this.data.subarray(offset, offset + buf.length));
  }
  write(offset: number, buf: Uint8Array): void {
    if (this.readOnly) throw new DiskError("DISK_READ_ONLY", "read-only", this.path);
    this.check(offset, buf.length);
    this.writes++;
    this.data.set(buf, offset);
  }
  flush(): void {
    this.flushes++;
  }
  discard(offset: number, length: number): void {
    this.check(offset, length);
    this.discards.push([offset, length]);
    this.data.fill(0, offset, offset + length);
  }
  allocation(offset: number, length: number): AllocationExtent[] {
    return [{ offset, length, state: "allocated" }];
  }
  close(): void {}
}
