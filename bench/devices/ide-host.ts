/**
 * IDE bus-master DMA on this host, no guest: what a transfer costs the device
 * thread, with and without the controller's io_uring. The real PiixIde +
 * BusMasterChannel + AtaDisk code serves READ DMA commands (64 KiB by
 * default, random offsets) from a raw image on a real disk (/var/tmp by
 * default), driven through its registers as libata does: taskfile, Start,
 * then the interrupt, Status and bus-master acknowledgement.
 *
 * Per transfer it measures the device thread's busy time (every register
 * access, the deferred transfer and, on the ring, the completion handler)
 * and the wall time from the first register write to the interrupt. With the
 * page cache cold (--cold is the default; root: drop_caches before each timed
 * loop) a synchronous transfer holds the device thread for the whole disk
 * read, and every other device of the VM waits; on the ring it holds it only
 * to submit and to complete.
 *
 * usage: node dist/bench/devices/ide-host.js [--dir /var/tmp] [--size-mib 512] [--transfers 200] [--kib 64] [--warm] [--format raw|vhd|vhdx|vhdx-child]
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { cpus } from "node:os";
import type { BlockDevice } from "../../src/storage/block-device.js";
import { PiixIde } from "../../src/devices/emulated/ide/piix-ide.js";
import type { PciDeviceServices } from "../../src/devices/pci/device-thread-services.js";
import { IoUring } from "../../src/hypervisor/io-uring.js";
import { libc } from "../../src/hypervisor/index.js";
import { filledImage, imageFormatOption, flag, memfdGuestRam, option } from "./host-bench-setup.js";

const MiB = 1024 * 1024;
const DIR = option("--dir", "/var/tmp");
const SIZE = Number(option("--size-mib", "512")) * MiB;
/** --format raw|vhd|vhdx|vhdx-child: the image the disk is served from (host-bench-setup.ts). */
const FORMAT = imageFormatOption();
const TRANSFERS = Number(option("--transfers", "200"));
const BYTES = Number(option("--kib", "64")) * 1024;
const COLD = !flag("--warm");
if (!(BYTES >= 512 && BYTES <= 128 * 1024 && BYTES % 512 === 0)) throw new Error("--kib: a multiple of 0.5 up to 128 (one READ DMA command)");

const RAM = 4 * MiB;
const TABLE = 0x1000;
const BUFFER = 0x10_0000;
const BM = 0xc000;

interface Row {
  mode: string;
  transfers: number;
  seconds: number;
  busyUs: number[];
  wallUs: number[];
  /** Transfers still in flight when the device thread went back to its loop (completed later, announced on the eventfd). */
  completedLater: number;
}

const now = (): number => Number(process.hrtime.bigint()) / 1000;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? 0;
}

