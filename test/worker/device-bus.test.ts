import { test } from "node:test";
import assert from "node:assert/strict";
import { Worker } from "node:worker_threads";
import { PciConfig, type PciDevice } from "../../src/devices/pci/pci-config.js";
import { DeviceBus } from "../../src/worker/device-bus.js";
import { DeviceMailbox, MAILBOX_OP, POSTED_WRITES } from "../../src/worker/device-mailbox.js";
import { DeviceForwarder } from "../../src/worker/device-forwarding.js";
import { planPci, parseMac } from "../../src/worker/device-plan.js";

/** A device with an I/O BAR (16 bytes of scratch registers) and a 4 KiB MMIO BAR. */
class ScratchDevice implements PciDevice {
  readonly pci = new PciConfig({ vendorId: 0x1234, deviceId: 0x5678, classCode: 0xff0000, interruptPin: 1 }, [
    { index: 0, kind: "io", size: 16 },
    { index: 1, kind: "mmio32", size: 4096 },
  ]);
  readonly io = new Uint8Array(16);
  readonly mem = new Uint8Array(4096);
  readonly log: string[] = [];
  constructor(readonly name: string) {}
  barRead(bar: number, offset: number, size: 1 | 2 | 4): number {
    const b = bar === 0 ? this.io : this.mem;
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + b[offset + i]!;
    return v;
  }
  barWrite(bar: number, offset: number, size: 1 | 2 | 4, value: number): void {
    this.log.push(`${bar}:${offset}:${size}:${value.toString(16)}`);
    const b = bar === 0 ? this.io : this.mem;
    for (let i = 0; i < size; i++) b[offset + i] = (value >>> (8 * i)) & 0xff;
  }
  reset(): void {}
}

/** A mailbox served by the test echo thread (mailbox-echo-thread.ts); `stop` ends the thread and frees the mailbox. */
async function startEchoThread(): Promise<{ box: DeviceMailbox; stop: () => Promise<void> }> {
  const box = DeviceMailbox.create(2);
  const worker = new Worker(new URL("./mailbox-echo-thread.js", import.meta.url), { workerData: box.handoff() });
  await new Promise((r) => worker.once("message", r));
  return {
    box,
    stop: async () => {
      box.ring();
      await worker.terminate();
      box.close();
    },
  };
}

const windows = { mmioStart: 0xc000_0000, mmioSize: 0x1000_0000, ioStart: 0xc000, ioEnd: 0x10000 };

test("BARs get aligned addresses inside the windows and decode once enabled", () => {
  const bus = new DeviceBus();
  const a = new ScratchDevice("a");
  const b = new ScratchDevice("b");
  bus.attach(2 << 3, a);
  bus.attach(3 << 3, b);
  bus.assignBars(windows);
  const ioA = a.pci.mappedAddress(0)!;
  const ioB = b.pci.mappedAddress(0)!;
  const memA = a.pci.mappedAddress(1)!;
  const memB = b.pci.mappedAddress(1)!;
  for (const io of [ioA, ioB]) assert.ok(io >= 0xc000 && io % 16 === 0);
  for (const m of [memA, memB]) assert.ok(m >= 0xc000_0000 && m % 4096 === 0);
  assert.notEqual(ioA, ioB);
  assert.notEqual(memA, memB);
  bus.pioWrite(ioB + 4, 2, 0xbeef);
  assert.equal(b.io[4], 0xef);
  assert.equal(a.io[4], 0);
  bus.mmioWrite(memA + 0x10, 4, 0x11223344);
  assert.equal(bus.mmioRead(memA + 0x10, 4), 0x11223344);
  assert.equal(bus.mmioRead(memB + 0x10, 4), 0);
});

