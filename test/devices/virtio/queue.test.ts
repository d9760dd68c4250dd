import { test } from "node:test";
import assert from "node:assert/strict";
import { ChunkedGuestMemory } from "../../../src/machine/guest-memory.js";
import { DescriptorChain, VirtQueue } from "../../../src/devices/virtio/queue.js";
import { DriverQueue } from "./virtio-driver.js";

const RAM = 1 << 20;

function setup(opts: { size?: number; eventIdx?: boolean; indirect?: boolean; chunkBytes?: number } = {}) {
  const memory = new ChunkedGuestMemory([{ gpa: 0, length: RAM, fileOffset: 0 }], (_o, l) => new Uint8Array(l), opts.chunkBytes ?? 1 << 30);
  const size = opts.size ?? 8;
  const errors: string[] = [];
  const q = new VirtQueue(memory, 0, 256, (_q, code) => errors.push(code));
  q.setFeatures({ eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? true });
  const desc = 0x1000, avail = 0x2000, used = 0x3000;
  assert.equal(q.configure(size, desc, avail, used), true);
  const dq = new DriverQueue(memory, 0, size, desc, avail, used);
  return { memory, q, dq, errors, chain: new DescriptorChain() };
}

test("configure: size, alignment and RAM bounds", () => {
  const memory = ChunkedGuestMemory.anonymous([{ gpa: 0, length: RAM, fileOffset: 0 }]);
  const errors: string[] = [];
  const q = new VirtQueue(memory, 3, 256, (_q, code) => errors.push(code));
  assert.equal(q.configure(3, 0x1000, 0x2000, 0x3000), false);
  assert.equal(q.error, "VIRTQ_BAD_SIZE");
  for (const [size, d, a, u, code] of [
    [512, 0x1000, 0x2000, 0x3000, "VIRTQ_BAD_SIZE"],
    [0, 0x1000, 0x2000, 0x3000, "VIRTQ_BAD_SIZE"],
    [8, 0x1008, 0x2000, 0x3000, "VIRTQ_BAD_ALIGNMENT"],
    [8, 0x1000, 0x2001, 0x3000, "VIRTQ_BAD_ALIGNMENT"],
    [8, 0x1000, 0x2000, 0x3002, "VIRTQ_BAD_ALIGNMENT"],
    [8, RAM - 64, 0x2000, 0x3000, "VIRTQ_RING_NOT_RAM"],
    [8, 0x1000, RAM - 4, 0x3000, "VIRTQ_RING_NOT_RAM"],
    [8, 0x1000, 0x2000, RAM, "VIRTQ_RING_NOT_RAM"],
    [8, 2 ** 60, 0x2000, 0x3000, "VIRTQ_RING_NOT_RAM"],
  ] as const) {
    q.reset();
    assert.equal(q.configure(size, d, a, u), false);
    assert.equal(q.error, code);
  }
  assert.ok(errors.length >= 9);
  q.reset();
  assert.equal(q.configure(256, 0x1000, 0x2000, 0x3000), true);
  assert.equal(q.error, undefined);
  assert.throws(() => new VirtQueue(memory, 0, 100));
});

test("pop: readable then writable segments as live views; pushUsed", () => {
  const { q, dq, chain, memory } = setup();
  memory.bytes(0x10000, 4).set([1, 2, 3, 4]);
  const head = dq.add([
    { addr: 0x10000, len: 4, write: false },
    { addr: 0x10100, len: 3, write: false },
    { addr: 0x20000, len: 100, write: true },
    { addr: 0x21000, len: 1, write: true },
  ]);
  assert.equal(q.available(), 1);
  assert.equal(q.pop(chain), true);
  assert.equal(chain.head, head);
  assert.equal(chain.readableCount, 2);
  assert.equal(chain.readableBytes, 7);
  assert.equal(chain.writableCount, 2);
  assert.equal(chain.writableBytes, 101);
  assert.deepEqual([...chain.readableSegment(0)], [1, 2, 3, 4]);
  const hdr = new Uint8Array(6);
  assert.equal(chain.readFrom(1, hdr), 6);
  assert.deepEqual([...hdr], [2, 3, 4, 0, 0, 0]);
  chain.writableSegment(0)[0] = 0xaa; // a live view
  assert.equal(memory.bytes(0x20000, 1)[0], 0xaa);
  assert.equal(chain.writeTo(99, new Uint8Array([7, 8])), 2);
  assert.equal(memory.bytes(0x20063, 1)[0], 7);
  assert.equal(memory.bytes(0x21000, 1)[0], 8);
  assert.equal(q.pop(chain), false);
  q.pushUsed(chain.head, 101);
  assert.deepEqual(dq.takeUsed(), [{ id: head, len: 101 }]);
  assert.equal(q.usedIndex, 1);
});

