import { test } from "node:test";
import assert from "node:assert/strict";
import { Pvpanic, PVPANIC_EVENT } from "../../src/devices/emulated/pvpanic.js";
import { RecordingPower, SeededRandom, freshState } from "./device-fakes.js";

function make() {
  const power = new RecordingPower();
  const dev = new Pvpanic("pvpanic", freshState(Pvpanic.layout), { power });
  dev.reset();
  return { dev, power };
}

test("a read announces the events the host understands", () => {
  const { dev } = make();
  assert.equal(dev.read("event", 0, 1), PVPANIC_EVENT.panicked | PVPANIC_EVENT.crashLoaded);
  assert.deepEqual(dev.regions, [{ name: "event", space: "pio", start: 0x505, length: 1 }]);
});

test("PANICKED reports a guest panic to the power control; CRASH_LOADED is recorded only", () => {
  const { dev, power } = make();
  dev.write("event", 0, 1, PVPANIC_EVENT.crashLoaded);
  assert.deepEqual(power.panics, []);
  assert.equal(dev.events, PVPANIC_EVENT.crashLoaded);
  dev.write("event", 0, 1, PVPANIC_EVENT.panicked);
  assert.equal(power.panics.length, 1);
  assert.match(power.panics[0]!, /panic/);
  assert.equal(dev.save().events, 3);
  dev.reset();
  assert.equal(dev.events, 0);
});

test("fuzz: 100k random accesses never throw; only byte writes with bit 0 report a panic", () => {
  const { dev, power } = make();
  const rnd = new SeededRandom(505);
  let expected = 0;
  for (let i = 0; i < 100_000; i++) {
    const size = rnd.pick([1, 2, 4] as const);
    const v = rnd.int(2 ** 32);
    if (rnd.int(2) === 0) dev.read("event", 0, size);
    else {
      dev.write("event", 0, size, v);
      if (size === 1 && (v & 1) !== 0) expected++;
    }
  }
  assert.ok(expected > 5_000, `only ${expected} panicking writes were generated`);
  assert.equal(power.panics.length, expected);
});
