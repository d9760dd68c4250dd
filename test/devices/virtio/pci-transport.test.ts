import { test } from "node:test";
import assert from "node:assert/strict";
import { DescriptorChain, type VirtQueue } from "../../../src/devices/virtio/queue.js";
import {
  VIRTIO_BAR0,
  VIRTIO_COMMON as C,
  VIRTIO_F,
  VIRTIO_MSI_NO_VECTOR,
  VIRTIO_STATUS as S,
  VirtioPciDevice,
  featureBit,
  type VirtioBackend,
  type VirtioTransport,
} from "../../../src/devices/virtio/pci-transport.js";
import { PCI_CAP_ID } from "../../../src/devices/pci/pci-config.js";
import { BAR0, TestVirtioDriver, makeServices, placeDevice } from "./virtio-driver.js";

/** Copies each chain's readable bytes into its writable bytes (a loopback device). */
class EchoBackend implements VirtioBackend {
  readonly deviceId = 0x1f;
  readonly classCode = 0xff0000;
  readonly features = featureBit(5);
  readonly queueMaxSizes = [16, 16];
  readonly configSize = 8;
  readonly config = new Uint8Array(8);
  t!: VirtioTransport;
  activations = 0;
  resets = 0;
  notified: number[] = [];
  private readonly chain = new DescriptorChain();
  private readonly scratch = new Uint8Array(4096);
  attach(t: VirtioTransport): void {
    this.t = t;
  }
  readConfig(offset: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + this.config[offset + i]!;
    return v;
  }
  writeConfig(offset: number, _size: 1 | 2 | 4, value: number): void {
    this.config[offset] = value & 0xff;
  }
  activate(_q: readonly VirtQueue[], _f: bigint): void {
    this.activations++;
  }
  reset(): void {
    this.resets++;
  }
  queueNotified(index: number): void {
    this.notified.push(index);
    const q = this.t.queues[index]!;
    do {
      q.disableNotifications();
      while (q.pop(this.chain)) {
        const n = this.chain.readFrom(0, this.scratch, 0, Math.min(this.chain.readableBytes, this.scratch.length));
        const w = this.chain.writeTo(0, this.scratch, 0, n);
        q.pushUsed(this.chain.head, w);
      }
    } while (!q.enableNotifications());
    this.t.signalUsed(index);
  }
}

function make() {
  const services = makeServices();
  const backend = new EchoBackend();
  const dev = new VirtioPciDevice("echo0", backend, services);
  placeDevice(dev);
  const drv = new TestVirtioDriver(dev, services);
  return { services, backend, dev, drv };
}

function vendorCaps(dev: VirtioPciDevice): Map<number, { at: number; bar: number; offset: number; length: number; extra: number }> {
  const out = new Map<number, { at: number; bar: number; offset: number; length: number; extra: number }>();
  let p = dev.pci.configRead(0x34, 1);
  while (p !== 0) {
    if (dev.pci.configRead(p, 1) === PCI_CAP_ID.vendor) {
      const type = dev.pci.configRead(p + 3, 1);
      if (!out.has(type))
        out.set(type, {
          at: p,
          bar: dev.pci.configRead(p + 4, 1),
          offset: dev.pci.configRead(p + 8, 4),
          length: dev.pci.configRead(p + 12, 4),
          extra: dev.pci.configRead(p + 16, 4),
        });
    }
    p = dev.pci.configRead(p + 1, 1);
  }
  return out;
}

