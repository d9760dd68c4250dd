import { test } from "node:test";
import assert from "node:assert/strict";
import { I8042 } from "../../src/devices/emulated/i8042.js";
import { DeviceRestoreError } from "../../src/devices/emulated/saved-state.js";
import { RecordingIrqLine, RecordingPower, SeededRandom, freshState } from "./device-fakes.js";

function make() {
  const kbdIrq = new RecordingIrqLine();
  const auxIrq = new RecordingIrqLine();
  const power = new RecordingPower();
  const state = freshState(I8042.layout);
  const kbc = new I8042("i8042", state, { kbdIrq, auxIrq, power });
  kbc.reset();
  return { kbc, kbdIrq, auxIrq, power, state };
}

const status = (k: I8042) => k.read("command", 0, 1);
const cmd = (k: I8042, c: number) => k.write("command", 0, 1, c);
const data = (k: I8042, d: number) => k.write("data", 0, 1, d);
/** Drain the output buffer the way i8042_flush does. */
function drain(k: I8042): number[] {
  const out: number[] = [];
  while (status(k) & 0x01) out.push(k.read("data", 0, 1));
  return out;
}

test("regions: 0x60 and 0x64", () => {
  const { kbc } = make();
  assert.deepEqual(kbc.regions.map((r) => [r.name, r.start, r.length]), [["data", 0x60, 1], ["command", 0x64, 1]]);
});

test("status after power-on: empty, keyboard unlocked, system flag", () => {
  const { kbc } = make();
  assert.equal(status(kbc) & 0x01, 0);
  assert.equal(status(kbc) & 0x14, 0x14);
});

test("self-test 0xAA → 0x55, interface tests → 0", () => {
  const { kbc } = make();
  cmd(kbc, 0xaa);
  assert.deepEqual(drain(kbc), [0x55]);
  cmd(kbc, 0xab);
  assert.deepEqual(drain(kbc), [0x00]);
  cmd(kbc, 0xa9);
  assert.deepEqual(drain(kbc), [0x00]);
});

test("command byte read/write and port enable/disable bits", () => {
  const { kbc } = make();
  cmd(kbc, 0x20);
  assert.deepEqual(drain(kbc), [0x45]);
  cmd(kbc, 0x60);
  data(kbc, 0x56);
  cmd(kbc, 0x20);
  assert.deepEqual(drain(kbc), [0x56]);
  cmd(kbc, 0xae);
  cmd(kbc, 0xa7);
  cmd(kbc, 0x20);
  assert.deepEqual(drain(kbc), [0x66]);
  cmd(kbc, 0xa8);
  cmd(kbc, 0xad);
  cmd(kbc, 0x20);
  assert.deepEqual(drain(kbc), [0x56]);
});

test("reset: 0xFE pulse and output-port write with bit 0 clear", () => {
  const { kbc, power } = make();
  cmd(kbc, 0xfe);
  assert.deepEqual(power.resets, ["i8042"]);
  cmd(kbc, 0xff); // pulses nothing
  assert.equal(power.resets.length, 1);
  cmd(kbc, 0xd1);
  data(kbc, 0xdf);
  assert.equal(power.resets.length, 1);
  cmd(kbc, 0xd0);
  assert.equal(drain(kbc)[0]! & 0x03, 0x03);
  cmd(kbc, 0xd1);
  data(kbc, 0xde);
  assert.deepEqual(power.resets, ["i8042", "i8042"]);
});

test("atkbd probe: GET ID answers ACK, 0xAB, 0x83 (0x41 translated), with IRQ 1", () => {
  const { kbc, kbdIrq } = make();
  data(kbc, 0xf2);
  assert.equal(kbdIrq.level, true);
  assert.deepEqual(drain(kbc), [0xfa, 0xab, 0x41]);
  assert.equal(kbdIrq.level, false);
  cmd(kbc, 0x60);
  data(kbc, 0x01); // untranslated, KBD interrupt on
  data(kbc, 0xf2);
  assert.deepEqual(drain(kbc), [0xfa, 0xab, 0x83]);
});

test("keyboard commands: reset BAT, scanning, LEDs, typematic, echo, unknown", () => {
  const { kbc } = make();
  data(kbc, 0xff);
  assert.deepEqual(drain(kbc), [0xfa, 0xaa]);
  data(kbc, 0xf5);
  assert.deepEqual(drain(kbc), [0xfa]);
  assert.equal(kbc.keyboardInput(Uint8Array.of(0x1c)), 0, "scanning off");
  data(kbc, 0xf4);
  assert.deepEqual(drain(kbc), [0xfa]);
  data(kbc, 0xed);
  data(kbc, 0x07);
  data(kbc, 0xf3);
  data(kbc, 0x20);
  assert.deepEqual(drain(kbc), [0xfa, 0xfa, 0xfa, 0xfa]);
  data(kbc, 0xf0);
  data(kbc, 0x00);
  assert.deepEqual(drain(kbc), [0xfa, 0xfa, 0x02]);
  data(kbc, 0xee);
  assert.deepEqual(drain(kbc), [0xee]);
  data(kbc, 0x12);
  assert.deepEqual(drain(kbc), [0xfe]);
  assert.equal(kbc.keyboardInput(Uint8Array.of(0x1c, 0x9c)), 2);
  assert.deepEqual(drain(kbc), [0x1c, 0x9c]);
});

