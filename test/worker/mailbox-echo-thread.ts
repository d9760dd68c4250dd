/**
 * Test fixture: a minimal device thread that answers every read with the
 * address's low byte, except a 1-byte read of port 0xFFFF, which answers how
 * many port writes it has applied so far (posted ones included), and a
 * 1-byte read of port 0xFFFE, which answers the low byte of the last value
 * written.
 */
import { parentPort, workerData } from "node:worker_threads";
import { DeviceMailbox, MAILBOX_OP, type MailboxHandoff } from "../../src/worker/device-mailbox.js";
import { EventFd } from "../../src/hypervisor/eventfd.js";
import { poll, POLLIN } from "../../src/hypervisor/libc.js";

const box = DeviceMailbox.attach(workerData as MailboxHandoff);
const server = box.server();
const bell = EventFd.borrow(box.doorbellFd);
const fds = new Int32Array([box.doorbellFd, POLLIN]);
let writes = 0;
let last = 0;
parentPort!.postMessage("ready");
for (;;) {
  fds[1] = POLLIN;
  poll(fds, 1, 100);
  bell.take();
  server.serve((r) => {
    if (r.op === MAILBOX_OP.pioWrite) {
      writes++;
      last = r.data[0]!;
    }
    if (r.op === MAILBOX_OP.pioRead || r.op === MAILBOX_OP.configRead) r.data.fill(r.address & 0xff, 0, Math.max(4, r.size * r.count));
    if (r.op === MAILBOX_OP.pioRead && r.address === 0xffff) r.data[0] = writes & 0xff;
    if (r.op === MAILBOX_OP.pioRead && r.address === 0xfffe) r.data[0] = last;
    if (r.op === MAILBOX_OP.configRead) {
      const off = r.address & 0xff;
      r.data[0] = off;
      r.data[1] = 0x10;
    }
  });
}
