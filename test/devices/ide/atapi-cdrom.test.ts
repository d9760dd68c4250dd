import { test } from "node:test";
import assert from "node:assert/strict";
import { ATA, AtaDriver, MemoryDisk, idString, makeRig } from "./ide-test-driver.js";

const BLOCK = 2048;

/** An ISO-like image: block n starts with "BLK" + n, a primary volume descriptor at block 16. */
function isoImage(blocks: number): MemoryDisk {
  const disk = new MemoryDisk(blocks * BLOCK, true, 2048, "test.iso");
  const buf = new Uint8Array(blocks * BLOCK);
  for (let n = 0; n < blocks; n++) {
    const b = buf.subarray(n * BLOCK, (n + 1) * BLOCK);
    for (let i = 0; i < BLOCK; i++) b[i] = (n * 7 + i) & 0xff;
    b.set(Buffer.from(`BLK${n}`), 0);
  }
  if (blocks > 16) buf.set([1, ...Buffer.from("CD001"), 1], 16 * BLOCK);
  disk.fill(0, buf);
  return disk;
}

function cdRig(disc: MemoryDisk | "empty" = isoImage(64)) {
  const device = disc === "empty" ? undefined : disc;
  const rig = makeRig([
    { channel: 0, unit: 0, kind: "disk", device: new MemoryDisk(1 << 20) },
    { channel: 1, unit: 0, kind: "cdrom", device, serial: "CD-SERIAL-1" },
  ]);
  return { rig, drv: new AtaDriver(rig, 1), ide: rig.ide };
}

interface PacketResult {
  data: Uint8Array;
  status: number;
  error: number;
  blocks: number[];
  interrupts: number;
}

/** Issue a PACKET command the libata way (PIO, or DMA with a PRD table at 0x1000 into 0x10000). */
function packet(drv: AtaDriver, cdb: number[], opts: { limit?: number; dma?: number } = {}): PacketResult {
  const limit = opts.limit ?? 0xfffe;
  drv.irq.calls.length = 0;
  if (opts.dma !== undefined) {
    drv.writePrd(0x1000, [[0x10000, opts.dma]]);
    drv.bmSetup(0x1000, true);
  }
  drv.outb(ATA.FEAT, opts.dma !== undefined ? 1 : 0);
  drv.outb(ATA.LBAM, limit & 0xff);
  drv.outb(ATA.LBAH, limit >>> 8);
  drv.select(0);
  drv.outb(ATA.CMD, 0xa0);
  assert.equal(drv.altStatus() & (ATA.BSY | ATA.DRQ), ATA.DRQ, "DRQ for the packet");
  assert.equal(drv.inb(ATA.NSECT) & 3, 1, "CoD=1 IO=0");
  assert.equal(drv.irq.level, false, "accelerated DRQ: no interrupt for the packet");
  const c = new Uint8Array(12);
  c.set(cdb);
  drv.writeData(c);
  if (opts.dma !== undefined) drv.bmStart();
  const chunks: Uint8Array[] = [];
  const blocks: number[] = [];
  for (let guard = 0; guard < 100_000; guard++) {
    assert.equal(drv.irq.level, true, "interrupt for each phase");
    const st = drv.status();
    if ((st & ATA.DRQ) === 0) {
      assert.equal(drv.inb(ATA.NSECT) & 3, 3, "completion: IO=1 CoD=1");
      if (opts.dma !== undefined) drv.bmStop();
      const data = opts.dma !== undefined ? drv.rig.memory.read(0x10000, opts.dma) : new Uint8Array(Buffer.concat(chunks));
      return { data, status: st, error: drv.inb(ATA.ERR), blocks, interrupts: drv.irq.rises() };
    }
    assert.equal(drv.inb(ATA.NSECT) & 3, 2, "data-in: IO=1 CoD=0");
    const n = drv.inb(ATA.LBAM) | (drv.inb(ATA.LBAH) << 8);
    blocks.push(n);
    chunks.push(drv.readData(n, 2));
  }
  throw new Error("packet command did not complete");
}

const ok = (r: PacketResult) => assert.equal(r.status & ATA.ERR_BIT, 0, `status 0x${r.status.toString(16)} error 0x${r.error.toString(16)}`);