test("PCI identity and virtio capabilities", () => {
  const { dev } = make();
  assert.equal(dev.pci.configRead(0, 2), 0x1af4);
  assert.equal(dev.pci.configRead(2, 2), 0x1040 + 0x1f);
  assert.equal(dev.pci.configRead(8, 1), 1, "revision 1 (modern)");
  assert.equal(dev.pci.configRead(0x2c, 2), 0x1af4);
  assert.ok(dev.pci.configRead(0x2e, 2) >= 0x40);
  assert.equal(dev.pci.configRead(0x09, 4) >>> 8, 0xff0000 >>> 8);
  assert.equal(dev.pci.configRead(0x3d, 1), 1, "INTA");
  const caps = vendorCaps(dev);
  assert.deepEqual([...caps.keys()].sort(), [1, 2, 3, 4, 5]);
  assert.deepEqual({ ...caps.get(1)!, at: 0, extra: 0 }, { at: 0, bar: 0, offset: 0, length: 0x38, extra: 0 });
  assert.equal(caps.get(2)!.offset, 0x3000);
  assert.equal(caps.get(2)!.length, 8);
  assert.equal(caps.get(2)!.extra, 4, "notify_off_multiplier");
  assert.equal(caps.get(3)!.offset, 0x1000);
  assert.equal(caps.get(4)!.offset, 0x2000);
  assert.equal(caps.get(4)!.length, 8);
  assert.equal(dev.pci.configRead(caps.get(1)!.at + 2, 1), 16, "cap_len");
  assert.equal(dev.pci.configRead(caps.get(2)!.at + 2, 1), 20);
  assert.equal(dev.pci.configRead(caps.get(5)!.at + 2, 1), 20);
  assert.equal(dev.pci.bar(0)!.size, 0x4000);
  assert.equal(dev.pci.bar(1)!.kind, "mmio32");
});

test("feature negotiation: VERSION_1 always offered; bits not offered are refused", () => {
  const { drv, dev } = make();
  drv.reset();
  drv.setStatus(S.acknowledge | S.driver);
  const offered = drv.offeredFeatures();
  assert.ok((offered & featureBit(VIRTIO_F.version1)) !== 0n);
  assert.ok((offered & featureBit(5)) !== 0n);
  assert.equal(drv.finishInit(offered | featureBit(7)), false, "bit 7 not offered");
  assert.equal(drv.status() & S.featuresOk, 0);
  drv.reset();
  drv.setStatus(S.acknowledge | S.driver);
  assert.equal(drv.finishInit(featureBit(5)), false, "VERSION_1 missing");
  drv.reset();
  drv.setStatus(S.acknowledge | S.driver);
  assert.equal(drv.finishInit(featureBit(VIRTIO_F.version1) | featureBit(5)), true);
  assert.equal(dev.negotiatedFeatures, featureBit(VIRTIO_F.version1) | featureBit(5));
  assert.equal(drv.status(), S.acknowledge | S.driver | S.featuresOk | S.driverOk);
  // Features are frozen after FEATURES_OK.
  drv.w32(C.driverFeatureSelect, 0);
  drv.w32(C.driverFeature, 0);
  assert.equal(drv.r32(C.driverFeature), 1 << 5);
});

test("common config registers read back; reset clears them and reads 0 at once", () => {
  const { drv, dev, backend } = make();
  assert.equal(drv.init(), true);
  assert.equal(drv.r16(C.numQueues), 2);
  drv.w16(C.queueSelect, 1);
  assert.equal(drv.r16(C.queueSize), 16);
  assert.equal(drv.r16(C.queueNotifyOff), 1);
  assert.equal(drv.r16(C.queueEnable), 1);
  assert.equal(drv.r16(C.queueMsixVector), 2);
  assert.equal(drv.r32(C.queueDesc), drv.queues[1]!.desc);
  assert.equal(drv.r32(C.queueDesc + 4), 0);
  // Odd-sized read of a 32-bit field.
  assert.equal(drv.r8(C.queueDesc + 1), (drv.queues[1]!.desc >> 8) & 0xff);
  drv.w16(C.queueSelect, 7);
  assert.equal(drv.r16(C.queueSize), 0, "no queue 7");
  // Vector beyond the table reads back NO_VECTOR.
  drv.w16(C.queueSelect, 0);
  assert.equal(backend.activations, 1);
  drv.reset();
  assert.equal(backend.resets, 2, "init reset + this one");
  assert.equal(drv.status(), 0);
  assert.equal(drv.r16(C.queueSize), 16);
  assert.equal(drv.r16(C.queueEnable), 0);
  assert.equal(drv.r16(C.queueMsixVector), VIRTIO_MSI_NO_VECTOR);
  assert.equal(drv.r16(C.msixConfig), VIRTIO_MSI_NO_VECTOR);
  assert.equal(dev.queues[0]!.ready, false);
  drv.w16(C.msixConfig, 99);
  assert.equal(drv.r16(C.msixConfig), VIRTIO_MSI_NO_VECTOR);
});

