/** ResetControl (0xCF9), SystemControlPortB (0x61) and DebugExit. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { ResetControl } from "../../src/devices/emulated/reset-control.js";
import { SystemControlPortB } from "../../src/devices/emulated/system-control-port-b.js";
import { DebugExit } from "../../src/devices/emulated/debug-exit.js";
import { DeviceRestoreError } from "../../src/devices/emulated/saved-state.js";
import { IoBus } from "../../src/machine/bus.js";
import { ManualClock, RecordingPower, SeededRandom, freshState } from "./device-fakes.js";

test("reset control: bit 2 resets (0x06, 0x0E, 0x04); 0x02 alone does not; SYS_RST reads back", () => {
  const power = new RecordingPower();
  const rc = new ResetControl("reset-control", freshState(ResetControl.layout), { power });
  rc.reset();
  assert.deepEqual(rc.regions, [{ name: "reset", space: "pio", start: 0xcf9, length: 1 }]);
  rc.write("reset", 0, 1, 0x02);
  assert.deepEqual(power.resets, []);
  assert.equal(rc.read("reset", 0, 1), 0x02);
  for (const v of [0x06, 0x0e, 0x04]) rc.write("reset", 0, 1, v);
  assert.deepEqual(power.resets, ["cf9", "cf9", "cf9"]);
  assert.equal(rc.read("reset", 0, 1) & 0x04, 0, "RST_CPU self-clears");
  const b = new ResetControl("reset-control", freshState(ResetControl.layout), { power });
  b.restore(JSON.parse(JSON.stringify(rc.save())));
  assert.deepEqual(b.save(), rc.save());
  assert.throws(() => b.restore({ kind: "reset-control", version: 1, value: 0x04 }), DeviceRestoreError);
});

test("reset control shares the 0xCF8 dword with a PCI address register that claims only 0xCF8", () => {
  const power = new RecordingPower();
  const bus = new IoBus();
  let address = 0;
  bus.attach({
    name: "pci-address",
    regions: [{ name: "config-address", space: "pio", start: 0xcf8, length: 1 }],
    read: () => address,
    write: (_r, _o, _s, v) => { address = v; },
  });
  bus.attach(new ResetControl("reset-control", freshState(ResetControl.layout), { power }));
  bus.pioWrite(0xcf8, 4, 0x80000000);
  assert.equal(address, 0x80000000);
  assert.deepEqual(power.resets, []);
  bus.pioWrite(0xcf9, 1, 0x06);
  assert.deepEqual(power.resets, ["cf9"]);
});

test("port 0x61: low nibble read/write, refresh toggles, OUT2 follows the gate", () => {
  const clock = new ManualClock();
  const pb = new SystemControlPortB("port-b", freshState(SystemControlPortB.layout), { clock });
  pb.reset();
  pb.write("port-b", 0, 1, 0xff);
  assert.equal(pb.read("port-b", 0, 1) & 0x2f, 0x2f);
  pb.write("port-b", 0, 1, 0x02);
  assert.equal(pb.read("port-b", 0, 1) & 0xef, 0x02);
  const r0 = pb.read("port-b", 0, 1) & 0x10;
  clock.ns += 15_085n;
  assert.notEqual(pb.read("port-b", 0, 1) & 0x10, r0);
  assert.throws(() => pb.restore({ kind: "system-control-port-b", version: 1, value: 0x10 }), DeviceRestoreError);
});

test("debug exit: status (v << 1) | 1 and a power-off request", () => {
  const power = new RecordingPower();
  const de = new DebugExit("debug-exit", freshState(DebugExit.layout), { power }, { port: 0xf4, length: 1 });
  de.reset();
  assert.equal(de.exitStatus(), null);
  de.write("exit", 0, 1, 0x10);
  assert.equal(de.exitStatus(), 0x21);
  assert.deepEqual(power.powerOffs, ["debug-exit:33"]);
  const b = new DebugExit("debug-exit", freshState(DebugExit.layout), { power });
  b.restore(JSON.parse(JSON.stringify(de.save())));
  assert.equal(b.exitStatus(), 0x21);
  assert.throws(() => b.restore({ kind: "debug-exit", version: 1, exitStatus: 2 }), DeviceRestoreError);
});

test("fuzz: 100k random accesses to the small ports", () => {
  const power = new RecordingPower();
  const clock = new ManualClock();
  const rc = new ResetControl("reset-control", freshState(ResetControl.layout), { power });
  const pb = new SystemControlPortB("port-b", freshState(SystemControlPortB.layout), { clock });
  const de = new DebugExit("debug-exit", freshState(DebugExit.layout), { power });
  const rnd = new SeededRandom(0xcf9);
  let expectedResets = 0;
  for (let i = 0; i < 100_000; i++) {
    const size = rnd.pick([1, 2, 4] as const);
    const v = rnd.int(0x100000000);
    switch (rnd.int(6)) {
      case 0: rc.write("reset", 0, size, v); if (v & 4) expectedResets++; break;
      case 1: assert.equal(rc.read("reset", 0, size) & 0xf5, 0); break;
      case 2: pb.write("port-b", 0, size, v); break;
      case 3: assert.equal(pb.read("port-b", 0, size) & 0xc0, 0); break;
      case 4: de.write("exit", rnd.int(2), size, v); assert.equal(de.exitStatus()! & 1, 1); break;
      case 5: clock.ns += BigInt(rnd.int(100_000)); break;
    }
  }
  assert.equal(power.resets.length, expectedResets);
});
