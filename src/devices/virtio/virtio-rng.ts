/**
 * virtio-rng, the entropy device (virtio 1.1 spec 5.4): one request queue;
 * the driver posts device-writable buffers and the device fills them with
 * random bytes. Given an entropy source that fills host memory (the worker
 * passes a HostEntropy: one readv(2) of /dev/urandom) and host-mapped guest
 * RAM, a request's buffers are filled in place (no view, no copy, nothing
 * allocated); otherwise, or if that read fails (noted once in `notes`),
 * node:crypto randomFillSync fills views. Either way every request completes.
 * No features, no configuration space.
 *
 * DEVNOTE: at most MAX_FILL bytes of one request are filled (the used length
 * says how many, 5.4.6): a guest cannot make the device thread spend long on
 * one huge buffer. Linux asks for at most 64 bytes at a time.
 *
 * API: createVirtioRng(name, services, { entropy? }): VirtioPciDevice (back end: VirtioRng)
 */
import { randomFillSync } from "node:crypto";
import type { SavedDeviceState } from "../dependencies.js";
import type { PciDeviceServices } from "../pci/device-thread-services.js";
import { ChainSpans, DescriptorChain } from "./queue.js";
import { VirtioPciDevice, type VirtioBackend, type VirtioTransport } from "./pci-transport.js";

export const VIRTIO_ID_ENTROPY = 4;
const MAX_FILL = 64 * 1024;
/** Most buffers of one request filled in place in one read; the rest of a longer chain stays unfilled. */
const HOST_SPANS = 64;

/** Fills spans of host memory with random bytes (HostEntropy in the worker). */
export interface EntropySource {
  fillHost(addresses: Float64Array, lengths: Uint32Array, count: number): number;
}

export interface VirtioRngOptions {
  readonly entropy?: EntropySource;
}

export class VirtioRng implements VirtioBackend {
  readonly deviceId = VIRTIO_ID_ENTROPY;
  readonly classCode = 0xff0000; // unclassified device
  readonly features = 0n;
  readonly queueMaxSizes = [64];
  readonly configSize = 0;
  /** Random bytes handed out. */
  bytesServed = 0;
  /** Of bytesServed: read by the host kernel straight into guest RAM (HostEntropy). */
  bytesInPlace = 0;
  /** Why the in-place path was given up, if it was. */
  readonly notes: string[] = [];
  private entropy: EntropySource | undefined;

  constructor(opts: VirtioRngOptions = {}) {
    this.entropy = opts.entropy;
  }
  private transport: VirtioTransport | undefined;
  private readonly chain = new DescriptorChain();
  private readonly spans = new ChainSpans(HOST_SPANS);

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
        let filled = this.fillInPlace(c);
        if (filled < 0) {
          filled = 0;
          for (let i = 0; i < c.writableCount && filled < MAX_FILL; i++) {
            const s = c.writableSegment(i);
            const n = Math.min(s.length, MAX_FILL - filled);
            randomFillSync(s, 0, n);
            filled += n;
          }
        }
        this.bytesServed += filled;
        q.pushUsed(c.head, filled);
      }
    } while (!q.enableNotifications());
    t.signalUsed(index);
  }

  /**
   * Fill the chain's buffers (up to MAX_FILL bytes, HOST_SPANS buffers) from
   * /dev/urandom with one readv straight into guest RAM: the bytes filled, or
   * -1 when guest RAM is not host-mapped (the caller fills views instead).
   */
  private fillInPlace(c: DescriptorChain): number {
    const entropy = this.entropy;
    const spans = this.spans;
    if (entropy === undefined || c.memory?.hostAddresses === undefined) return -1;
    spans.select(c, true, 0, MAX_FILL); // a chain of more than HOST_SPANS buffers: the first ones
    if (spans.count === 0) return 0;
    if (!spans.toHost(c.memory)) return -1;
    let n: number;
    try {
      n = entropy.fillHost(spans.host, spans.len, spans.count);
    } catch (e) {
      // A failed read must not leave the guest's request pending: fill views from now on.
      this.entropy = undefined;
      this.notes.push(`reading host entropy into guest RAM failed (${(e as Error).message}); filling through views`);
      return -1;
    }
    this.bytesInPlace += n;
    return n;
  }

  save(): SavedDeviceState & { bytesServed: number } {
    return { kind: "virtio-rng", version: 1, bytesServed: this.bytesServed };
  }
}

/** A virtio-rng PCI function. */
export function createVirtioRng(name: string, services: PciDeviceServices, opts: VirtioRngOptions = {}): VirtioPciDevice {
  return new VirtioPciDevice(name, new VirtioRng(opts), services);
}