test("requests through the doorbell and through a BAR write; MSI-X per queue", () => {
  const { drv, services, backend, dev } = make();
  assert.equal(drv.init(), true);
  const bell = services.doorbells.bells.get(1)!;
  assert.equal(bell.gpa, BAR0 + 0x3000 + 4);
  assert.equal(bell.length, 2);
  const mem = services.memory;
  mem.bytes(0x40000, 5).set([1, 2, 3, 4, 5]);
  const q = drv.queues[1]!;
  q.setUsedEvent(0);
  const h = q.add([{ addr: 0x40000, len: 5, write: false }, { addr: 0x50000, len: 16, write: true }]);
  q.kick();
  assert.deepEqual(q.takeUsed(), [{ id: h, len: 5 }]);
  assert.deepEqual([...mem.bytes(0x50000, 5)], [1, 2, 3, 4, 5]);
  assert.equal(services.msi.count(2), 1, "queue 1 -> vector 2");
  q.setUsedEvent(1);
  q.add([{ addr: 0x40000, len: 2, write: false }, { addr: 0x50000, len: 2, write: true }]);
  q.kick(true);
  assert.equal(q.takeUsed().length, 1);
  assert.equal(services.msi.count(2), 2);
  assert.deepEqual(backend.notified.slice(-2), [1, 1]);
  assert.equal(services.intx.calls.length, 0, "no INTx with MSI-X");
  // Moving BAR0 moves the doorbells.
  dev.pci.configWrite(0x10, 4, 0xe010_0000);
  assert.equal(services.doorbells.bells.get(0)!.gpa, 0xe010_0000 + 0x3000);
  dev.pci.configWrite(0x04, 2, 0);
  assert.equal(services.doorbells.bells.get(0)!.gpa, undefined, "decoding off");
});

test("MSI-X masked vector: pending bit, delivered on unmask", () => {
  const { drv, services, dev } = make();
  drv.init();
  dev.barWrite(1, 2 * 16 + 12, 4, 1); // mask vector 2
  const q = drv.queues[1]!;
  q.add([{ addr: 0x40000, len: 1, write: false }, { addr: 0x50000, len: 1, write: true }]);
  q.kick();
  assert.equal(services.msi.count(2), 0);
  assert.equal(dev.barRead(1, 0x800, 4) & 4, 4, "PBA bit 2");
  dev.barWrite(1, 2 * 16 + 12, 4, 0);
  assert.equal(services.msi.count(2), 1);
  assert.equal(dev.barRead(1, 0x800, 4) & 4, 0);
});

test("INTx fallback: ISR bit 0 for queues, bit 1 for config; read clears and deasserts", () => {
  const { drv, services, dev, backend } = make();
  assert.equal(drv.init({ msix: false }), true);
  const q = drv.queues[0]!;
  q.add([{ addr: 0x40000, len: 1, write: false }, { addr: 0x50000, len: 1, write: true }]);
  q.kick();
  assert.equal(services.intx.level, true);
  assert.equal(dev.pci.configRead(0x06, 2) & 0x08, 0x08, "status interrupt bit");
  assert.equal(drv.r8(0x1000), 1);
  assert.equal(services.intx.level, false);
  assert.equal(drv.r8(0x1000), 0);
  const gen = drv.r8(C.configGeneration);
  backend.t.configChanged();
  assert.equal(drv.r8(C.configGeneration), (gen + 1) & 0xff);
  assert.equal(services.intx.level, true);
  assert.equal(drv.r8(0x1000), 2);
  assert.equal(services.intx.level, false);
  // INTx disable in the command register keeps the line low but the ISR still reports.
  dev.pci.configWrite(0x04, 2, dev.pci.command | 0x400);
  backend.t.configChanged();
  assert.equal(services.intx.level, false);
  assert.equal(drv.r8(0x1000), 2);
});