test("indirect descriptors; a direct chain may end in an indirect table", () => {
  const { q, dq, chain, memory } = setup();
  memory.bytes(0x10000, 2).set([9, 9]);
  dq.add([{ addr: 0x10000, len: 2, write: false }, { addr: 0x20000, len: 8, write: true }], { indirectAt: 0x8000 });
  assert.equal(q.pop(chain), true);
  assert.equal(chain.readableCount, 1);
  assert.equal(chain.writableBytes, 8);
  // direct descriptor 3 -> indirect descriptor 4
  dq.writeDesc(dq.desc, 3, 0x10000, 16, 1, 4);
  dq.writeDesc(dq.desc, 4, 0x8000, 32, 4, 0);
  dq.publish(3);
  assert.equal(q.pop(chain), true);
  assert.equal(chain.readableCount, 2);
  assert.equal(chain.writableCount, 1);
});

test("malformed chains break the queue instead of throwing", () => {
  const cases: [string, (s: ReturnType<typeof setup>) => void, boolean?][] = [
    ["VIRTQ_BAD_HEAD", (s) => s.dq.publish(8)],
    ["VIRTQ_BAD_NEXT", (s) => { s.dq.writeDesc(s.dq.desc, 0, 0x10000, 4, 1, 9); s.dq.publish(0); }],
    ["VIRTQ_CHAIN_LOOP", (s) => { s.dq.writeDesc(s.dq.desc, 0, 0x10000, 4, 1, 1); s.dq.writeDesc(s.dq.desc, 1, 0x10000, 4, 1, 0); s.dq.publish(0); }],
    ["VIRTQ_BAD_ORDER", (s) => s.dq.add([{ addr: 0x10000, len: 4, write: true }, { addr: 0x10000, len: 4, write: false }])],
    ["VIRTQ_BUFFER_NOT_RAM", (s) => s.dq.add([{ addr: RAM - 2, len: 4, write: false }])],
    ["VIRTQ_BUFFER_NOT_RAM", (s) => s.dq.add([{ addr: 2 ** 52, len: 4, write: true }])],
    ["VIRTQ_BUFFER_NOT_RAM", (s) => s.dq.add([{ addr: 2 ** 63, len: 4, write: true }])],
    ["VIRTQ_NESTED_INDIRECT", (s) => { s.dq.writeDesc(0x8000, 0, 0x9000, 16, 4, 0); s.dq.writeDesc(s.dq.desc, 0, 0x8000, 16, 4, 0); s.dq.publish(0); }],
    ["VIRTQ_INDIRECT_NOT_NEGOTIATED", (s) => s.dq.add([{ addr: 0x10000, len: 4, write: false }], { indirectAt: 0x8000 }), false],
    ["VIRTQ_BAD_INDIRECT", (s) => { s.dq.writeDesc(s.dq.desc, 0, 0x8000, 24, 4, 0); s.dq.publish(0); }],
    ["VIRTQ_BAD_INDIRECT", (s) => { s.dq.writeDesc(s.dq.desc, 0, 0x8000, 16, 5, 1); s.dq.publish(0); }],
    ["VIRTQ_BAD_INDIRECT", (s) => { s.dq.writeDesc(s.dq.desc, 0, RAM - 16, 32, 4, 0); s.dq.publish(0); }],
    ["VIRTQ_CHAIN_LOOP", (s) => { s.dq.writeDesc(0x8000, 0, 0x10000, 4, 1, 1); s.dq.writeDesc(0x8000, 1, 0x10000, 4, 1, 0); s.dq.writeDesc(s.dq.desc, 0, 0x8000, 32, 4, 0); s.dq.publish(0); }],
    ["VIRTQ_BAD_AVAIL_IDX", (s) => { s.dq.availIdx = 9; s.dq.publish(0); }],
  ];
  for (const [code, make, indirect] of cases) {
    const s = setup({ indirect: indirect ?? true });
    make(s);
    assert.doesNotThrow(() => assert.equal(s.q.pop(s.chain), false), code);
    assert.equal(s.q.error, code, code);
    assert.deepEqual(s.errors, [code]);
    assert.equal(s.q.pop(s.chain), false);
    s.q.pushUsed(0, 1);
    assert.equal(s.dq.usedIdx(), 0, "nothing written once broken");
  }
});

test("total length cap", () => {
  const s = setup();
  s.q.maxChainBytes = 4096;
  s.dq.add([{ addr: 0x10000, len: 4000, write: false }, { addr: 0x20000, len: 97, write: true }]);
  assert.equal(s.q.pop(s.chain), false);
  assert.equal(s.q.error, "VIRTQ_CHAIN_TOO_LONG");
});

test("a buffer spanning host mapping chunks becomes several views", () => {
  const s = setup({ chunkBytes: 0x10000 });
  s.dq.add([{ addr: 0xff00, len: 0x200, write: true }]);
  assert.equal(s.q.pop(s.chain), true);
  assert.equal(s.chain.writableCount, 2);
  assert.equal(s.chain.writableSegment(0).length, 0x100);
  assert.equal(s.chain.writableSegment(1).length, 0x100);
  assert.equal(s.chain.writableBytes, 0x200);
});

test("unpop gives the chain back", () => {
  const s = setup();
  const h = s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  assert.equal(s.q.pop(s.chain), true);
  s.q.unpop();
  assert.equal(s.q.available(), 1);
  assert.equal(s.q.pop(s.chain), true);
  assert.equal(s.chain.head, h);
});

