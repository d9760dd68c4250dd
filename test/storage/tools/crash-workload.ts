/**
 * Child process of the crash harness: random writes to a disk image until
 * killed. After each batch of writes is flushed (BlockDevice.flush returned),
 * the batch is appended to a side log ("index offset length dataSeed" per
 * line) and the log is fsynced, so every logged write is one the disk
 * promised to keep.
 *
 * usage: node crash-workload.js <image> <log> <seed>
 */
import { closeSync, fsyncSync, openSync, writeSync } from "node:fs";
import { openDisk } from "../../../src/storage/open.js";
import { plannedWrite, seededBytes } from "./oracle.js";

const [image, logPath, seedText] = process.argv.slice(2);
if (image === undefined || logPath === undefined || seedText === undefined) {
  process.stderr.write("usage: crash-workload <image> <log> <seed>\n");
  process.exit(2);
}
const seed = Number(seedText);
const dev = openDisk(image);
const log = openSync(logPath, "a");
writeSync(log, "ready\n");
fsyncSync(log);
let index = 0;
for (;;) {
  const batch = 1 + (index % 4);
  const lines: string[] = [];
  for (let i = 0; i < batch; i++, index++) {
    const w = plannedWrite(seed, index, dev.size);
    dev.write(w.offset, seededBytes(w.dataSeed, w.length));
    lines.push(`${w.index} ${w.offset} ${w.length} ${w.dataSeed}\n`);
  }
  dev.flush();
  writeSync(log, lines.join(""));
  fsyncSync(log);
  if (index > 1_000_000) break;
}
closeSync(log);
dev.close();