test("malformed ring: DEVICE_NEEDS_RESET and a config interrupt; reset recovers", () => {
  const { drv, services, dev } = make();
  drv.init();
  const q = drv.queues[0]!;
  q.writeDesc(q.desc, 0, 0x40000, 4, 1, 0); // loop 0 -> 0
  q.publish(0);
  q.kick();
  assert.equal(drv.status() & S.needsReset, S.needsReset);
  assert.equal(services.msi.count(0), 1, "config vector");
  assert.match(dev.lastError ?? "", /VIRTQ_CHAIN_LOOP/);
  assert.equal(dev.active, false);
  // Writing status back with other bits keeps NEEDS_RESET.
  drv.setStatus(S.driverOk);
  assert.equal(drv.status() & S.needsReset, S.needsReset);
  assert.equal(drv.init(), true);
  assert.equal(drv.status() & S.needsReset, 0);
  const q2 = drv.queues[0]!;
  q2.add([{ addr: 0x40000, len: 1, write: false }, { addr: 0x50000, len: 1, write: true }]);
  q2.kick();
  assert.equal(q2.takeUsed().length, 1);
});

test("queue enable with a bad ring -> NEEDS_RESET; no DMA without bus mastering", () => {
  const { drv, dev, backend } = make();
  drv.reset();
  drv.setStatus(S.acknowledge | S.driver);
  drv.w32(C.driverFeatureSelect, 1);
  drv.w32(C.driverFeature, 1);
  drv.setStatus(S.featuresOk);
  drv.w16(C.queueSelect, 0);
  drv.w16(C.queueSize, 12);
  drv.w16(C.queueEnable, 1);
  assert.equal(drv.status() & S.needsReset, S.needsReset);
  assert.match(dev.lastError ?? "", /VIRTQ_BAD_SIZE/);
  assert.equal(drv.init(), true);
  dev.pci.configWrite(0x04, 2, dev.pci.command & ~4);
  const q = drv.queues[0]!;
  const before = backend.notified.length;
  q.add([{ addr: 0x40000, len: 1, write: false }, { addr: 0x50000, len: 1, write: true }]);
  q.kick();
  assert.equal(backend.notified.length, before);
  dev.pci.configWrite(0x04, 2, dev.pci.command | 4);
  assert.equal(q.takeUsed().length, 1, "processed when bus mastering comes on");
});

test("buffers made available before DRIVER_OK are processed at DRIVER_OK", () => {
  const { drv, services } = make();
  drv.init();
  // Redo the probe but publish a buffer before DRIVER_OK.
  drv.reset();
  drv.setStatus(S.acknowledge | S.driver);
  drv.w32(C.driverFeatureSelect, 1);
  drv.w32(C.driverFeature, 1);
  drv.setStatus(S.featuresOk);
  const size = 16;
  const desc = drv.alloc(16 * size), avail = drv.alloc(6 + 2 * size, 2), used = drv.alloc(6 + 8 * size, 4);
  drv.w16(C.queueSelect, 0);
  drv.w64(C.queueDesc, desc);
  drv.w64(C.queueDriver, avail);
  drv.w64(C.queueDevice, used);
  drv.w16(C.queueEnable, 1);
  const mem = services.memory;
  const dv = new DataView(mem.bytes(0, 0x100000).buffer);
  dv.setUint32(desc, 0x40000, true);
  dv.setUint32(desc + 8, 1, true);
  dv.setUint16(desc + 12, 2, true);
  dv.setUint16(avail + 4, 0, true);
  dv.setUint16(avail + 2, 1, true);
  drv.setStatus(S.driverOk);
  assert.equal(dv.getUint16(used + 2, true), 1);
});