test("interrupt suppression: VRING_AVAIL_F_NO_INTERRUPT without EVENT_IDX", () => {
  const s = setup();
  assert.equal(s.q.needsInterrupt(), false, "nothing pushed");
  s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  s.q.pop(s.chain);
  s.q.pushUsed(s.chain.head, 4);
  assert.equal(s.q.needsInterrupt(), true);
  assert.equal(s.q.needsInterrupt(), false, "batch consumed");
  s.dq.setAvailFlags(1);
  s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  s.q.pop(s.chain);
  s.q.pushUsed(s.chain.head, 4);
  assert.equal(s.q.needsInterrupt(), false);
});

test("notification suppression: VRING_USED_F_NO_NOTIFY while processing", () => {
  const s = setup();
  s.q.disableNotifications();
  assert.equal(s.dq.usedFlags(), 1);
  assert.equal(s.q.enableNotifications(), true);
  assert.equal(s.dq.usedFlags(), 0);
  s.q.disableNotifications();
  s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  assert.equal(s.q.enableNotifications(), false, "a buffer arrived while disabled");
});

test("EVENT_IDX: used_event decides interrupts, avail_event asks for kicks", () => {
  const s = setup({ eventIdx: true, size: 16 });
  s.dq.setUsedEvent(0);
  for (let i = 0; i < 3; i++) s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  // The device processes with notifications disabled: avail_event stays put.
  s.q.disableNotifications();
  while (s.q.pop(s.chain)) s.q.pushUsed(s.chain.head, 1);
  assert.equal(s.dq.availEvent(), 0);
  assert.equal(s.q.enableNotifications(), true);
  assert.equal(s.dq.availEvent(), 3, "kick me when entry 3 is published");
  assert.equal(s.q.needsInterrupt(), true, "first interrupt");
  // Driver wants an interrupt only after used entry 5 (used_event = 5).
  s.dq.setUsedEvent(5);
  for (let i = 0; i < 2; i++) {
    s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
    s.q.pop(s.chain);
    s.q.pushUsed(s.chain.head, 1);
  }
  assert.equal(s.q.usedIndex, 5);
  assert.equal(s.q.needsInterrupt(), false, "used idx 5 has not passed used_event 5");
  s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  s.q.pop(s.chain);
  s.q.pushUsed(s.chain.head, 1);
  assert.equal(s.q.needsInterrupt(), true, "entry 5 used");
  assert.equal(s.dq.availEvent(), 6, "pop with notifications enabled moves avail_event");
  // NO_INTERRUPT is ignored with EVENT_IDX.
  s.dq.setAvailFlags(1);
  s.dq.setUsedEvent(6);
  s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  s.q.pop(s.chain);
  s.q.pushUsed(s.chain.head, 1);
  assert.equal(s.q.needsInterrupt(), true);
});

test("16-bit index wrap-around", () => {
  const s = setup({ eventIdx: true, size: 4 });
  for (let i = 0; i < 70000; i++) {
    s.dq.setUsedEvent(s.dq.lastUsed);
    s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
    assert.equal(s.q.pop(s.chain), true);
    s.q.pushUsed(s.chain.head, 4);
    assert.equal(s.q.needsInterrupt(), true);
    assert.equal(s.dq.takeUsed().length, 1);
    s.dq.numFree = 4;
  }
  assert.equal(s.q.error, undefined);
  assert.equal(s.q.usedIndex, 70000 & 0xffff);
});

test("save / restore", () => {
  const s = setup({ eventIdx: true });
  s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  s.q.pop(s.chain);
  s.q.pushUsed(s.chain.head, 4);
  const saved = structuredClone(s.q.save());
  const q2 = new VirtQueue(s.memory, 0, 256);
  assert.equal(q2.restore(saved), true);
  assert.equal(q2.usedIndex, 1);
  assert.equal(q2.available(), 1);
  assert.equal(q2.pop(s.chain), true);
  assert.deepEqual(q2.features, { eventIdx: true, indirect: true, packed: false });
});

test("describe: the state report's line says where driver and device are, without changing the queue", () => {
  const s = setup({ eventIdx: true, size: 16 });
  s.dq.setUsedEvent(1);
  for (let i = 0; i < 3; i++) s.dq.add([{ addr: 0x10000, len: 4, write: true }]);
  assert.equal(s.q.pop(s.chain), true);
  s.q.pushUsed(s.chain.head, 1);
  assert.equal(s.q.needsInterrupt(), true);
  const line = s.q.describe();
  assert.equal(
    line,
    "queue 0: size 16, avail.idx 3 flags 0, device at 1 (2 unpopped), used.idx 1 flags 0, used_event 1, avail_event 1, last signalled 1, notifications on",
  );
  // A look only: the two unpopped chains are still there.
  assert.equal(s.q.available(), 2);
  s.q.fail("VIRTQ_TEST", "broken on purpose");
  assert.equal(s.q.describe(), "queue 0: broken (VIRTQ_TEST)");
  const fresh = setup();
  fresh.q.reset();
  assert.equal(fresh.q.describe(), "queue 0: not ready");
});
