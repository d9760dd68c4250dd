/** A console port's host stream held in arrays: what the device reads, what it wrote, a hang-up, short writes. */
import type { HostByteStream } from "../../../src/devices/virtio/virtio-console.js";

export class FakeByteStream implements HostByteStream {
  input: number[] = [];
  output: number[] = [];
  closed = false;
  /** Most bytes one write() takes. */
  writeLimit = Infinity;
  reads = 0;
  constructor(readonly fd = 42) {}
  read(buf: Uint8Array): number {
    this.reads++;
    if (this.input.length === 0) return this.closed ? -1 : 0;
    const n = Math.min(buf.length, this.input.length);
    buf.set(this.input.splice(0, n));
    return n;
  }
  write(bytes: Uint8Array): number {
    if (this.closed) return -1;
    const n = Math.min(bytes.length, this.writeLimit);
    for (let i = 0; i < n; i++) this.output.push(bytes[i]!);
    return n;
  }
  text(): string {
    return String.fromCharCode(...this.output);
  }
}