test("a guest that moves a BAR is followed; disabling decoding hides it; unclaimed reads are all-ones", () => {
  const bus = new DeviceBus();
  const d = new ScratchDevice("d");
  bus.attach(2 << 3, d);
  bus.assignBars(windows);
  const bdf = 2 << 3;
  bus.configWrite(bdf, 0x14, 4, 0xd000_0000);
  assert.equal(bus.configRead(bdf, 0x14, 4), 0xd000_0000);
  bus.mmioWrite(0xd000_0008, 1, 0x5a);
  assert.equal(d.mem[8], 0x5a);
  bus.configWrite(bdf, 0x04, 2, 0x0001); // I/O only
  assert.equal(bus.mmioRead(0xd000_0008, 1), 0xff);
  assert.ok(bus.unclaimedAccesses > 0);
  assert.equal(bus.configRead(7 << 3, 0, 4), 0xffff_ffff, "absent function");
});

test("mailbox requests: string port I/O in one request, 8-byte MMIO as two halves, config space", () => {
  const bus = new DeviceBus();
  const d = new ScratchDevice("d");
  bus.attach(2 << 3, d);
  bus.assignBars(windows);
  const io = d.pci.mappedAddress(0)!;
  const mem = d.pci.mappedAddress(1)!;
  const data = new Uint8Array(4096);
  data.set([1, 2, 3, 4, 5, 6]);
  bus.service({ op: MAILBOX_OP.pioWrite, size: 2, count: 3, address: io, data });
  assert.deepEqual(d.log, ["0:0:2:201", "0:0:2:403", "0:0:2:605"]);
  data.set([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
  bus.service({ op: MAILBOX_OP.mmioWrite, size: 8, count: 1, address: mem + 0x20, data });
  assert.deepEqual(Array.from(d.mem.subarray(0x20, 0x28)), [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
  data.fill(0);
  bus.service({ op: MAILBOX_OP.configRead, size: 4, count: 1, address: (2 << 3) * 256, data });
  assert.deepEqual(Array.from(data.subarray(0, 4)), [0x34, 0x12, 0x78, 0x56]);
});

test("a vCPU-side forwarder reaches a device thread through the mailbox and its doorbell", async () => {
  const { box, stop } = await startEchoThread();
  const fwd = new DeviceForwarder(box.requester(1), { ranges: [[0x1000, 0x100]] });
  assert.equal(fwd.forwardsPort(0x1010), true);
  assert.equal(fwd.forwardsPort(0x80), false);
  const data = new Uint8Array([0, 0, 0, 0]);
  fwd.portIo(false, 0x1010, 2, 2, data);
  assert.deepEqual(Array.from(data), [0x10, 0x10, 0x10, 0x10], "the echo thread answers reads with the port's low byte");
  const fn = fwd.configFunction(0x10);
  assert.equal(fn.configRead(0x04, 2), 0x1004 & 0xffff);
  await stop();
});

test("port read shadow: a published 1-byte read is answered on the vCPU side; wider, string and withdrawn reads go to the device thread", async () => {
  const { box, stop } = await startEchoThread();
  const shadow = box.portShadow();
  const fwd = new DeviceForwarder(box.requester(1), { ranges: [[0x1000, 0x100]] });
  const byte = new Uint8Array(4);
  shadow.publish(0x1017, 0x5a);
  assert.equal(box.requester(0).shadowRead(0x1017), 0x5a, "every vCPU's requester sees it");
  fwd.portIo(false, 0x1017, 1, 1, byte);
  assert.equal(byte[0], 0x5a, "answered from the shadow, not by the echo thread (which answers 0x17)");
  assert.equal(fwd.shadowedReads, 1);
  fwd.portIo(false, 0x1017, 2, 1, byte);
  assert.deepEqual(Array.from(byte.subarray(0, 2)), [0x17, 0x17], "a 2-byte read is forwarded");
  fwd.portIo(false, 0x1017, 1, 2, byte);
  assert.deepEqual(Array.from(byte.subarray(0, 2)), [0x17, 0x17], "string I/O is forwarded");
  shadow.withdraw(0x1017);
  assert.equal(box.requester(1).shadowRead(0x1017), -1);
  fwd.portIo(false, 0x1017, 1, 1, byte);
  assert.equal(byte[0], 0x17, "withdrawn: forwarded again");
  shadow.publish(0x1018, 0);
  assert.equal(box.requester(1).shadowRead(0x1018), 0, "a published zero is a value, not 'forward'");
  assert.equal(fwd.shadowedReads, 1);
  await stop();
});

test("posted writes: queued in the order made across vCPUs, applied before any later request, shadow reads wait for them, a full ring refuses", () => {
  const box = DeviceMailbox.create(2);
  const server = box.server();
  const a = box.requester(0);
  const b = box.requester(1);
  const ports = box.postedWritePorts();
  assert.equal(a.postsWrites(0x1f7), false, "no port takes posted writes until its device says so");
  ports.accept(0x1f7);
  assert.equal(b.postsWrites(0x1f7), true);
  ports.refuse(0x1f7);
  assert.equal(b.postsWrites(0x1f7), false);
  box.portShadow().publish(0x3f6, 0x50);
  assert.equal(a.shadowRead(0x3f6), 0x50);
  assert.ok(a.postWrite(0x1f2, 1, 0x11));
  assert.ok(b.postWrite(0x1f3, 2, 0x2233));
  assert.ok(a.postWrite(0x1f7, 4, 0xc8c8c8c8));
  assert.equal(b.shadowRead(0x3f6), -1, "while writes are queued, reads go to the device thread");
  const seen: string[] = [];
  assert.equal(
    server.drain((r) => seen.push(`${r.op}:${r.address.toString(16)}:${r.size}:${Array.from(r.data.subarray(0, r.size), (x) => x.toString(16)).join("")}`)),
    3,
  );
  assert.deepEqual(seen, [`${MAILBOX_OP.pioWrite}:1f2:1:11`, `${MAILBOX_OP.pioWrite}:1f3:2:3322`, `${MAILBOX_OP.pioWrite}:1f7:4:c8c8c8c8`], "in the order made, little-endian data");
  assert.equal(b.shadowRead(0x3f6), 0x50, "applied: the shadow answers again");
  assert.equal(server.postedWrites, 3);
  for (let i = 0; i < POSTED_WRITES; i++) assert.ok(a.postWrite(0x1f0, 2, i));
  assert.equal(b.postWrite(0x1f0, 2, 0), false, "a full ring refuses: the vCPU asks synchronously instead");
  let applied = 0;
  assert.equal(server.drain(() => applied++), POSTED_WRITES);
  assert.ok(b.postWrite(0x1f0, 2, 0), "room again, and the ring wraps");
  assert.equal(server.drain(() => applied++), 1);
  // serve() runs the work a batch started (IDE transfers) after each batch, not only once requests stop.
  assert.ok(a.postWrite(0x1f7, 1, 0xc8));
  const order: string[] = [];
  assert.equal(
    server.serve(
      () => order.push("write"),
      () => order.push("after"),
    ),
    1,
  );
  assert.deepEqual(order, ["write", "after"]);
  box.close();
});

test("posted writes through a device thread: the vCPU goes on, and its next forwarded read sees every write it posted", async () => {
  const { box, stop } = await startEchoThread();
  const ports = box.postedWritePorts();
  for (let p = 0x1f0; p < 0x1f8; p++) ports.accept(p);
  const fwd = new DeviceForwarder(box.requester(0), { ranges: [[0x1f0, 8], [0xfff0, 0x10]] });
  const byte = new Uint8Array(4);
  for (let i = 1; i <= 200; i++) {
    byte[0] = i & 0xff;
    fwd.portIo(true, 0x1f0 + (i % 8), 1, 1, byte);
  }
  assert.equal(fwd.postedWrites, 200, "none waited for the device thread");
  fwd.portIo(false, 0xffff, 1, 1, byte);
  assert.equal(byte[0], 200, "the read after them saw all 200 applied");
  fwd.portIo(false, 0xfffe, 1, 1, byte);
  assert.equal(byte[0], 200, "the last one last");
  fwd.portIo(true, 0x1f0, 2, 2, byte);
  assert.equal(fwd.postedWrites, 200, "string I/O is never posted");
  await stop();
});

test("the bus tells a function once after each request it routes: one string access, one access, one config write (a shadowing device republishes then)", () => {
  const bus = new DeviceBus();
  const events: string[] = [];
  class Watched extends ScratchDevice {
    override barRead(bar: number, offset: number, size: 1 | 2 | 4): number {
      events.push(`r${offset}`);
      return super.barRead(bar, offset, size);
    }
    override barWrite(bar: number, offset: number, size: 1 | 2 | 4, value: number): void {
      events.push(`w${offset}`);
      super.barWrite(bar, offset, size, value);
    }
    afterAccess(): void {
      events.push("after");
    }
  }
  const d = new Watched("s");
  const other = new ScratchDevice("t");
  bus.attach(2 << 3, d);
  bus.attach(3 << 3, other);
  bus.assignBars(windows);
  const io = d.pci.mappedAddress(0)!;
  const mem = d.pci.mappedAddress(1)!;
  const data = new Uint8Array(64);

  bus.service({ op: MAILBOX_OP.pioRead, size: 2, count: 8, address: io + 4, data });
  assert.deepEqual(events.splice(0), [..."rrrrrrrr"].map((r) => `${r}4`).concat("after"), "8 elements, then one afterAccess");
  data.fill(7);
  bus.service({ op: MAILBOX_OP.pioWrite, size: 1, count: 3, address: io + 2, data });
  assert.deepEqual(events.splice(0), ["w2", "w2", "w2", "after"]);
  bus.service({ op: MAILBOX_OP.mmioWrite, size: 4, count: 1, address: mem + 8, data });
  assert.deepEqual(events.splice(0), ["w8", "after"]);
  assert.equal(bus.pioRead(io + 2, 1), 7);
  assert.deepEqual(events.splice(0), ["r2", "after"], "a single access through the public methods too");
  bus.configWrite(2 << 3, 0x04, 2, 0x07);
  bus.configWrite(4 << 3, 0x04, 2, 0x07);
  assert.deepEqual(events.splice(0), ["after"], "once, for the function written");
  assert.equal(d.pci.configRead(0x04, 2) & 0x07, 0x07, "the write itself happened first");
  bus.pioWrite(other.pci.mappedAddress(0)!, 1, 1);
  bus.service({ op: MAILBOX_OP.pioRead, size: 4, count: 4, address: 0x80, data });
  assert.deepEqual(events, [], "nothing for accesses that reached another function or nobody");
  assert.deepEqual([...data.subarray(0, 16)], new Array(16).fill(0xff), "an unclaimed string read is all-ones");
  assert.equal(bus.unclaimedAccesses, 4, "each element counted");

  // A model that throws still hears afterAccess (it may have changed state before the throw).
  const failing = new (class extends Watched {
    override barWrite(): void {
      throw new Error("model bug");
    }
  })("f");
  const bus2 = new DeviceBus();
  bus2.attach(2 << 3, failing);
  bus2.assignBars(windows);
  assert.throws(() => bus2.service({ op: MAILBOX_OP.pioWrite, size: 1, count: 2, address: failing.pci.mappedAddress(0)!, data }), /model bug/);
  assert.deepEqual(events.splice(0), ["after"]);
});

test("PCI plan: IDE at 00:01.0, others from slot 2 in order; MAC parsing", () => {
  const disk = { path: "/x", readOnly: false };
  const p = planPci([
    { kind: "virtio-blk", id: "a", disk, queues: 1 },
    { kind: "ide-cdrom", id: "c", disk: undefined },
    { kind: "virtio-rng", id: "r" },
  ]);
  assert.deepEqual(p.map((f) => [f.bdf >> 3, f.kind]), [[1, "ide"], [2, "virtio-blk"], [3, "virtio-rng"]]);
  assert.deepEqual(Array.from(parseMac("52:54:00:AB:cd:01")), [0x52, 0x54, 0, 0xab, 0xcd, 1]);
  assert.throws(() => parseMac("01:00:5e:00:00:01"), /multicast/);
  assert.throws(() => parseMac("52:54:00"), /not a MAC/);
});