test("device config window and the PCI_CFG access capability", () => {
  const { drv, dev, backend } = make();
  drv.init();
  backend.config.set([1, 2, 3, 4, 5, 6, 7, 8]);
  assert.equal(drv.deviceConfig(0, 4), 0x04030201);
  assert.equal(drv.deviceConfig(6, 2), 0x0807);
  assert.equal(drv.deviceConfig(8, 1), 0, "past the end");
  const cfg = vendorCaps(dev).get(5)!.at;
  // Read device_status through the window.
  dev.pci.configWrite(cfg + 4, 1, 0);
  dev.pci.configWrite(cfg + 8, 4, C.deviceStatus);
  dev.pci.configWrite(cfg + 12, 4, 1);
  assert.equal(dev.pci.configRead(cfg + 16, 1), drv.status());
  // Write the device config through it.
  dev.pci.configWrite(cfg + 8, 4, VIRTIO_BAR0.device + 2);
  dev.pci.configWrite(cfg + 16, 1, 0x99);
  assert.equal(backend.config[2], 0x99);
  // Misaligned offsets are ignored.
  dev.pci.configWrite(cfg + 8, 4, VIRTIO_BAR0.device + 1);
  dev.pci.configWrite(cfg + 12, 4, 2);
  dev.pci.configWrite(cfg + 16, 2, 0x1234);
  assert.equal(backend.config[1], 2);
});

test("board reset: registers, MSI-X and queues back to power-on", () => {
  const { drv, dev, services } = make();
  drv.init();
  dev.reset();
  assert.equal(drv.status(), 0);
  assert.equal(dev.msix.enabled, false);
  assert.equal(dev.pci.mappedAddress(0), undefined);
  assert.equal(services.doorbells.bells.get(0)!.gpa, undefined);
  const saved = structuredClone(dev.save());
  assert.equal(saved.kind, "virtio-pci");
  assert.equal(saved.queues.length, 2);
});

test("save / restore: a restored device continues on the same rings", () => {
  const { drv, dev, services } = make();
  drv.init();
  const q = drv.queues[1]!;
  q.setUsedEvent(0);
  q.add([{ addr: 0x40000, len: 1, write: false }, { addr: 0x50000, len: 1, write: true }]);
  q.kick();
  assert.equal(q.takeUsed().length, 1);
  const saved = structuredClone(dev.save());
  // A second device over the same RAM, as after a snapshot restore.
  const backend2 = new EchoBackend();
  const services2 = { ...makeServices(), memory: services.memory };
  const dev2 = new VirtioPciDevice("echo0", backend2, services2);
  dev2.restore(saved);
  assert.equal(dev2.deviceStatus, S.acknowledge | S.driver | S.featuresOk | S.driverOk);
  assert.equal(backend2.activations, 1);
  assert.equal(dev2.msix.enabled, true);
  assert.equal(services2.doorbells.bells.get(1)!.gpa, BAR0 + 0x3000 + 4);
  const drv2 = new TestVirtioDriver(dev2, services2);
  q.setUsedEvent(q.lastUsed);
  services.memory.bytes(0x40000, 1)[0] = 0x77;
  q.add([{ addr: 0x40000, len: 1, write: false }, { addr: 0x50000, len: 1, write: true }]);
  services2.doorbells.ring(1);
  assert.deepEqual(q.takeUsed().map((u) => u.len), [1]);
  assert.equal(services.memory.bytes(0x50000, 1)[0], 0x77);
  assert.equal(services2.msi.count(2), 1);
  assert.equal(drv2.r16(C.numQueues), 2);
  const other = new VirtioPciDevice("x", { ...new EchoBackend(), queueMaxSizes: [16], attach() {}, activate() {}, reset() {}, queueNotified() {}, readConfig: () => 0, writeConfig() {} }, makeServices());
  assert.throws(() => other.restore(saved), /VIRTIO_RESTORE|queues/);
});
