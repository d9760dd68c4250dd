import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, fdatasyncSync, mkdtempSync, openSync, readFileSync, rmSync, statfsSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { IoUring } from "../../src/hypervisor/io-uring.js";
import { addressOfView, alignedBuffer, Errno, poll } from "../../src/hypervisor/libc.js";

function spansOf(views: Uint8Array[]): { addresses: Float64Array; lengths: Uint32Array } {
  return { addresses: Float64Array.from(views, (v) => Number(addressOfView(v))), lengths: Uint32Array.from(views, (v) => v.length) };
}

function withFile(fn: (path: string) => void): void {
  const dir = mkdtempSync(join(tmpdir(), "partis-uring-"));
  try {
    fn(join(dir, "f"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("io_uring: a gathered write, an fsync and a scattered read, each completion with its token", () => {
  withFile((path) => {
    writeFileSync(path, new Uint8Array(64 * 1024));
    const fd = openSync(path, "r+");
    const ring = IoUring.open(8);
    try {
      const mem = alignedBuffer(3 * 4096);
      const parts = [mem.subarray(0, 100), mem.subarray(4096, 4096 + 3000), mem.subarray(8192, 8192 + 5)];
      parts.forEach((p, i) => p.fill(0x41 + i));
      const out = spansOf(parts);
      assert.equal(ring.prepareVectored(true, fd, 1000, out.addresses, out.lengths, 3, 7), true);
      ring.submit();
      const seen: [number, number][] = [];
      ring.drain((token, result) => seen.push([token, result]));
      assert.deepEqual(seen, [[7, 3105]]);
      assert.equal(ring.prepareFsync(fd, false, 8), true);
      ring.drain((token, result) => seen.push([token, result]));
      assert.deepEqual(seen[1], [8, 0]);
      const file = readFileSync(path);
      assert.ok(file.subarray(1000, 1100).every((b) => b === 0x41));
      assert.ok(file.subarray(1100, 4100).every((b) => b === 0x42));
      assert.ok(file.subarray(4100, 4105).every((b) => b === 0x43));
      assert.equal(file[999], 0);
      assert.equal(file[4105], 0);
      // Read it back scattered differently, into other memory.
      const back = alignedBuffer(2 * 4096);
      const into = [back.subarray(0, 2000), back.subarray(4096, 4096 + 1105)];
      const sp = spansOf(into);
      assert.equal(ring.prepareVectored(false, fd, 1000, sp.addresses, sp.lengths, 2, 2 ** 40 + 3), true);
      ring.drain((token, result) => seen.push([token, result]));
      assert.deepEqual(seen[2], [2 ** 40 + 3, 3105], "a token above 2^32 comes back whole");
      assert.deepEqual(Buffer.concat([into[0]!, into[1]!]), file.subarray(1000, 4105));
      assert.equal(ring.inFlight, 0);
    } finally {
      ring.close();
      closeSync(fd);
    }
  });
});

test("io_uring: many requests in flight at once, one submission; a full ring refuses more", () => {
  withFile((path) => {
    const content = new Uint8Array(64 * 4096);
    for (let i = 0; i < content.length; i++) content[i] = (i * 7 + (i >> 12)) & 0xff;
    writeFileSync(path, content);
    const fd = openSync(path, "r");
    const ring = IoUring.open(16);
    try {
      const mem = alignedBuffer(16 * 4096);
      for (let i = 0; i < 16; i++) {
        const s = spansOf([mem.subarray(i * 4096, (i + 1) * 4096)]);
        // Block 4*i of the file into slot i.
        assert.equal(ring.prepareVectored(false, fd, 4 * i * 4096, s.addresses, s.lengths, 1, i), true);
      }
      const s = spansOf([mem.subarray(0, 4096)]);
      assert.equal(ring.room, 0);
      assert.equal(ring.prepareVectored(false, fd, 0, s.addresses, s.lengths, 1, 99), false, "no room: nothing prepared");
      ring.submit();
      const tokens: number[] = [];
      ring.drain((token, result) => {
        assert.equal(result, 4096);
        tokens.push(token);
      });
      assert.deepEqual(tokens.sort((a, b) => a - b), [...Array(16).keys()]);
      for (let i = 0; i < 16; i++) assert.deepEqual(mem.subarray(i * 4096, (i + 1) * 4096), content.subarray(4 * i * 4096, (4 * i + 1) * 4096));
      assert.equal(ring.room, 16);
    } finally {
      ring.close();
      closeSync(fd);
    }
  });
});

test("io_uring: a failing request completes with -errno; spans outside mapped memory are refused before the kernel sees them", () => {
  withFile((path) => {
    writeFileSync(path, new Uint8Array(4096));
    const fd = openSync(path, "r"); // read-only: a write fails with EBADF
    const ring = IoUring.open(4);
    try {
      const mem = alignedBuffer(4096);
      const s = spansOf([mem]);
      assert.equal(ring.prepareVectored(true, fd, 0, s.addresses, s.lengths, 1, 1), true);
      const results: number[] = [];
      ring.drain((_t, r) => results.push(r));
      assert.deepEqual(results, [-Errno.EBADF]);
      const js = new Uint8Array(4096); // not memory the FFI layer mapped
      assert.throws(() => ring.prepareVectored(false, fd, 0, Float64Array.of(4096), Uint32Array.of(4096), 1, 2), RangeError);
      void js;
      assert.equal(ring.room, 4, "the refused request took no slot");
    } finally {
      ring.close();
      closeSync(fd);
    }
  });
});

test("io_uring: every completion is announced on the eventfd, reads that waited for the disk included (they complete through task work, not io-wq)", () => {
  // A disk-backed file system, with the file's pages dropped from the page cache, so reads wait for the disk.
  let dir: string;
  try {
    dir = mkdtempSync(join("/var/tmp", "partis-uring-cold-"));
  } catch {
    dir = mkdtempSync(join(tmpdir(), "partis-uring-cold-")); // no /var/tmp, or a read-only one (the nested test host's)
  }
  const ring = IoUring.open(8);
  try {
    const path = join(dir, "f");
    writeFileSync(path, new Uint8Array(16 * 1024 * 1024).fill(0x5a));
    const fd = openSync(path, "r");
    try {
      fdatasyncSync(fd);
      execFileSync("dd", [`if=${path}`, "iflag=nocache", "count=0"], { stdio: "ignore" }); // posix_fadvise DONTNEED
      const mem = alignedBuffer(65536);
      const { addresses, lengths } = spansOf([mem]);
      const fds = new Int32Array(2);
      let waited = 0;
      for (let k = 0; k < 32; k++) {
        assert.equal(ring.prepareVectored(false, fd, ((k * 7) % 256) * 65536, addresses, lengths, 1, k), true);
        ring.submit();
        let result: number | undefined;
        const take = (token: number, res: number): void => {
          assert.equal(token, k);
          result = res;
        };
        if (ring.reap(take) === 0) {
          waited++;
          // As the device thread's loop: only the eventfd tells it a completion came.
          fds[0] = ring.eventFd;
          fds[1] = 1; // POLLIN
          assert.equal(poll(fds, 1, 5000), 1, `read ${k}: its completion was not announced on the eventfd within 5 s`);
          ring.takeEvent();
          assert.equal(ring.reap(take), 1);
        } else ring.takeEvent(); // inline completions signal it too
        assert.equal(result, 65536, `read ${k}`);
      }
      const fsType = statfsSync(dir).type;
      console.log(`io_uring cold reads in ${dir} (file system 0x${fsType.toString(16)}): ${waited} of 32 completed after submitting`);
      if (fsType !== 0x01021994 /* tmpfs: never waits */) assert.ok(waited > 0, "some reads waited for the disk (else this test checks nothing)");
    } finally {
      closeSync(fd);
    }
  } finally {
    ring.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
