import { test } from "node:test";
import assert from "node:assert/strict";
import { IoBus } from "../../src/machine/bus.js";
import { bdf, PciConfigError, PciConfigSpace, PciHostBridge } from "../../src/machine/pci-host-bridge.js";
import { SharedStateArena } from "../../src/machine/shared-state.js";

const addr = (bus: number, dev: number, fn: number, reg: number) => (0x8000_0000 | (bus << 16) | (dev << 11) | (fn << 8) | reg) >>> 0;

function board(): { bus: IoBus; pci: PciHostBridge } {
  const bus = new IoBus();
  const pci = new PciHostBridge();
  bus.attach(pci);
  return { bus, pci };
}

test("host bridge 00:00.0 ids and class through the bus", () => {
  const { bus } = board();
  bus.pioWrite(0xcf8, 4, addr(0, 0, 0, 0));
  assert.equal(bus.pioRead(0xcf8, 4), addr(0, 0, 0, 0));
  assert.equal(bus.pioRead(0xcfc, 4), 0x1237_8086);
  assert.equal(bus.pioRead(0xcfc, 2), 0x8086);
  assert.equal(bus.pioRead(0xcfe, 2), 0x1237);
  assert.equal(bus.pioRead(0xcfd, 1), 0x80);
  bus.pioWrite(0xcf8, 4, addr(0, 0, 0, 8));
  assert.equal(bus.pioRead(0xcfc, 4) >>> 8, 0x060000);
  assert.equal(bus.pioRead(0xcfe, 1), 0x00);
  assert.equal(bus.pioRead(0xcff, 1), 0x06);
});

test("absent functions and disabled addresses read all-ones", () => {
  const { bus } = board();
  bus.pioWrite(0xcf8, 4, addr(0, 3, 0, 0));
  assert.equal(bus.pioRead(0xcfc, 4), 0xffff_ffff);
  assert.equal(bus.pioRead(0xcfc, 2), 0xffff);
  bus.pioWrite(0xcfc, 4, 0x1234); // ignored
  bus.pioWrite(0xcf8, 4, 0x0000_0000); // enable bit clear
  assert.equal(bus.pioRead(0xcfc, 4), 0xffff_ffff);
  bus.pioWrite(0xcf8, 4, addr(1, 0, 0, 0));
  assert.equal(bus.pioRead(0xcfc, 4), 0xffff_ffff);
});

test("0xCF9 is left for the reset-control device", () => {
  const { bus } = board();
  bus.attach({ name: "reset", regions: [{ name: "rc", space: "pio", start: 0xcf9, length: 1 }], read: () => 0, write: () => {} });
  // Byte writes at 0xCF8 do not latch an address.
  bus.pioWrite(0xcf8, 4, addr(0, 0, 0, 0));
  bus.pioWrite(0xcf8, 1, 0);
  assert.equal(bus.pioRead(0xcfc, 2), 0x8086);
});

test("attached functions see register offsets and sizes; writes honour masks", () => {
  const { bus, pci } = board();
  const seen: string[] = [];
  const fn = new PciConfigSpace();
  fn.bytes.set([0xf4, 0x1a, 0x00, 0x10], 0);
  fn.writeMask.fill(0xff, 0x10, 0x14);
  pci.attach(bdf(0, 2, 0), {
    configRead: (o, s) => (seen.push(`r${o}/${s}`), fn.configRead(o, s)),
    configWrite: (o, s, v) => (seen.push(`w${o}/${s}`), fn.configWrite(o, s, v)),
  });
  bus.pioWrite(0xcf8, 4, addr(0, 2, 0, 0));
  assert.equal(bus.pioRead(0xcfc, 4), 0x1000_1af4);
  bus.pioWrite(0xcf8, 4, addr(0, 2, 0, 0x10));
  bus.pioWrite(0xcfc, 4, 0xfebf_f000);
  bus.pioWrite(0xcfe, 1, 0xaa);
  assert.equal(bus.pioRead(0xcfc, 4), 0xfeaa_f000);
  bus.pioWrite(0xcf8, 4, addr(0, 2, 0, 0x00));
  bus.pioWrite(0xcfc, 2, 0xffff); // read-only vendor id
  assert.equal(bus.pioRead(0xcfc, 2), 0x1af4);
  assert.deepEqual(seen.slice(0, 4), ["r0/4", "w16/4", "w18/1", "r16/4"]);
  assert.throws(() => pci.attach(bdf(0, 2, 0), fn), PciConfigError);
  assert.throws(() => bdf(0, 32, 0), PciConfigError);
});

test("state is shared through the arena and survives save/restore", () => {
  const arena = SharedStateArena.create();
  const a = new PciHostBridge({ arena });
  const busA = new IoBus();
  busA.attach(a);
  busA.pioWrite(0xcf8, 4, addr(0, 0, 0, 4));
  busA.pioWrite(0xcfc, 2, 0x0007);
  // A second thread's view over the same bytes sees the latch and the command register.
  const arena2 = new SharedStateArena(arena.buffer);
  const b = new PciHostBridge({ arena: arena2, initialise: false });
  const busB = new IoBus();
  busB.attach(b);
  assert.equal(busB.pioRead(0xcf8, 4), addr(0, 0, 0, 4));
  assert.equal(busB.pioRead(0xcfc, 2), 0x0007);
  const saved = structuredClone(a.save());
  const c = new PciHostBridge();
  c.restore(saved);
  const busC = new IoBus();
  busC.attach(c);
  assert.equal(busC.pioRead(0xcfc, 2), 0x0007);
  assert.throws(() => c.restore({ ...saved, configAddress: 3 }), PciConfigError);
  assert.throws(() => c.restore({ kind: "uart", version: 1 }), PciConfigError);
  // Identity registers cannot be rewritten by a saved-state file.
  const forged = { ...saved, hostConfig: saved.hostConfig.map(() => 0x55) };
  c.restore(forged);
  busC.pioWrite(0xcf8, 4, addr(0, 0, 0, 0));
  assert.equal(busC.pioRead(0xcfc, 4), 0x1237_8086);
});

test("fuzz: random accesses never throw and stay in range", () => {
  const { bus, pci } = board();
  pci.attach(bdf(0, 1, 0), new PciConfigSpace());
  let seed = 12345;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
  const sizes = [1, 2, 4] as const;
  for (let i = 0; i < 5000; i++) {
    const port = 0xcf8 + Math.floor(rnd() * 8);
    const size = sizes[Math.floor(rnd() * 3)]!;
    if (rnd() < 0.5) bus.pioWrite(port, size, Math.floor(rnd() * 2 ** 32));
    else {
      const v = bus.pioRead(port, size);
      assert.ok(v >= 0 && v < 2 ** (8 * size));
    }
  }
});
