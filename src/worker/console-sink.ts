/**
 * The console's output side: bytes the guest writes to COM1 go straight to a
 * file descriptor (the worker's stdout, which the CLI connects to the user's
 * terminal or to a pipe). Written from vCPU threads synchronously; a full
 * pipe (EAGAIN on a non-blocking descriptor) is retried after a short wait so
 * no byte is lost and the guest is slowed rather than the output dropped.
 */
import { writeSync } from "node:fs";
import type { ByteSink } from "../devices/dependencies.js";
import { bootTrace } from "./boot-trace.js";

const pause = new Int32Array(new SharedArrayBuffer(4));

export class FdConsoleSink implements ByteSink {
  private first = true;

  constructor(private readonly fd: number) {}

  write(bytes: Uint8Array): void {
    if (this.first) {
      this.first = false;
      bootTrace("console", "first byte from the guest");
    }
    let done = 0;
    while (done < bytes.length) {
      try {
        done += writeSync(this.fd, bytes, done, bytes.length - done);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === "EAGAIN") {
          Atomics.wait(pause, 0, 0, 1);
          continue;
        }
        if (code === "EPIPE") return; // the reader went away: drop console output
        throw e;
      }
    }
  }
}