test("interrupts follow the command byte", () => {
  const { kbc, kbdIrq } = make();
  cmd(kbc, 0x60);
  data(kbc, 0x44); // KBDINT off
  data(kbc, 0xf4);
  assert.equal(kbdIrq.level, false);
  assert.equal(status(kbc) & 0x01, 1);
  cmd(kbc, 0x60);
  data(kbc, 0x45);
  assert.equal(kbdIrq.level, true, "pending byte raises the line once enabled");
  drain(kbc);
  assert.equal(kbdIrq.level, false);
});

test("no aux device: Linux i8042_check_aux concludes there is none, without timeouts", () => {
  const { kbc, auxIrq } = make();
  // AUX_LOOP 0x5a: a byte comes back, but without AUXDATA → Linux's __i8042_command fails.
  cmd(kbc, 0xd3);
  data(kbc, 0x5a);
  assert.equal(status(kbc) & 0x21, 0x01);
  // AUX_TEST replaces the unread byte.
  cmd(kbc, 0xa9);
  assert.deepEqual(drain(kbc), [0x00]);
  // Bytes sent to the mouse: 0xFE with AUXDATA | TIMEOUT, IRQ 12 when enabled.
  cmd(kbc, 0x60);
  data(kbc, 0x47);
  cmd(kbc, 0xd4);
  data(kbc, 0xf2);
  assert.equal(status(kbc) & 0x61, 0x61);
  assert.equal(auxIrq.level, true);
  assert.equal(kbc.read("data", 0, 1), 0xfe);
  assert.equal(auxIrq.level, false);
});

test("save → restore into fresh state behaves identically", () => {
  const a = make();
  data(a.kbc, 0xf2);
  a.kbc.read("data", 0, 1);
  cmd(a.kbc, 0x60); // pending data byte
  const saved = JSON.parse(JSON.stringify(a.kbc.save())) as unknown;
  const b = make();
  b.kbc.restore(saved);
  assert.deepEqual(b.kbc.save(), a.kbc.save());
  assert.equal(b.kbdIrq.level, a.kbdIrq.level);
  for (const k of [a.kbc, b.kbc]) data(k, 0x05);
  assert.deepEqual(drain(b.kbc), drain(a.kbc));
  for (const k of [a.kbc, b.kbc]) cmd(k, 0x20);
  assert.deepEqual(drain(b.kbc), drain(a.kbc));
});

test("restore rejects garbage", () => {
  const { kbc } = make();
  const good = kbc.save();
  for (const bad of [
    undefined, {}, { ...good, kind: "uart16550" }, { ...good, outputPort: 0 }, { ...good, pendingCommand: 0xaa },
    { ...good, scancodeSet: 7 }, { ...good, output: new Array(17).fill([0, 0]) }, { ...good, output: [[1, 0x80]] },
    { ...good, output: [[300, 0]] }, { ...good, output: [5] }, { ...good, keyboardPendingCommand: 0xf4 },
  ]) assert.throws(() => kbc.restore(bad), DeviceRestoreError, JSON.stringify(bad));
});

test("fuzz: 100k random accesses keep the invariants", () => {
  const { kbc, kbdIrq, auxIrq, state } = make();
  const rnd = new SeededRandom(0x8042);
  const regions = ["data", "command"] as const;
  for (let i = 0; i < 100_000; i++) {
    const op = rnd.int(10);
    const region = rnd.pick(regions);
    if (op < 4) kbc.read(region, 0, rnd.pick([1, 2, 4] as const));
    else if (op < 9) {
      // Bias commands toward the defined ones, but avoid nothing.
      const v = region === "command" && rnd.int(2) ? rnd.pick([0x20, 0x60, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xad, 0xae, 0xd0, 0xd1, 0xd2, 0xd3, 0xd4, 0xfe]) : rnd.int(0x100000000);
      kbc.write(region, 0, rnd.pick([1, 2, 4] as const), v);
    } else kbc.keyboardInput(Uint8Array.of(rnd.int(256), rnd.int(256)));
    assert.ok(state.qCount <= 16 && state.qHead < 16);
    assert.equal(kbdIrq.level, kbc.keyboardIrqCondition());
    assert.equal(auxIrq.level, kbc.auxIrqCondition());
    assert.ok(state.outputPort & 1);
  }
  const saved = kbc.save();
  const b = make();
  b.kbc.restore(saved);
  assert.deepEqual(b.kbc.save(), saved);
});
