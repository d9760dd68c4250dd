/**
 * Helper process for log.test.ts (not a test): writes block i with byte i+1,
 * flushes, prints i, forever over 64 blocks, until the test kills it.
 */
import { VhdxDisk } from "../../../src/storage/vhdx/index.js";

const MiB = 1024 * 1024;
const d = VhdxDisk.open(process.argv[2]!);
for (let round = 0; ; round++) {
  for (let i = 0; i < 64; i++) {
    // Two half-block writes so a crash can land between them (both within one block).
    d.write(i * MiB, Buffer.alloc(MiB / 2, (i + 1) & 0xff));
    d.write(i * MiB + MiB / 2, Buffer.alloc(MiB / 2, (i + 1) & 0xff));
    d.flush();
    if (round === 0) process.stdout.write(`${i}\n`);
  }
}
