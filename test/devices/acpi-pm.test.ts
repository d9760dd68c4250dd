import { test } from "node:test";
import assert from "node:assert/strict";
import { AcpiPm } from "../../src/devices/emulated/acpi-pm.js";
import { DeviceRestoreError } from "../../src/devices/emulated/saved-state.js";
import { ManualClock, RecordingIrqLine, RecordingPower, SeededRandom, freshState } from "./device-fakes.js";

function make() {
  const sci = new RecordingIrqLine();
  const clock = new ManualClock(1_000_000n);
  const power = new RecordingPower();
  const state = freshState(AcpiPm.layout);
  const pm = new AcpiPm("acpi-pm", state, { sci, clock, power });
  pm.reset();
  return { pm, sci, clock, power, state };
}

const EVT = "pm1-event", CNT = "pm1-control", TMR = "pm-timer";

test("regions: PM1a_EVT 0x600/4, PM1a_CNT 0x604/2, PM_TMR 0x608/4", () => {
  assert.deepEqual(make().pm.regions.map((r) => [r.name, r.start, r.length]), [[EVT, 0x600, 4], [CNT, 0x604, 2], [TMR, 0x608, 4]]);
});

test("SCI_EN reads 1; SLP_TYP kept; SLP_EN write-only", () => {
  const { pm } = make();
  assert.equal(pm.read(CNT, 0, 2), 0x0001);
  pm.write(CNT, 0, 2, 3 << 10);
  assert.equal(pm.read(CNT, 0, 2), (3 << 10) | 1);
  pm.write(CNT, 0, 2, (3 << 10) | 0x2000);
  assert.equal(pm.read(CNT, 0, 2) & 0x2000, 0);
});

test("poweroff: SLP_TYP=5 | SLP_EN; other sleep types ignored", () => {
  const { pm, power } = make();
  pm.write(CNT, 0, 2, (1 << 10) | 0x2000);
  pm.write(CNT, 0, 2, (0 << 10) | 0x2000);
  pm.write(CNT, 0, 2, 5 << 10); // type without enable
  assert.deepEqual(power.powerOffs, []);
  pm.write(CNT, 0, 2, (5 << 10) | 0x2000);
  assert.deepEqual(power.powerOffs, ["acpi-s5"]);
  // Byte-wide write of the high byte (SLP_EN | SLP_TYP=5 is 0x34 there).
  pm.write(CNT, 1, 1, 0x34);
  assert.deepEqual(power.powerOffs, ["acpi-s5", "acpi-s5"]);
  assert.deepEqual(power.resets, []);
});

test("power button raises the SCI only when PWRBTN_EN is set; status is write-1-to-clear", () => {
  const { pm, sci } = make();
  pm.pressPowerButton();
  assert.equal(pm.read(EVT, 0, 2) & 0x0100, 0x0100);
  assert.equal(sci.level, false, "not enabled");
  pm.write(EVT, 2, 2, 0x0100); // PWRBTN_EN
  assert.equal(pm.read(EVT, 2, 2), 0x0100);
  assert.equal(sci.level, true);
  pm.write(EVT, 0, 2, 0x0001); // clearing another bit leaves it
  assert.equal(sci.level, true);
  pm.write(EVT, 0, 2, 0x0100);
  assert.equal(pm.read(EVT, 0, 2) & 0x0100, 0);
  assert.equal(sci.level, false);
  pm.write(EVT, 0, 4, 0x0100_0000); // dword: EN stays, nothing to clear
  pm.pressPowerButton();
  assert.equal(sci.level, true);
  pm.write(EVT, 0, 4, 0x0000_0100); // dword: clears STS and zeroes EN
  assert.equal(sci.level, false);
  assert.equal(pm.read(EVT, 0, 4), 0);
});