function run(disk: BlockDevice, ring: IoUring | undefined): Row {
  const memory = memfdGuestRam(RAM);
  const tasks: (() => void)[] = [];
  let interrupted = false;
  const services: PciDeviceServices = {
    memory,
    intx: { setLevel: () => {} },
    msi: { signal: () => {} },
    loop: { watch: () => ({ close: () => {} }), watchWritable: () => ({ close: () => {} }), defer: (task) => void tasks.push(task) },
    doorbells: { mapDoorbell: () => {} },
  };
  const ide = new PiixIde("bench-ide", services, {
    primaryIrq: { setLevel: (level) => void (level ? (interrupted = true) : undefined) },
    secondaryIrq: { setLevel: () => {} },
    drives: [{ channel: 0, unit: 0, kind: "disk", device: disk }],
    ...(ring !== undefined ? { ring } : {}),
  });
  ide.pci.assignBar(4, BM);
  ide.pci.enableDecoding();
  ide.pci.configWrite(0x04, 2, 0x05); // I/O decode, bus master
  ide.afterAccess();
  // One PRD table: the transfer into [BUFFER, BUFFER + BYTES), 64 KiB per entry.
  const prd = memory.bytes(TABLE, 16);
  const entries = Math.ceil(BYTES / 0x10000);
  for (let i = 0; i < entries; i++) {
    const dv = new DataView(prd.buffer, prd.byteOffset + i * 8, 8);
    const n = Math.min(0x10000, BYTES - i * 0x10000);
    dv.setUint32(0, BUFFER + i * 0x10000, true);
    dv.setUint16(4, n & 0xffff, true);
    dv.setUint16(6, i === entries - 1 ? 0x8000 : 0, true);
  }
  const pollFds = new Int32Array(2);
  const sectors = BYTES / 512;
  const slots = Math.floor(SIZE / BYTES);
  let lcg = 4242;
  const row: Row = { mode: ring !== undefined ? "on the io_uring" : "synchronous", transfers: 0, seconds: 0, busyUs: [], wallUs: [], completedLater: 0 };
  if (COLD) {
    spawnSync("sync");
    writeFileSync("/proc/sys/vm/drop_caches", "1");
  }
  const t0 = now();
  for (let t = 0; t < TRANSFERS; t++) {
    lcg = (Math.imul(lcg, 1103515245) + 12345) >>> 0;
    const lba = (lcg % slots) * sectors;
    interrupted = false;
    const start = now();
    // ata_bmdma_setup, tf_load + exec_command, bmdma_start: what the device thread serves.
    ide.barWrite(4, 4, 4, TABLE);
    ide.barWrite(4, 0, 1, 0x08);
    ide.barWrite(4, 2, 1, 0x06);
    ide.isaWrite("primary", 2, 1, sectors & 0xff);
    ide.isaWrite("primary", 3, 1, lba & 0xff);
    ide.isaWrite("primary", 4, 1, (lba >>> 8) & 0xff);
    ide.isaWrite("primary", 5, 1, (lba >>> 16) & 0xff);
    ide.isaWrite("primary", 6, 1, 0xe0 | ((lba >>> 24) & 0x0f));
    ide.isaWrite("primary", 7, 1, 0xc8);
    ide.barWrite(4, 0, 1, 0x09);
    ide.afterAccess();
    while (tasks.length > 0) tasks.shift()!();
    let busy = now() - start;
    if (!interrupted) row.completedLater++;
    // The device thread's poll loop until the interrupt: the ring's eventfd, then its completions.
    while (!interrupted) {
      if (ring === undefined) throw new Error("a synchronous transfer ended without its interrupt");
      pollFds[0] = ring.eventFd;
      pollFds[1] = 1; // POLLIN
      if (libc.poll(pollFds, 1, 1000) <= 0) throw new Error(`no completion within 1 s (transfer ${t}: ${ide.describeState().join("; ")})`);
      const b = now();
      ide.completeQueued();
      busy += now() - b;
    }
    row.wallUs.push(now() - start);
    // The interrupt handler: bus-master status, Stop, Status (acknowledges), clear Interrupt.
    const b = now();
    ide.barRead(4, 2, 1);
    ide.barWrite(4, 0, 1, 0x08);
    const status = ide.isaRead("primary", 7, 1);
    ide.barWrite(4, 2, 1, 0x04);
    ide.afterAccess();
    busy += now() - b;
    if (status !== 0x50) throw new Error(`transfer ${t}: Status 0x${status.toString(16)}`);
    row.busyUs.push(busy);
    row.transfers++;
  }
  row.seconds = (now() - t0) / 1e6;
  ide.quiesce();
  return row;
}

function main(): void {
  const dir = mkdtempSync(join(DIR, "partis-ide-bench-"));
  try {
    const disk = filledImage(dir, SIZE, FORMAT);
    disk.flush();
    const rows: Row[] = [];
    for (let round = 0; round < 2; round++) {
      rows.push(run(disk, undefined));
      const ring = IoUring.open(8);
      try {
        rows.push(run(disk, ring));
      } finally {
        ring.close();
      }
    }
    disk.close();
    console.log(`PIIX IDE READ DMA of ${BYTES / 1024} KiB at random offsets, ${FORMAT} image in ${DIR} (${SIZE / MiB} MiB), page cache ${COLD ? "dropped before each loop" : "warm"}, node ${process.version}, ${cpus()[0]?.model ?? "cpu"}\n`);
    console.log("| mode | transfers | of which completed later | MiB/s | device-thread µs per transfer (median / mean) | wall µs per transfer (median) |");
    console.log("|---|---:|---:|---:|---:|---:|");
    for (const r of rows) {
      const mean = r.busyUs.reduce((a, b) => a + b, 0) / Math.max(1, r.busyUs.length);
      console.log(`| ${r.mode} | ${r.transfers} | ${r.completedLater} | ${((r.transfers * BYTES) / MiB / r.seconds).toFixed(1)} | ${median(r.busyUs).toFixed(0)} / ${mean.toFixed(0)} | ${median(r.wallUs).toFixed(0)} |`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main();
