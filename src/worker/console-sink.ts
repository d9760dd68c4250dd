/**
 * The console's output side: bytes the guest writes to COM1 go straight to a
 * file descriptor (the worker's stdout, which the CLI connects to the user's
 * terminal or to a pipe). Written from vCPU threads synchronously; a full
 * pipe (EAGAIN on a non-blocking descriptor) is retried after a short wait so
 * no byte is lost and the guest is slowed rather than the output dropped.
 */
import type { ByteSink } from "../devices/dependencies.js";
import * as libc from "../hypervisor/libc.js";
import { bootTrace } from "./boot-trace.js";

const pause = new Int32Array(new SharedArrayBuffer(4));

export class FdConsoleSink implements ByteSink {
  private first = true;

  constructor(private readonly fd: number) {}

  /** write(2) straight from the caller's buffer: the guest's every console byte passes here, and fs.writeSync allocated per call. */
  write(bytes: Uint8Array): void {
    if (this.first) {
      this.first = false;
      bootTrace("console", "first byte from the guest");
    }
    let view = bytes;
    while (view.length > 0) {
      const n = libc.raw.write(this.fd, view, view.length);
      if (n >= 0) {
        if (n === view.length) return;
        view = view.subarray(n);
        continue;
      }
      const e = libc.errno();
      if (e === libc.Errno.EAGAIN) Atomics.wait(pause, 0, 0, 1);
      else if (e === libc.Errno.EPIPE) return; // the reader went away: drop console output
      else if (e !== libc.Errno.EINTR) throw libc.lastError("write", { fd: this.fd, what: "console" });
    }
  }
}
