/**
 * Test helper thread for console-output.test.ts: appends a deterministic byte
 * stream to a console ring the way vCPU threads do (mostly one byte per call,
 * as the UART transmits, with some larger writes), then posts "done".
 */
import { parentPort, workerData } from "node:worker_threads";
import { ConsoleOutputRing } from "../../src/worker/console-output.js";

const { ring, total } = workerData as { ring: SharedArrayBuffer; total: number };
const sink = ConsoleOutputRing.attach(ring).writer();
const one = new Uint8Array(1);
const chunk = new Uint8Array(300);
let i = 0;
while (i < total) {
  if (i % 997 < 300 && total - i >= chunk.length) {
    for (let k = 0; k < chunk.length; k++) chunk[k] = (i + k) % 251;
    sink.write(chunk);
    i += chunk.length;
  } else {
    one[0] = i % 251;
    sink.write(one);
    i++;
  }
}
parentPort!.postMessage("done");
