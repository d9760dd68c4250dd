/**
 * The device thread's loop (src/worker/poll-loop.ts): readable and writable
 * watches, and a handler that throws: reported, its watch dropped, the other
 * devices' watches served on.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { closeDescriptor, sendStream, socketPair } from "../../src/hypervisor/host-network.js";
import { PollLoop } from "../../src/worker/poll-loop.js";

test("poll loop: POLLIN and POLLOUT watches; a throwing handler is reported and dropped, the others go on", () => {
  const errors: unknown[] = [];
  const loop = new PollLoop((e) => errors.push(e));
  const [a, b] = socketPair("stream");
  const [c, d] = socketPair("stream");
  sendStream(b, Buffer.from("x"), 1); // a is readable (and stays so: nobody reads)
  sendStream(d, Buffer.from("y"), 1); // c too
  let bad = 0;
  let good = 0;
  let writable = 0;
  loop.watch(a, () => {
    bad++;
    throw new Error("device model bug");
  });
  loop.watch(c, () => void good++);
  const w = loop.watchWritable(b, () => void writable++);
  loop.runOnce(0);
  loop.runOnce(0);
  assert.equal(bad, 1, "the failing handler ran once, then its watch was dropped");
  assert.equal(errors.length, 1);
  assert.match(String(errors[0]), /device model bug/);
  assert.equal(good, 2, "the other device's watch is served on");
  assert.equal(writable, 2, "a socket with room polls writable");
  w.close();
  loop.runOnce(0);
  assert.equal(writable, 2, "closed: not called again");
  for (const fd of [a, b, c, d]) closeDescriptor(fd);
});
