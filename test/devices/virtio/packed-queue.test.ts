/**
 * The packed virtqueue layout (virtio 1.1 spec 2.7) on the device side,
 * driven by a test driver that lays out lists the way Linux's virtio_ring
 * does (test/devices/virtio/virtio-driver.ts, PackedDriverQueue).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChunkedGuestMemory } from "../../../src/machine/guest-memory.js";
import { DescriptorChain, RING_EVENT_FLAGS, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VirtQueue } from "../../../src/devices/virtio/queue.js";
import { PackedDriverQueue } from "./virtio-driver.js";

const RAM = 1 << 20;
const DESC = 0x1000;
const DRIVER = 0x2000;
const DEVICE = 0x3000;

function setup(opts: { size?: number; eventIdx?: boolean; indirect?: boolean } = {}) {
  const memory = ChunkedGuestMemory.anonymous([{ gpa: 0, length: RAM, fileOffset: 0 }]);
  const size = opts.size ?? 8;
  const errors: string[] = [];
  const q = new VirtQueue(memory, 0, 256, (_q, code) => errors.push(code));
  q.setFeatures({ eventIdx: opts.eventIdx ?? false, indirect: opts.indirect ?? true, packed: true });
  assert.equal(q.configure(size, DESC, DRIVER, DEVICE), true);
  const dq = new PackedDriverQueue(memory, 0, size, DESC, DRIVER, DEVICE);
  return { memory, q, dq, errors, chain: new DescriptorChain() };
}

const rd = (addr: number, len: number) => ({ addr, len, write: false });
const wr = (addr: number, len: number) => ({ addr, len, write: true });

test("packed configure: any size up to the maximum (no power of two needed), 4-byte event structures, rings in RAM", () => {
  const memory = ChunkedGuestMemory.anonymous([{ gpa: 0, length: RAM, fileOffset: 0 }]);
  const errors: string[] = [];
  const q = new VirtQueue(memory, 0, 256, (_q, code) => errors.push(code));
  for (const [size, d, a, u, code] of [
    [0, DESC, DRIVER, DEVICE, "VIRTQ_BAD_SIZE"],
    [257, DESC, DRIVER, DEVICE, "VIRTQ_BAD_SIZE"],
    [5, DESC + 8, DRIVER, DEVICE, "VIRTQ_BAD_ALIGNMENT"],
    [5, DESC, DRIVER + 2, DEVICE, "VIRTQ_BAD_ALIGNMENT"],
    [5, DESC, DRIVER, DEVICE + 2, "VIRTQ_BAD_ALIGNMENT"],
    [5, RAM - 64, DRIVER, DEVICE, "VIRTQ_RING_NOT_RAM"],
    [5, DESC, RAM, DEVICE, "VIRTQ_RING_NOT_RAM"],
    [5, DESC, DRIVER, 2 ** 40, "VIRTQ_RING_NOT_RAM"],
  ] as const) {
    q.reset();
    q.setFeatures({ eventIdx: false, indirect: true, packed: true });
    assert.equal(q.configure(size, d, a, u), false, `size ${size}`);
    assert.equal(q.error, code);
  }
  q.reset();
  q.setFeatures({ eventIdx: false, indirect: true, packed: true });
  assert.equal(q.configure(5, DESC, DRIVER, DEVICE), true, "a packed queue of 5");
  assert.equal(q.features.packed, true);
  assert.match(q.describe(), /packed, size 5/);
});

test("packed pop: a list linked by NEXT, id from its last descriptor; pushUsed writes one used descriptor and skips the list", () => {
  const { q, dq, chain, memory } = setup();
  memory.bytes(0x10000, 4).set([1, 2, 3, 4]);
  assert.equal(q.pop(chain), false, "a zeroed ring has nothing available");
  const id = dq.add([rd(0x10000, 4), rd(0x10100, 3), wr(0x20000, 100), wr(0x21000, 1)]);
  assert.equal(q.available(), 1);
  assert.equal(q.pop(chain), true);
  assert.equal(chain.readableCount, 2);
  assert.equal(chain.writableCount, 2);
  assert.equal(chain.readableBytes, 7);
  assert.equal(chain.writableBytes, 101);
  assert.deepEqual([...chain.readableSegment(0)], [1, 2, 3, 4]);
  assert.equal(chain.head & 0xffff, id, "the token carries the buffer id");
  assert.equal(chain.descriptors, 4);
  const token = chain.head;
  assert.equal(q.pop(chain), false, "one list only");
  q.pushUsed(token, 77);
  const flags = dq.readFlags(0);
  assert.equal(flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED), VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED, "used in lap 1");
  assert.equal(flags & 2, 2, "WRITE: the device wrote data");
  assert.deepEqual(dq.takeUsed(), [{ id, len: 77 }]);
  assert.equal(q.usedIndex, 4, "the device's used position skipped the list's 4 descriptors");
  assert.equal(q.nextAvail, 4);
});

test("packed rings wrap many times with out-of-order completion, lists of 1-3 descriptors, odd queue size", () => {
  const { q, dq, chain, errors } = setup({ size: 5 });
  let expected = 0;
  for (let round = 0; round < 60; round++) {
    const n1 = 1 + (round % 3);
    const n2 = 1 + ((round + 1) % 2);
    const a = dq.add(Array.from({ length: n1 }, (_v, k) => (k === n1 - 1 ? wr(0x40000 + round * 64, 8) : rd(0x30000 + k * 16, 16))));
    const b = dq.add(Array.from({ length: n2 }, (_v, k) => (k === n2 - 1 ? wr(0x50000 + round * 64, 8) : rd(0x30000, 16))));
    assert.equal(q.pop(chain), true, `round ${round}: first list`);
    const ta = chain.head;
    assert.equal(chain.descriptors, n1);
    assert.equal(q.pop(chain), true, `round ${round}: second list`);
    const tb = chain.head;
    assert.equal(q.pop(chain), false);
    // The second completes first: its used descriptor lands where the first list began.
    q.pushUsed(tb, 2);
    q.pushUsed(ta, 1);
    assert.deepEqual(dq.takeUsed(), [{ id: b, len: 2 }, { id: a, len: 1 }], `round ${round}`);
    expected += n1 + n2;
  }
  assert.deepEqual(errors, []);
  assert.equal(q.usedIndex, expected % 5);
  assert.equal(dq.numFree, 5);
});

test("packed: a descriptor of the previous lap is not available again", () => {
  const { q, dq, chain } = setup({ size: 2 });
  dq.add([wr(0x20000, 8)]);
  dq.add([wr(0x20100, 8)]);
  assert.equal(q.pop(chain), true);
  q.pushUsed(chain.head, 8);
  assert.equal(q.pop(chain), true);
  q.pushUsed(chain.head, 8);
  // The device is back at position 0 in lap 0; the descriptor there is used (lap 1): nothing to pop.
  assert.equal(q.pop(chain), false);
  assert.equal(dq.takeUsed().length, 2);
  dq.add([wr(0x20200, 8)]);
  assert.equal(q.pop(chain), true, "made available in lap 0");
});

test("packed indirect tables are read in sequence (only WRITE counts); one alone in its list", () => {
  const { q, dq, chain, memory } = setup();
  const table = 0x8000;
  const id = dq.add([rd(0x10000, 16), wr(0x20000, 512), wr(0x21000, 1)], { indirectAt: table });
  // Reserved flags in the table (NEXT, INDIRECT) are ignored by the device.
  const t = new DataView(memory.bytes(table, 48).buffer, memory.bytes(table, 48).byteOffset, 48);
  t.setUint16(14, 1 | 4, true);
  assert.equal(q.pop(chain), true);
  assert.equal(chain.head & 0xffff, id);
  assert.equal(chain.readableBytes, 16);
  assert.equal(chain.writableBytes, 513);
  q.pushUsed(chain.head, 513);
  assert.deepEqual(dq.takeUsed(), [{ id, len: 513 }]);
  assert.equal(q.usedIndex, 1, "an indirect list takes one ring descriptor");
});

test("packed malformed lists break the queue with a code", () => {
  const cases: [string, (s: ReturnType<typeof setup>) => void, { indirect?: boolean }?][] = [
    ["VIRTQ_CHAIN_LOOP", (s) => void s.dq.add(Array.from({ length: 8 }, () => rd(0x10000, 4)), { extraFlags: () => 1 })],
    ["VIRTQ_BAD_INDIRECT", (s) => void s.dq.add([rd(0x8000, 32)], { extraFlags: () => 4 | 1 })],
    ["VIRTQ_BAD_INDIRECT", (s) => void s.dq.add([rd(0x10000, 4), rd(0x8000, 32)], { extraFlags: (k) => (k === 1 ? 4 : 0) })],
    ["VIRTQ_BAD_INDIRECT", (s) => void s.dq.add([rd(RAM - 16, 32)], { extraFlags: () => 4 })],
    ["VIRTQ_INDIRECT_NOT_NEGOTIATED", (s) => void s.dq.add([rd(0x10000, 4)], { indirectAt: 0x8000 }), { indirect: false }],
    ["VIRTQ_BAD_ORDER", (s) => void s.dq.add([wr(0x20000, 4), rd(0x10000, 4)])],
    ["VIRTQ_BAD_ORDER", (s) => void s.dq.add([wr(0x20000, 4), rd(0x10000, 4)], { indirectAt: 0x8000 })],
    ["VIRTQ_BUFFER_NOT_RAM", (s) => void s.dq.add([wr(RAM - 8, 64)])],
    // The second descriptor of a list is not available (USED set as well: a used descriptor, say).
    ["VIRTQ_BAD_NEXT", (s) => void s.dq.add([rd(0x10000, 4), wr(0x20000, 4)], { extraFlags: (k) => (k === 1 ? VIRTQ_DESC_F_USED : 0) })],
  ];
  for (const [code, make, opts] of cases) {
    const s = setup(opts);
    make(s);
    assert.equal(s.q.pop(s.chain), false, code);
    assert.equal(s.q.error, code);
    assert.deepEqual(s.errors, [code]);
    assert.equal(s.q.pop(s.chain), false, "stays broken");
  }
});

test("packed unpop gives back the last chains popped, newest first", () => {
  const { q, dq, chain } = setup({ size: 4 });
  const a = dq.add([wr(0x20000, 8), wr(0x20100, 8)]);
  const b = dq.add([wr(0x20200, 8)]);
  assert.equal(q.pop(chain), true);
  assert.equal(q.pop(chain), true);
  q.unpop();
  q.unpop();
  q.unpop(); // nothing more to give back: ignored
  assert.equal(q.pop(chain), true);
  assert.equal(chain.head & 0xffff, a);
  assert.equal(q.pop(chain), true);
  assert.equal(chain.head & 0xffff, b);
});

test("packed notification suppression: the device event structure; enableNotifications looks again", () => {
  const { q, dq, chain } = setup({ size: 4 });
  q.disableNotifications();
  assert.equal(dq.deviceEvent().flags, RING_EVENT_FLAGS.disable);
  assert.equal(q.enableNotifications(), true, "nothing waiting");
  assert.equal(dq.deviceEvent().flags, RING_EVENT_FLAGS.enable);
  q.disableNotifications();
  dq.add([wr(0x20000, 8)]);
  assert.equal(q.enableNotifications(), false, "a list arrived while notifications were off");
  assert.equal(q.pop(chain), true);

  const e = setup({ size: 4, eventIdx: true });
  e.dq.add([wr(0x20000, 8)]);
  e.dq.add([wr(0x20000, 8)]);
  e.dq.add([wr(0x20000, 8)]);
  for (let i = 0; i < 3; i++) assert.equal(e.q.pop(e.chain), true);
  assert.equal(e.q.enableNotifications(), true);
  assert.deepEqual(e.dq.deviceEvent(), { flags: RING_EVENT_FLAGS.desc, offset: 3, wrap: 1 }, "notify me at the next descriptor");
  e.dq.add([wr(0x20000, 8)]);
  assert.equal(e.q.pop(e.chain), true);
  assert.deepEqual(e.dq.deviceEvent(), { flags: RING_EVENT_FLAGS.desc, offset: 0, wrap: 0 }, "moved on with pop, into lap 0");
});

test("packed needsInterrupt follows the driver event structure: DISABLE, ENABLE, and DESC across a wrap", () => {
  const { q, dq, chain } = setup({ size: 4, eventIdx: true });
  const cycle = (n: number): void => {
    for (let i = 0; i < n; i++) dq.add([wr(0x20000, 8)]);
    for (let i = 0; i < n; i++) {
      assert.equal(q.pop(chain), true);
      q.pushUsed(chain.head, 8);
    }
    dq.takeUsed();
  };
  cycle(1);
  assert.equal(q.needsInterrupt(), true, "the first interrupt is always sent");
  dq.setDriverEvent(RING_EVENT_FLAGS.disable);
  cycle(1);
  assert.equal(q.needsInterrupt(), false);
  assert.equal(q.needsInterrupt(), false, "nothing new");
  dq.setDriverEvent(RING_EVENT_FLAGS.enable);
  cycle(1);
  assert.equal(q.needsInterrupt(), true);
  // Device at position 3 of lap 1. Ask for the descriptor at 1 of lap 0 (two positions after the wrap).
  dq.setDriverEvent(RING_EVENT_FLAGS.desc, 1, 0);
  cycle(1); // used 3 -> 0 (lap 0)
  assert.equal(q.needsInterrupt(), false, "position 1 of lap 0 not used yet");
  cycle(2); // used 0, 1
  assert.equal(q.needsInterrupt(), true, "position 1 of lap 0 used");
  // An event in the previous lap that this batch did not cover: no interrupt.
  dq.setDriverEvent(RING_EVENT_FLAGS.desc, 3, 1);
  cycle(1); // used 2
  assert.equal(q.needsInterrupt(), false);
});

test("packed pushUsedBatch returns the chains of one request together, in order", () => {
  const { q, dq, chain } = setup({ size: 4 });
  const ids = [dq.add([wr(0x20000, 8)]), dq.add([wr(0x20100, 8), wr(0x20200, 8)]), dq.add([wr(0x20300, 8)])];
  const heads = new Uint32Array(3);
  const lens = new Uint32Array([8, 16, 3]);
  for (let i = 0; i < 3; i++) {
    assert.equal(q.pop(chain), true);
    heads[i] = chain.head;
  }
  q.pushUsedBatch(heads, lens, 3);
  assert.deepEqual(dq.takeUsed(), ids.map((id, i) => ({ id, len: lens[i]! })));
  assert.equal(q.usedIndex, 0, "4 descriptors used: back at 0");
  assert.equal(q.needsInterrupt(), true);
});

test("packed save/restore mid-stream: positions, wrap counters and what unpop may give back", () => {
  const { q, dq, chain, memory } = setup({ size: 3, eventIdx: true });
  for (let i = 0; i < 4; i++) {
    dq.add([wr(0x20000, 8)]);
    assert.equal(q.pop(chain), true);
    q.pushUsed(chain.head, 8);
    dq.takeUsed();
  }
  const id = dq.add([wr(0x20000, 8), wr(0x20100, 8)]);
  assert.equal(q.pop(chain), true);
  const saved = JSON.parse(JSON.stringify(q.save())) as ReturnType<VirtQueue["save"]>;
  assert.deepEqual(saved.packed?.recentPops.length, 3);
  const q2 = new VirtQueue(memory, 0, 256);
  assert.equal(q2.restore(saved), true);
  q2.unpop();
  assert.equal(q2.pop(chain), true, "the chain popped before the save, given back after the restore");
  assert.equal(chain.head & 0xffff, id);
  q2.pushUsed(chain.head, 16);
  assert.deepEqual(dq.takeUsed(), [{ id, len: 16 }]);
  const bad = { ...saved, lastAvail: 7 };
  assert.equal(new VirtQueue(memory, 0, 256).restore(bad), false, "a position outside the ring is refused");
});
