/**
 * virtio-rng, the entropy device (virtio 1.1 spec 5.4): one request queue;
 * the driver posts device-writable buffers and the device fills them with
 * random bytes (node:crypto randomFillSync, straight into the guest's views).
 * No features, no configuration space.
 *
 * DEVNOTE: at most MAX_FILL bytes of one request are filled (the used length
 * says how many, 5.4.6): a guest cannot make the device thread spend long on
 * one huge buffer. Linux asks for at most 64 bytes at a time.
 *
 * API: createVirtioRng(name, services): VirtioPciDevice (back end: VirtioRng)
 */
import { randomFillSync } from "node:crypto";
import type { SavedDeviceState } from "../dependencies.js";
import type { PciDeviceServices } from "../pci/device-thread-services.js";
import { DescriptorChain } from "./queue.js";
import { VirtioPciDevice, type VirtioBackend, type VirtioTransport } from "./pci-transport.js";

export const VIRTIO_ID_ENTROPY = 4;
const MAX_FILL = 64 * 1024;

export class VirtioRng implements VirtioBackend {
  readonly deviceId = VIRTIO_ID_ENTROPY;
  readonly classCode = 0xff0000; // unclassified device
  readonly features = 0n;
  readonly queueMaxSizes = [64];
  readonly configSize = 0;
  /** Random bytes handed out. */
  bytesServed = 0;
  private transport: VirtioTransport | undefined;
  private readonly chain = new DescriptorChain();

  attach(transport: VirtioTransport): void {
    this.transport = transport;
  }
  readConfig(): number {
    return 0;
  }
  writeConfig(): void {}
  activate(): void {}
  reset(): void {}

  queueNotified(index: number): void {
    const t = this.transport!;
    const q = t.queues[index]!;
    const c = this.chain;
    do {
      q.disableNotifications();
      while (q.pop(c)) {
        let filled = 0;
        for (let i = 0; i < c.writableCount && filled < MAX_FILL; i++) {
          const s = c.writableSegment(i);
          const n = Math.min(s.length, MAX_FILL - filled);
          randomFillSync(s, 0, n);
          filled += n;
        }
        this.bytesServed += filled;
        q.pushUsed(c.head, filled);
      }
    } while (!q.enableNotifications());
    t.signalUsed(index);
  }

  save(): SavedDeviceState & { bytesServed: number } {
    return { kind: "virtio-rng", version: 1, bytesServed: this.bytesServed };
  }
}

/** A virtio-rng PCI function. */
export function createVirtioRng(name: string, services: PciDeviceServices): VirtioPciDevice {
  return new VirtioPciDevice(name, new VirtioRng(), services);
}