test("PM timer counts at 3.579545 MHz and wraps at 24 bits", () => {
  const { pm, clock } = make();
  const t0 = pm.read(TMR, 0, 4);
  clock.advanceNs(1_000_000_000n);
  const t1 = pm.read(TMR, 0, 4);
  assert.equal((t1 - t0 + 0x1000000) % 0x1000000, 3_579_545);
  clock.advanceNs(10_000_000_000n); // past a 24-bit wrap (4.69 s)
  const t2 = pm.read(TMR, 0, 4);
  assert.ok(t2 <= 0xffffff);
  assert.equal(t2, Number(((clock.ns * 3_579_545n) / 1_000_000_000n) & 0xffffffn));
  pm.write(TMR, 0, 4, 0);
  assert.equal(pm.read(TMR, 0, 4), t2, "read-only");
});

test("TMR_STS on bit-23 carry; SCI with TMR_EN; nextEventNs", () => {
  const { pm, clock, sci } = make();
  pm.write(EVT, 2, 2, 0x0001);
  const next = pm.nextEventNs()!;
  assert.ok(next > clock.ns);
  clock.ns = next - 1000n;
  pm.tick();
  assert.equal(sci.level, false);
  clock.ns = next;
  pm.tick();
  assert.equal(sci.level, true);
  pm.write(EVT, 0, 2, 0x0001);
  assert.equal(sci.level, false);
});

test("save → restore into fresh state behaves identically; the timer resumes", () => {
  const a = make();
  a.pm.write(EVT, 2, 2, 0x0100);
  a.pm.pressPowerButton();
  a.pm.write(CNT, 0, 2, 2 << 10);
  a.clock.advanceNs(123_456_789n);
  const saved = JSON.parse(JSON.stringify(a.pm.save())) as unknown;
  const b = make();
  b.clock.ns = 99_000_000_000_000n; // another host's monotonic clock
  b.pm.restore(saved);
  assert.equal(b.sci.level, true);
  assert.deepEqual(b.pm.save(), a.pm.save());
  a.clock.advanceNs(1_000_000n);
  b.clock.advanceNs(1_000_000n);
  const da = a.pm.read(TMR, 0, 4), db = b.pm.read(TMR, 0, 4);
  assert.ok(Math.abs(da - db) <= 1, `${da} vs ${db}`);
  assert.equal(b.pm.read(CNT, 0, 2), a.pm.read(CNT, 0, 2));
});

test("restore rejects garbage", () => {
  const { pm } = make();
  const good = pm.save();
  for (const bad of [
    null, [], { ...good, kind: "acpi" }, { ...good, version: 0 }, { ...good, timer: 0x1000000 }, { ...good, pm1Status: 0x8000 },
    { ...good, pm1Enable: 0x10000 }, { ...good, pm1Control: 0x2000 }, { ...good, timer: 1.5 },
  ]) assert.throws(() => pm.restore(bad), DeviceRestoreError, JSON.stringify(bad));
});

test("fuzz: 100k random accesses and button presses keep the invariants", () => {
  const { pm, sci, clock, state } = make();
  const rnd = new SeededRandom(0xac91);
  const regions = [[EVT, 4], [CNT, 2], [TMR, 4]] as const;
  for (let i = 0; i < 100_000; i++) {
    const op = rnd.int(12);
    const [region, length] = rnd.pick(regions);
    if (op < 4) {
      const v = pm.read(region, rnd.int(length), rnd.pick([1, 2, 4] as const));
      assert.ok(v >= 0 && v <= 0xffffffff);
    } else if (op < 9) pm.write(region, rnd.int(length), rnd.pick([1, 2, 4] as const), rnd.int(0x100000000));
    else if (op < 10) pm.pressPowerButton();
    else if (op < 11) clock.ns += BigInt(rnd.int(3_000_000_000));
    else pm.tick();
    assert.equal(sci.level, pm.sciCondition());
    assert.equal(state.sts & ~0x0101, 0);
    assert.equal(state.en & ~0x0521, 0);
    assert.ok(pm.timerValue() <= 0xffffff);
  }
  const saved = pm.save();
  const b = make();
  b.clock.ns = clock.ns;
  b.pm.restore(saved);
  assert.deepEqual(b.pm.save(), saved);
});
