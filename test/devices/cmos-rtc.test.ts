import { test } from "node:test";
import assert from "node:assert/strict";
import { CmosRtc } from "../../src/devices/emulated/cmos-rtc.js";
import { DeviceRestoreError } from "../../src/devices/emulated/saved-state.js";
import { ManualClock, RecordingIrqLine, SeededRandom, freshState } from "./device-fakes.js";

const P = "ports";

function make(config = {}) {
  const irq = new RecordingIrqLine();
  const clock = new ManualClock(); // 2024-01-15 12:34:56.000 UTC (a Monday)
  const state = freshState(CmosRtc.layout);
  const rtc = new CmosRtc("rtc", state, { irq, clock }, config);
  rtc.reset();
  return { rtc, irq, clock, state };
}

function rd(rtc: CmosRtc, index: number): number {
  rtc.write(P, 0, 1, index);
  return rtc.read(P, 1, 1);
}
function wr(rtc: CmosRtc, index: number, value: number): void {
  rtc.write(P, 0, 1, index);
  rtc.write(P, 1, 1, value);
}
function readTime(rtc: CmosRtc) {
  return [0, 2, 4, 6, 7, 8, 9, 0x32].map((i) => rd(rtc, i));
}

test("region: ports 0x70-0x71", () => {
  assert.deepEqual(make().rtc.regions, [{ name: "ports", space: "pio", start: 0x70, length: 2 }]);
});

test("power-on registers: A=0x26, B 24h BCD, D VRT", () => {
  const { rtc } = make();
  assert.equal(rd(rtc, 0x0a), 0x26);
  assert.equal(rd(rtc, 0x0b), 0x02);
  assert.equal(rd(rtc, 0x0d), 0x80);
});

test("time in BCD matches the clock", () => {
  const { rtc } = make();
  assert.deepEqual(readTime(rtc), [0x56, 0x34, 0x12, 0x02, 0x15, 0x01, 0x24, 0x20]);
});

test("time in binary and in 12-hour mode", () => {
  const { rtc, clock } = make();
  wr(rtc, 0x0b, 0x06);
  assert.deepEqual(readTime(rtc), [56, 34, 12, 2, 15, 1, 24, 20]);
  wr(rtc, 0x0b, 0x04); // binary, 12h: 12:34 is 12 PM
  assert.equal(rd(rtc, 4), 0x80 | 12);
  clock.wallMs = Date.UTC(2024, 0, 15, 0, 5, 0);
  assert.equal(rd(rtc, 4), 12, "00:05 is 12 AM");
  wr(rtc, 0x0b, 0x00); // BCD 12h
  clock.wallMs = Date.UTC(2024, 0, 15, 23, 0, 0);
  assert.equal(rd(rtc, 4), 0x80 | 0x11);
});

test("UIP is set only in the last 244 µs of each second", () => {
  const { rtc, clock } = make();
  assert.equal(rd(rtc, 0x0a) & 0x80, 0);
  clock.advanceNs(999_700_000n);
  assert.equal(rd(rtc, 0x0a) & 0x80, 0);
  clock.advanceNs(100_000n); // .9998
  assert.equal(rd(rtc, 0x0a) & 0x80, 0x80);
  assert.equal(rd(rtc, 0), 0x56, "still the old second");
  clock.advanceNs(200_000n);
  assert.equal(rd(rtc, 0x0a) & 0x80, 0);
  assert.equal(rd(rtc, 0), 0x57);
});

test("UIP works with a whole-millisecond wall clock (monotonic gives the phase)", () => {
  const { rtc, clock } = make();
  rd(rtc, 0x0a); // anchor
  clock.ns += 999_800_000n;
  clock.wallMs += 999; // wall clock only knows whole milliseconds
  assert.equal(rd(rtc, 0x0a) & 0x80, 0x80);
});