function sense(drv: AtaDriver): [number, number, number] {
  const r = packet(drv, [0x03, 0, 0, 0, 18, 0]);
  ok(r);
  assert.equal(r.data[0], 0x70);
  return [r.data[2]! & 0x0f, r.data[12]!, r.data[13]!];
}

test("ATAPI probe: signature 14h/EBh with Status 00h, IDENTIFY DEVICE aborts with the signature, IDENTIFY PACKET DEVICE", () => {
  const { drv } = cdRig();
  assert.equal(drv.devchk(0), true);
  drv.softreset();
  drv.select(0);
  assert.equal(drv.altStatus(), 0, "DRDY clear after reset");
  assert.equal(drv.classify(0), "atapi");
  drv.select(1);
  assert.equal(drv.classify(1), "none", "absent device 1 behind a packet device");
  drv.issue(0xec, { device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 1);
  assert.equal(drv.inb(ATA.ERR) & ATA.ABRT, ATA.ABRT);
  assert.deepEqual([drv.inb(ATA.LBAM), drv.inb(ATA.LBAH)], [0x14, 0xeb]);
  const id = drv.identify(0, 0xa1);
  assert.equal(id[0], 0x85c0, "ATAPI, CD-ROM set, removable, accelerated DRQ, 12-byte packets");
  assert.equal(idString(id, 27, 20), "PARTIS DVD-ROM");
  assert.equal(idString(id, 10, 10), "CD-SERIAL-1");
  assert.equal(id[49]! & 0x0300, 0x0300);
  assert.equal(id[63], 0x0007);
  drv.issue(0xef, { feature: 0x03, nsect: 0x22, device: 0xa0 });
  assert.equal(drv.status() & ATA.ERR_BIT, 0);
  assert.equal(drv.identify(0, 0xa1)[63], 0x0407);
  drv.issue(0x08, { device: 0xa0 }); // DEVICE RESET
  assert.deepEqual([drv.inb(ATA.LBAM), drv.inb(ATA.LBAH), drv.altStatus()], [0x14, 0xeb, 0]);
});

test("INQUIRY: CD/DVD device, removable, vendor/product; VPD pages; short allocation length", () => {
  const { drv } = cdRig();
  const r = packet(drv, [0x12, 0, 0, 0, 96, 0]);
  ok(r);
  assert.equal(r.data.length, 36);
  assert.equal(r.data[0], 0x05);
  assert.equal(r.data[1], 0x80);
  assert.equal(Buffer.from(r.data.subarray(8, 16)).toString(), "PARTIS  ");
  assert.equal(Buffer.from(r.data.subarray(16, 32)).toString().trim(), "DVD-ROM");
  assert.equal(packet(drv, [0x12, 0, 0, 0, 5, 0]).data.length, 5);
  const vpd = packet(drv, [0x12, 1, 0x00, 0, 255, 0]);
  assert.deepEqual([...vpd.data], [0x05, 0x00, 0x00, 0x02, 0x00, 0x80]);
  assert.equal(Buffer.from(packet(drv, [0x12, 1, 0x80, 0, 255, 0]).data.subarray(4)).toString(), "CD-SERIAL-1");
  const bad = packet(drv, [0x12, 1, 0x83, 0, 255, 0]);
  assert.equal(bad.status & ATA.ERR_BIT, 1);
  assert.deepEqual(sense(drv), [5, 0x24, 0]);
});

test("READ CAPACITY and READ(10) by PIO: known block contents, DRQ blocks within the byte count limit", () => {
  const { drv } = cdRig();
  const cap = packet(drv, [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
  ok(cap);
  assert.deepEqual([...cap.data], [0, 0, 0, 63, 0, 0, 8, 0]);
  const pvd = packet(drv, [0x28, 0, 0, 0, 0, 16, 0, 0, 1, 0]);
  ok(pvd);
  assert.equal(Buffer.from(pvd.data.subarray(1, 6)).toString(), "CD001");
  const r = packet(drv, [0x28, 0, 0, 0, 0, 3, 0, 0, 5, 0], { limit: 0x1000 });
  ok(r);
  assert.equal(r.data.length, 5 * BLOCK);
  assert.ok(r.blocks.every((n) => n <= 0x1000 && n % 2 === 0), `blocks ${r.blocks.join(",")}`);
  for (let k = 0; k < 5; k++) assert.equal(Buffer.from(r.data.subarray(k * BLOCK, k * BLOCK + 4)).toString(), `BLK${3 + k}`);
  assert.equal(r.data[BLOCK + 100], ((4 * 7 + 100) & 0xff));
  assert.equal(r.interrupts, r.blocks.length + 1, "one interrupt per DRQ block and one at completion");
  const odd = packet(drv, [0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], { limit: 0x0801 });
  ok(odd);
  assert.deepEqual(odd.blocks, [0x800, 0x800], "odd limits are used as the even value below");
  const big = packet(drv, [0x28, 0, 0, 0, 0, 0, 0, 0, 40, 0]); // more than the 64 KiB buffer
  ok(big);
  assert.equal(big.data.length, 40 * BLOCK);
  assert.equal(Buffer.from(big.data.subarray(39 * BLOCK, 39 * BLOCK + 5)).toString(), "BLK39");
});

test("READ(12) and INQUIRY by bus-master DMA", () => {
  const { drv } = cdRig();
  const r = packet(drv, [0xa8, 0, 0, 0, 0, 10, 0, 0, 0, 2, 0, 0], { dma: 2 * BLOCK });
  ok(r);
  assert.equal(Buffer.from(r.data.subarray(0, 5)).toString(), "BLK10");
  assert.equal(Buffer.from(r.data.subarray(BLOCK, BLOCK + 5)).toString(), "BLK11");
  assert.equal(r.interrupts, 1);
  assert.equal(drv.bmRead(2) & 0x06, 0x04);
  const inq = packet(drv, [0x12, 0, 0, 0, 36, 0], { dma: 36 + 12 });
  ok(inq);
  assert.equal(inq.data[0], 0x05);
  const short = packet(drv, [0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0], { dma: BLOCK });
  assert.equal(short.status & ATA.ERR_BIT, 1, "PRD table shorter than the transfer");
  assert.equal(drv.bmRead(2) & 0x02, 0x02);
  assert.equal(short.error >> 4, 0x0b, "ABORTED COMMAND");
});

test("READ(10) out of range: ILLEGAL REQUEST / LBA out of range; unknown packet: invalid command operation code", () => {
  const { drv } = cdRig();
  const r = packet(drv, [0x28, 0, 0, 0, 0, 63, 0, 0, 2, 0]);
  assert.equal(r.status & ATA.ERR_BIT, 1);
  assert.equal(r.error >> 4, 5);
  assert.deepEqual(sense(drv), [5, 0x21, 0]);
  assert.deepEqual(sense(drv), [0, 0, 0], "sense is cleared once reported");
  const u = packet(drv, [0xff, 0, 0, 0, 0, 0]);
  assert.equal(u.error, 0x54);
  assert.deepEqual(sense(drv), [5, 0x20, 0]);
  assert.deepEqual(packet(drv, [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]).error >> 4, 5, "WRITE(10) is not supported");
});

test("READ TOC formats 0 (LBA, MSF, lead-out only), 1 and 2", () => {
  const { drv } = cdRig();
  const toc = packet(drv, [0x43, 0, 0, 0, 0, 0, 0, 0, 252, 0]);
  ok(toc);
  assert.deepEqual([...toc.data], [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x14, 0xaa, 0, 0, 0, 0, 64]);
  const msf = packet(drv, [0x43, 2, 0, 0, 0, 0, 0, 0, 252, 0]);
  assert.deepEqual([...msf.data.subarray(8, 12)], [0, 0, 2, 0]);
  assert.deepEqual([...msf.data.subarray(16, 20)], [0, 0, 2, 64], "lead-out at 64+150 frames");
  const lo = packet(drv, [0x43, 0, 0, 0, 0, 0, 0xaa, 0, 252, 0]);
  assert.equal(lo.data.length, 12);
  assert.equal(packet(drv, [0x43, 0, 0, 0, 0, 0, 2, 0, 252, 0]).error >> 4, 5, "track 2 does not exist");
  const sess = packet(drv, [0x43, 0, 1, 0, 0, 0, 0, 0, 12, 0]);
  assert.deepEqual([...sess.data], [0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0]);
  const legacy = packet(drv, [0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40]);
  assert.deepEqual([...legacy.data.subarray(0, 4)], [0, 10, 1, 1], "SFF-8020 format field in the control byte");
  const full = packet(drv, [0x43, 2, 2, 0, 0, 0, 0, 0, 255, 0]);
  ok(full);
  assert.equal(full.data.length, 4 + 4 * 11);
  assert.equal(full.data[4 + 3], 0xa0);
});

test("MODE SENSE(10) page 2Ah the way sr get_capabilities reads it, all pages, changeable, saved values rejected", () => {
  const { drv } = cdRig();
  const r = packet(drv, [0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 128, 0]);
  ok(r);
  const len = ((r.data[0]! << 8) | r.data[1]!) + 2;
  const bdl = (r.data[6]! << 8) | r.data[7]!;
  assert.equal(len, r.data.length);
  assert.equal(bdl, 0);
  const n = 8 + bdl;
  assert.equal(r.data[n]! & 0x3f, 0x2a);
  assert.equal(((r.data[n + 8]! << 8) | r.data[n + 9]!) / 176, 24, "speed");
  assert.equal(r.data[n + 6]! & 0x08, 0x08, "eject supported");
  assert.equal(r.data[n + 6]! >> 5, 1, "tray");
  assert.equal(r.data[n + 3], 0, "no write capabilities");
  const all = packet(drv, [0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 255, 0]);
  ok(all);
  assert.equal(all.data.length, 8 + 8 + 8 + 16 + 22);
  const ch = packet(drv, [0x5a, 0, 0x40 | 0x2a, 0, 0, 0, 0, 0, 255, 0]);
  ok(ch);
  assert.equal(ch.data[8 + 6], 0);
  assert.equal(packet(drv, [0x5a, 0, 0xc0 | 0x2a, 0, 0, 0, 0, 0, 255, 0]).error >> 4, 5);
  assert.deepEqual(sense(drv), [5, 0x39, 0]);
  assert.equal(packet(drv, [0x5a, 0, 0x05, 0, 0, 0, 0, 0, 255, 0]).error >> 4, 5, "page 05h is not there");
  packet(drv, [0x1e, 0, 0, 0, 1, 0]);
  const locked = packet(drv, [0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 128, 0]);
  assert.equal(locked.data[8 + 6]! & 0x02, 0x02, "lock state");
});

test("GET CONFIGURATION: current profile, feature list, one feature", () => {
  const { drv } = cdRig();
  const r = packet(drv, [0x46, 0, 0, 0, 0, 0, 0, 0x01, 0x00, 0]);
  ok(r);
  assert.equal((r.data[6]! << 8) | r.data[7]!, 0x0008, "CD-ROM profile for a small image");
  const total = ((r.data[0]! << 24) | (r.data[1]! << 16) | (r.data[2]! << 8) | r.data[3]!) + 4;
  assert.equal(total, r.data.length);
  const codes: number[] = [];
  for (let at = 8; at < r.data.length; at += 4 + r.data[at + 3]!) codes.push((r.data[at]! << 8) | r.data[at + 1]!);
  assert.deepEqual(codes, [0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x001e, 0x001f]);
  const one = packet(drv, [0x46, 2, 0x00, 0x20, 0, 0, 0, 0, 32, 0]);
  assert.equal(one.data.length, 8, "random writable (20h) is not a feature: header only");
  const core = packet(drv, [0x46, 2, 0x00, 0x01, 0, 0, 0, 0, 32, 0]);
  assert.equal(core.data.length, 8 + 4 + 8);
  const cur = packet(drv, [0x46, 1, 0, 0, 0, 0, 0, 0x01, 0x00, 0]);
  assert.ok(cur.data.length < r.data.length, "RT=1 leaves out DVD read");
  const big = cdRig(new MemoryDisk(400_000 * BLOCK, true)).drv;
  assert.equal(packet(big, [0x46, 0, 0, 0, 0, 0, 0, 0, 8, 0]).data[7], 0x10, "DVD-ROM profile for a large image");
});

test("no medium: NOT READY / medium not present; commands that need no medium still work", () => {
  const { drv } = cdRig("empty");
  const t = packet(drv, [0x00, 0, 0, 0, 0, 0]);
  assert.equal(t.status & ATA.ERR_BIT, 1);
  assert.equal(t.error >> 4, 2);
  assert.deepEqual(sense(drv), [2, 0x3a, 0x01]);
  for (const cdb of [[0x25], [0x28, 0, 0, 0, 0, 0, 0, 0, 1], [0x43, 0, 0, 0, 0, 0, 0, 0, 12], [0x51, 0, 0, 0, 0, 0, 0, 0, 34]])
    assert.equal(packet(drv, cdb).error >> 4, 2, `0x${cdb[0]!.toString(16)}`);
  ok(packet(drv, [0x12, 0, 0, 0, 36, 0]));
  const cfg = packet(drv, [0x46, 0, 0, 0, 0, 0, 0, 0, 8, 0]);
  assert.equal((cfg.data[6]! << 8) | cfg.data[7]!, 0, "no current profile");
  const ev = packet(drv, [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]);
  assert.deepEqual([...ev.data], [0, 6, 4, 0x10, 0, 0, 0, 0]);
  ok(packet(drv, [0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]));
});

test("media change: GESN new-media event once, UNIT ATTENTION once, then ready", () => {
  const { drv, ide } = cdRig("empty");
  ide.changeMedium(1, 0, isoImage(32));
  const ev = packet(drv, [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]);
  assert.deepEqual([...ev.data], [0, 6, 4, 0x10, 2, 0x02, 0, 0]);
  assert.equal(packet(drv, [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]).data[4], 0, "event reported once");
  const ua = packet(drv, [0x00, 0, 0, 0, 0, 0]);
  assert.equal(ua.error >> 4, 6);
  ok(packet(drv, [0x00, 0, 0, 0, 0, 0]));
  const none = packet(drv, [0x4a, 1, 0, 0, 0x04, 0, 0, 0, 8, 0]);
  assert.deepEqual([...none.data], [0, 2, 0x80, 0x10], "no supported class requested");
  assert.equal(packet(drv, [0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]).error >> 4, 5, "asynchronous GESN is not supported");
});

test("START STOP UNIT / PREVENT ALLOW: eject refused while locked; tray open and close; mechanism status", () => {
  const { drv } = cdRig();
  ok(packet(drv, [0x1e, 0, 0, 0, 1, 0]));
  const refused = packet(drv, [0x1b, 0, 0, 0, 0x02, 0]);
  assert.equal(refused.error >> 4, 5);
  assert.deepEqual(sense(drv), [5, 0x53, 0x02]);
  ok(packet(drv, [0x1e, 0, 0, 0, 0, 0]));
  ok(packet(drv, [0x1b, 0, 0, 0, 0x02, 0]));
  assert.deepEqual([...packet(drv, [0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]).data], [0, 0x10, 0, 0, 0, 0, 0, 0]);
  packet(drv, [0x00, 0, 0, 0, 0, 0]);
  assert.deepEqual(sense(drv), [2, 0x3a, 0x02], "tray open");
  assert.equal(packet(drv, [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]).data[4], 3, "media removal event");
  ok(packet(drv, [0x1b, 0, 0, 0, 0x03, 0]));
  assert.equal(packet(drv, [0x00, 0, 0, 0, 0, 0]).error >> 4, 6, "unit attention after loading");
  ok(packet(drv, [0x00, 0, 0, 0, 0, 0]));
  ok(packet(drv, [0x1b, 0, 0, 0, 0x01, 0]));
  ok(packet(drv, [0xbb, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0]));
});

test("READ DISC INFORMATION and READ TRACK INFORMATION", () => {
  const { drv } = cdRig();
  const di = packet(drv, [0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0]);
  ok(di);
  assert.equal(di.data.length, 34);
  assert.deepEqual([...di.data.subarray(0, 7)], [0, 32, 0x0e, 1, 1, 1, 1]);
  const ti = packet(drv, [0x52, 1, 0, 0, 0, 1, 0, 0, 36, 0]);
  ok(ti);
  assert.equal((ti.data[24]! << 24) | (ti.data[25]! << 16) | (ti.data[26]! << 8) | ti.data[27]!, 64);
  assert.equal(packet(drv, [0x52, 1, 0, 0, 0, 2, 0, 0, 36, 0]).error >> 4, 5);
});

test("unsupported ATA commands abort; overlapped PACKET aborts; CHECK POWER MODE answers", () => {
  const { drv } = cdRig();
  for (const cmd of [0x00, 0xc8, 0x30, 0xe7, 0xf8]) {
    drv.issue(cmd, { device: 0xa0 });
    assert.equal(drv.status() & ATA.ERR_BIT, 1, `0x${cmd.toString(16)}`);
    assert.equal(drv.inb(ATA.ERR), ATA.ABRT);
  }
  drv.issue(0xa0, { feature: 0x02, device: 0xa0 });
  assert.equal(drv.status() & (ATA.ERR_BIT | ATA.DRQ), ATA.ERR_BIT);
  drv.issue(0xe5, { device: 0xa0 });
  assert.equal(drv.inb(ATA.NSECT), 0xff);
});

test("back-end read failure: MEDIUM ERROR / unrecovered read error", () => {
  const disc = isoImage(8);
  const { drv } = cdRig(disc);
  disc.failReads = true;
  const r = packet(drv, [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
  assert.equal(r.error >> 4, 3);
  assert.deepEqual(sense(drv), [3, 0x11, 0]);
  const d = packet(drv, [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], { dma: BLOCK });
  assert.equal(d.error >> 4, 3);
});

test("save(): CD-ROM state is plain data", () => {
  const { ide, drv } = cdRig();
  packet(drv, [0x1e, 0, 0, 0, 1, 0]);
  const s = ide.save();
  assert.equal(s.channels[1]!.cdroms[0]!.locked, true);
  assert.deepEqual(JSON.parse(JSON.stringify(s)), s);
});

test("sr probe and mount sequence: IDENTIFY PACKET, TUR, INQUIRY, READ CAPACITY, MODE SENSE 2Ah, GESN, READ TOC, READ(10) by DMA with 32-bit CDB writes", () => {
  const { drv } = cdRig();
  drv.softreset();
  assert.equal(drv.classify(0), "atapi");
  drv.identify(0, 0xa1);
  drv.issue(0xef, { feature: 0x03, nsect: 0x22, device: 0xa0 });
  drv.status();
  ok(packet(drv, [0x00, 0, 0, 0, 0, 0]));
  ok(packet(drv, [0x12, 0, 0, 0, 36, 0]));
  ok(packet(drv, [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
  ok(packet(drv, [0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 128, 0]));
  ok(packet(drv, [0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]));
  ok(packet(drv, [0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0]));
  ok(packet(drv, [0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0x40]));
  // libata sends the CDB with ata_sff_data_xfer32 (three 32-bit writes).
  drv.writePrd(0x1000, [[0x20000, 2 * BLOCK]]);
  drv.bmSetup(0x1000, true);
  drv.outb(ATA.FEAT, 1);
  drv.outb(ATA.LBAM, 0);
  drv.outb(ATA.LBAH, 0x10);
  drv.select(0);
  drv.outb(ATA.CMD, 0xa0);
  assert.equal(drv.altStatus() & ATA.DRQ, ATA.DRQ);
  drv.writeData(new Uint8Array([0x28, 0, 0, 0, 0, 16, 0, 0, 2, 0, 0, 0]), 4);
  assert.equal(drv.irq.level, false, "waiting for the bus master");
  drv.bmStart();
  assert.equal(drv.irq.level, true);
  assert.equal(drv.bmRead(2) & 0x07, 0x04);
  drv.bmStop();
  assert.equal(drv.status(), 0x40);
  assert.equal(drv.inb(ATA.NSECT) & 3, 3);
  assert.equal(Buffer.from(drv.rig.memory.bytes(0x20001, 5)).toString(), "CD001");
});
