/**
 * The vCPU-thread side of the device thread: config accesses to device
 * functions, accesses to ports the device thread decodes, and MMIO exits that
 * no platform device claims are posted to the mailbox, and the vCPU waits for
 * the answer (see device-mailbox.ts); a 1-byte port read whose value the
 * owning device has published (the port read shadow) is answered here, and a
 * single port write to a device that takes posted writes is queued without
 * waiting.
 */
import type { PciFunction } from "../machine/pci-host-bridge.js";
import { MAILBOX_OP, getLe, putLe, type MailboxRequester } from "./device-mailbox.js";

/** Port ranges the device thread may decode: PCI I/O BARs and IDE compatibility ports. */
export interface ForwardedPorts {
  readonly ranges: readonly (readonly [start: number, length: number])[];
}

/** The I/O window PCI I/O BARs are assigned from (and Linux reassigns within). */
export const PCI_IO_WINDOW = { start: 0x1000, end: 0x10000 } as const;
export const IDE_COMPAT_PORTS: readonly (readonly [number, number])[] = [
  [0x1f0, 8],
  [0x3f6, 1],
  [0x170, 8],
  [0x376, 1],
];

export class DeviceForwarder {
  private readonly portMap = new Uint8Array(0x10000);
  /** Port reads answered from the shadow the devices publish, with no round trip. */
  shadowedReads = 0;
  /** Port writes queued for the device thread without waiting (posted writes). */
  postedWrites = 0;

  constructor(private readonly requester: MailboxRequester, ports: ForwardedPorts) {
    for (const [start, length] of ports.ranges) this.portMap.fill(1, start, Math.min(0x10000, start + length));
  }

  forwardsPort(port: number): boolean {
    return this.portMap[port] === 1;
  }

  /**
   * A port I/O exit, string I/O included, as one request. `data` is the exit's
   * data area (count * size bytes); reads land there.
   */
  portIo(write: boolean, port: number, size: number, count: number, data: Uint8Array): void {
    if (!write && size === 1 && count === 1) {
      const v = this.requester.shadowRead(port);
      if (v >= 0) {
        data[0] = v;
        this.shadowedReads++;
        return;
      }
    }
    if (write && count === 1 && this.requester.postsWrites(port) && this.requester.postWrite(port, size, getLe(data, 0, size))) {
      this.postedWrites++;
      return;
    }
    const box = this.requester.data;
    const bytes = size * count;
    if (write) box.set(data.subarray(0, bytes));
    const ok = this.requester.call(write ? MAILBOX_OP.pioWrite : MAILBOX_OP.pioRead, port, size, count);
    if (!write) {
      if (ok) data.set(box.subarray(0, bytes));
      else data.fill(0xff, 0, bytes);
    }
  }

  /** An MMIO exit: 1, 2, 4 or 8 bytes in `data`. */
  mmio(write: boolean, gpa: number, data: Uint8Array): void {
    const box = this.requester.data;
    if (write) box.set(data);
    const ok = this.requester.call(write ? MAILBOX_OP.mmioWrite : MAILBOX_OP.mmioRead, gpa, data.length, 1);
    if (!write) {
      if (ok) data.set(box.subarray(0, data.length));
      else data.fill(0xff);
    }
  }

  /** A PCI function whose configuration space lives on the device thread. */
  configFunction(bdf: number): PciFunction {
    const r = this.requester;
    return {
      configRead(offset, size) {
        if (!r.call(MAILBOX_OP.configRead, bdf * 256 + offset, size, 1)) return size === 4 ? 0xffff_ffff : size === 2 ? 0xffff : 0xff;
        return getLe(r.data, 0, size);
      },
      configWrite(offset, size, value) {
        putLe(r.data, 0, size, value);
        r.call(MAILBOX_OP.configWrite, bdf * 256 + offset, size, 1);
      },
    };
  }
}