test("register C: update-ended flag, IRQ 8 when enabled, cleared by reading", () => {
  const { rtc, clock, irq } = make();
  wr(rtc, 0x0b, 0x12); // UIE
  rtc.tick();
  assert.equal(irq.level, false);
  const next = rtc.nextEventNs();
  assert.equal(next, 1_000_000_000n);
  clock.advanceNs(1_000_000_000n);
  rtc.tick();
  assert.equal(irq.level, true);
  assert.equal(rd(rtc, 0x0c) & 0xb0, 0x90, "IRQF + UF (PF runs too, at 1024 Hz, unenabled)");
  assert.equal(irq.level, false);
  assert.equal(rd(rtc, 0x0c) & 0xb0, 0x00);
});

test("register C polled without ticks, and flags without enables do not raise IRQ", () => {
  const { rtc, clock, irq } = make();
  rd(rtc, 0x0c);
  clock.advanceNs(1_000_000_000n);
  assert.equal(rd(rtc, 0x0c), 0x50, "UF and PF (1024 Hz) set, IRQF clear");
  assert.equal(irq.calls.filter((l) => l).length, 0);
});

test("periodic interrupt at the register A rate", () => {
  const { rtc, clock, irq } = make();
  wr(rtc, 0x0a, 0x2f); // 2 Hz
  wr(rtc, 0x0b, 0x42); // PIE
  clock.advanceNs(400_000_000n);
  rtc.tick();
  assert.equal(irq.level, false);
  assert.equal(rtc.nextEventNs(), 500_000_000n);
  clock.advanceNs(100_000_000n);
  rtc.tick();
  assert.equal(irq.level, true);
  assert.equal(rd(rtc, 0x0c) & 0xc0, 0xc0);
  assert.equal(irq.level, false);
});

test("alarm interrupt with don't-care bytes", () => {
  const { rtc, clock, irq } = make();
  wr(rtc, 0x01, 0x58); // seconds alarm :58
  wr(rtc, 0x03, 0xff);
  wr(rtc, 0x05, 0xff);
  wr(rtc, 0x0b, 0x22); // AIE
  clock.advanceNs(1_000_000_000n); // :57
  rtc.tick();
  assert.equal(irq.level, false);
  clock.advanceNs(1_000_000_000n); // :58
  rtc.tick();
  assert.equal(irq.level, true);
  assert.equal(rd(rtc, 0x0c) & 0xa0, 0xa0);
});

test("setting the time under SET freezes, then runs from the new time", () => {
  const { rtc, clock } = make();
  wr(rtc, 0x0b, 0x82);
  wr(rtc, 9, 0x30); // 2030
  wr(rtc, 8, 0x06);
  wr(rtc, 7, 0x01);
  wr(rtc, 4, 0x08);
  wr(rtc, 2, 0x00);
  wr(rtc, 0, 0x00);
  clock.advanceNs(5_000_000_000n);
  assert.deepEqual(readTime(rtc), [0x00, 0x00, 0x08, 0x07, 0x01, 0x06, 0x30, 0x20], "frozen (a Saturday)");
  wr(rtc, 0x0b, 0x02);
  clock.advanceNs(3_000_000_000n);
  assert.deepEqual(readTime(rtc), [0x03, 0x00, 0x08, 0x07, 0x01, 0x06, 0x30, 0x20]);
  assert.ok(rtc.save().offsetMs > 0);
});

test("setting a field without SET offsets the clock; century register", () => {
  const { rtc } = make();
  wr(rtc, 0x32, 0x21);
  assert.equal(rd(rtc, 9), 0x24);
  assert.equal(rd(rtc, 0x32), 0x21);
  assert.equal(rd(rtc, 0), 0x56);
  wr(rtc, 4, 0x99); // invalid BCD hour: ignored or normalised, never a crash
  assert.ok(Number.isFinite(rtc.save().offsetMs));
});

