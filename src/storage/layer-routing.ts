/**
 * Where a guest-RAM transfer on one layer of an image format (VHD, VHDX)
 * goes: straight to the layer's own file when the format maps the range to
 * one extent of it (`payloadAt`), for a read to the parent when the parent
 * holds all of it and this layer none (`parentHolding`), else nowhere: the
 * BlockDevice answer "false, nothing done", and the caller takes the format's
 * block-by-block path. The format checks the range (and read-only, and for
 * VHDX starts the session's change) before it asks; this is the routing
 * both formats share. Nothing here allocates (it runs per disk request).
 */
import type { BlockDevice, HostIoQueue } from "./block-device.js";
import type { RawDisk } from "./raw.js";

export class LayerRouting {
  constructor(
    /** The layer's file as raw bytes (RawDisk.payloadOf); undefined: no straight path (a VHDX whose log replay lives in memory). */
    private readonly payload: RawDisk | undefined,
    /** The file offset holding all of [offset, offset+length) as one extent of this layer's data, or -1. */
    private readonly payloadAt: (offset: number, length: number) => number,
    /** The parent, when it holds all of [offset, offset+length) and this layer none of it. */
    private readonly parentHolding: (offset: number, length: number) => BlockDevice | undefined,
    /** Called before a write goes straight to the file (VHDX: the session's first change renews the header GUIDs). */
    private readonly beforeWrite: () => void = () => undefined,
  ) {}

  private fileOffset(offset: number, length: number): number {
    return this.payload === undefined ? -1 : this.payloadAt(offset, length);
  }

  readHost(offset: number, length: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    if (length === 0) return true;
    const at = this.fileOffset(offset, length);
    if (at >= 0) return this.payload!.readHost(at, addresses, lengths, count);
    const below = this.parentHolding(offset, length);
    return below?.readHost !== undefined && below.readHost(offset, addresses, lengths, count);
  }

  writeHost(offset: number, length: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
    if (length === 0) return true;
    const at = this.fileOffset(offset, length);
    if (at < 0) return false;
    this.beforeWrite();
    return this.payload!.writeHost(at, addresses, lengths, count);
  }

  queueHost(queue: HostIoQueue, write: boolean, offset: number, length: number, addresses: Float64Array, lengths: Uint32Array, count: number, token: number): "done" | "queued" | false {
    if (length === 0) return false;
    const at = this.fileOffset(offset, length);
    if (at >= 0) {
      if (write) this.beforeWrite();
      return this.payload!.queueHost(queue, write, at, addresses, lengths, count, token);
    }
    if (write) return false;
    const below = this.parentHolding(offset, length);
    return below?.queueHost !== undefined ? below.queueHost(queue, false, offset, addresses, lengths, count, token) : false;
  }

  /** An fsync of the layer's file on the queue (the format first makes sure no metadata is pending). */
  queueFlush(queue: HostIoQueue, token: number): boolean {
    return this.payload?.queueFlush(queue, token) ?? false;
  }

  close(): void {
    this.payload?.close();
  }
}
