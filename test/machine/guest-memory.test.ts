import { test } from "node:test";
import assert from "node:assert/strict";
import { ChunkedGuestMemory, GuestSpan, type RamRange } from "../../src/machine/guest-memory.js";

// Two RAM ranges with a hole between them, in 64 KiB host chunks.
const RANGES: RamRange[] = [
  { gpa: 0, length: 192 * 1024, fileOffset: 0 },
  { gpa: 0x10_0000, length: 64 * 1024, fileOffset: 192 * 1024 },
];
const CHUNK = 64 * 1024;

function memory(hostMapped: boolean): ChunkedGuestMemory {
  const backing = new Uint8Array(256 * 1024);
  // A pretend host address per chunk: 0x7f00_0000_0000 + its offset in the backing store.
  const host = (v: Uint8Array): number => 0x7f00_0000_0000 + v.byteOffset;
  return new ChunkedGuestMemory(RANGES, (off, len) => backing.subarray(off, off + len), CHUNK, hostMapped ? host : undefined);
}

test("locate: the chunk and offset of a span inside one chunk; nothing else", () => {
  const m = memory(false);
  const span = new GuestSpan();
  assert.equal(m.locate(0x1_0010, 16, span), true);
  assert.equal(span.offset, 0x10, "offset inside the second 64 KiB chunk");
  assert.equal(span.view.length, CHUNK);
  span.view[span.offset] = 0xab;
  assert.equal(m.bytes(0x1_0010, 1)[0], 0xab, "the located view is guest RAM itself");
  assert.ok(span.words !== undefined, "an aligned chunk also comes as 32-bit words");
  span.words[span.offset / 4] = 0x1234_5678;
  assert.deepEqual([...m.bytes(0x1_0010, 4)], [0x78, 0x56, 0x34, 0x12]);

  const untouched = new GuestSpan();
  for (const [gpa, len] of [
    [CHUNK - 8, 16], // crosses a chunk boundary
    [192 * 1024 - 4, 8], // runs off the end of RAM into the hole
    [0x8_0000, 1], // in the hole
    [0x10_0000 + 64 * 1024, 1], // past the last range
    [-16, 4],
    [0.5, 4],
    [Number.MAX_SAFE_INTEGER + 2, 1],
    [0, -1],
  ] as const) {
    assert.equal(m.locate(gpa, len, untouched), false, `0x${gpa.toString(16)}+${len}`);
    assert.equal(untouched.view.length, 0, "a refused lookup leaves the span as it was");
  }
  assert.equal(m.locate(0x10_0000, 64 * 1024, span), true, "a whole chunk");
  assert.equal(m.locate(0x10_0000 + 64 * 1024, 0, span), false, "an empty span at the end is not in RAM");
});

test("hostAddresses: every span's host address at once; false for plain buffers", () => {
  const m = memory(true);
  const gpas = Float64Array.of(0, 0x1_0004, 0x2_fff0, 0x10_0100);
  const out = new Float64Array(4);
  assert.equal(m.hostAddresses(gpas, 4, out), true);
  assert.deepEqual([...out], [0x7f00_0000_0000, 0x7f00_0001_0004, 0x7f00_0002_fff0, 0x7f00_0000_0000 + 192 * 1024 + 0x100]);
  assert.equal(m.hostAddresses(Float64Array.of(0, 0x8_0000), 2, out), false, "a span in the hole");
  assert.equal(memory(false).hostAddresses(gpas, 4, out), false, "plain JS buffers have no host address");
});

test("contiguousLength: cut at the chunk's end, 0 outside RAM", () => {
  const m = memory(false);
  assert.equal(m.contiguousLength(CHUNK - 8, 100), 8);
  assert.equal(m.contiguousLength(0x10, 100), 100);
  assert.equal(m.contiguousLength(0x8_0000, 100), 0);
  assert.equal(m.contiguousLength(0x10, 0), 0);
});