test("NVRAM, NMI bit and memory size", () => {
  const { rtc } = make({ ramBelow4GiB: 3 * 1024 ** 3, ramAbove4GiB: 1024 ** 3 });
  assert.equal(rd(rtc, 0x15) | (rd(rtc, 0x16) << 8), 640);
  assert.equal(rd(rtc, 0x17) | (rd(rtc, 0x18) << 8), 0xffff);
  assert.equal(rd(rtc, 0x34) | (rd(rtc, 0x35) << 8), (3 * 1024 ** 3 - 0x1000000) / 0x10000);
  assert.equal(rd(rtc, 0x5b) | (rd(rtc, 0x5c) << 8) | (rd(rtc, 0x5d) << 16), 0x4000);
  const viaTotal = make({ ramBytes: 4 * 1024 ** 3 }).rtc;
  assert.equal(rd(viaTotal, 0x5b) | (rd(viaTotal, 0x5c) << 8), 0x4000, "4 GiB: 1 GiB above the 3 GiB hole");
  assert.equal(rd(viaTotal, 0x34) | (rd(viaTotal, 0x35) << 8), (3 * 1024 ** 3 - 0x1000000) / 0x10000);
  wr(rtc, 0x40, 0xa5);
  assert.equal(rd(rtc, 0x40), 0xa5);
  rtc.write(P, 0, 1, 0x80 | 0x40);
  assert.equal(rtc.nmiDisabled(), true);
  assert.equal(rtc.read(P, 1, 1), 0xa5);
  rtc.reset();
  assert.equal(rd(rtc, 0x40), 0xa5, "NVRAM survives a machine reset");
});

test("save → restore into fresh state behaves identically", () => {
  const a = make();
  wr(a.rtc, 0x0b, 0x16); // binary, UIE
  wr(a.rtc, 0, 10);
  wr(a.rtc, 0x50, 0x77);
  a.clock.advanceNs(1_000_000_000n);
  a.rtc.tick();
  const saved = JSON.parse(JSON.stringify(a.rtc.save())) as unknown;
  const b = make();
  b.clock.ns = a.clock.ns + 123_456_789n; // another host: its own monotonic clock, same wall clock
  b.clock.wallMs = a.clock.wallMs;
  b.rtc.restore(saved);
  assert.equal(b.irq.level, true);
  assert.deepEqual(b.rtc.save(), a.rtc.save());
  b.clock.advanceNs(1_000_000_000n);
  a.clock.advanceNs(1_000_000_000n);
  assert.deepEqual(readTime(b.rtc), readTime(a.rtc));
  assert.equal(rd(b.rtc, 0x0c), rd(a.rtc, 0x0c));
});

test("restore rejects garbage", () => {
  const { rtc } = make();
  const good = rtc.save();
  for (const bad of [
    null, { ...good, kind: "x" }, { ...good, cmos: [1, 2] }, { ...good, offsetMs: Infinity }, { ...good, offsetMs: "0" },
    { ...good, registerC: 0x80 }, { ...good, index: 0x80 }, { ...good, frozenMs: 5 }, { ...good, registerB: 0x82 },
  ]) assert.throws(() => rtc.restore(bad), DeviceRestoreError, JSON.stringify(bad));
});

test("fuzz: 100k random accesses keep the invariants", () => {
  const { rtc, irq, clock, state } = make();
  const rnd = new SeededRandom(0x146818);
  for (let i = 0; i < 100_000; i++) {
    const op = rnd.int(12);
    if (op < 4) rtc.read(P, rnd.int(2), rnd.pick([1, 1, 2, 4] as const));
    else if (op < 9) {
      // Mostly register indices, sometimes anything.
      if (rnd.int(2)) rtc.write(P, 0, 1, rnd.int(2) ? rnd.int(0x0e) : rnd.int(256));
      rtc.write(P, rnd.int(2), rnd.pick([1, 1, 2, 4] as const), rnd.int(0x100000000));
    } else if (op < 11) {
      // Move the clocks, now and then backwards.
      const step = BigInt(rnd.int(2_000_000_000));
      clock.ns += step;
      clock.wallMs += rnd.int(10) === 0 ? -rnd.int(5_000_000) : Number(step) / 1e6;
    } else rtc.tick();
    assert.equal(irq.level, rtc.irqCondition());
    assert.ok(Number.isFinite(state.offsetMs) && Number.isFinite(state.anchorMs));
    assert.equal(state.regC & 0x8f, 0);
  }
  const saved = rtc.save();
  const b = make();
  b.rtc.restore(saved);
  assert.deepEqual({ ...b.rtc.save() }, saved);
});
