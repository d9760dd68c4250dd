/** libc bindings: errors, aligned buffers, shared file mappings, eventfds, pread/pwrite with O_DIRECT-ready memory. */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as libc from "../../src/hypervisor/libc.js";
import { SystemCallError } from "../../src/hypervisor/errors.js";
import { PartisError } from "../../src/errors.js";
import { EventFd } from "../../src/hypervisor/eventfd.js";

test("a failing call throws SystemCallError with errno, its name, the call and context", () => {
  let err: unknown;
  try {
    libc.open("/nonexistent/partis", libc.O_RDONLY);
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof SystemCallError);
  assert.ok(err instanceof PartisError);
  assert.equal(err.errnoName, "ENOENT");
  assert.equal(err.errno, libc.Errno.ENOENT);
  assert.equal(err.call, "open");
  assert.equal(err.context.path, "/nonexistent/partis");
  assert.match(err.message, /open failed: ENOENT \(No such file or directory\)/);
  assert.throws(() => libc.close(-1), (e: unknown) => e instanceof SystemCallError && e.errnoName === "EBADF");
  assert.throws(() => libc.ioctl(-1, 0xae00, 0, "KVM_GET_API_VERSION"), /KVM_GET_API_VERSION failed: EBADF/);
});

test("alignedBuffer: aligned, zeroed, writable, releasable", () => {
  for (const alignment of [512, 4096, 65536, 1 << 21]) {
    const buf = libc.alignedBuffer(10000, alignment);
    assert.equal(buf.byteLength, 10000);
    assert.equal(libc.addressOfView(buf) % BigInt(alignment), 0n, `alignment ${alignment}`);
    assert.ok(buf.every((b) => b === 0));
    buf.fill(0xab);
    libc.releaseMapping(buf);
    libc.releaseMapping(buf); // idempotent
  }
  assert.throws(() => libc.alignedBuffer(4096, 3000), RangeError);
});

test("mapSharedFile: two mappings of one memfd see the same bytes", () => {
  const fd = libc.memfdCreate("partis-test");
  try {
    libc.ftruncate(fd, 3 * 4096);
    const a = libc.mapSharedFile(fd, 0, 3 * 4096);
    const b = libc.mapSharedFile(fd, 4096, 4096);
    a[4096 + 7] = 0x5a;
    assert.equal(b[7], 0x5a);
    b[0] = 0x11;
    assert.equal(a[4096], 0x11);
    libc.releaseMapping(a);
    libc.releaseMapping(b);
    assert.throws(() => libc.mapSharedFile(fd, 123, 4096), (e: unknown) => e instanceof SystemCallError && e.call === "mmap");
  } finally {
    libc.close(fd);
  }
});

test("pread/pwrite with an aligned buffer on an O_DIRECT file", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "partis-libc-"));
  const file = path.join(dir, "disk.img");
  let fd = -1;
  try {
    fs.writeFileSync(file, Buffer.alloc(8192));
    try {
      fd = libc.open(file, libc.O_RDWR | libc.O_DIRECT | libc.O_CLOEXEC);
    } catch (e) {
      // Some file systems (tmpfs) refuse O_DIRECT: fall back to a plain fd for the data check.
      assert.ok(e instanceof SystemCallError && e.errnoName === "EINVAL", String(e));
      fd = libc.open(file, libc.O_RDWR | libc.O_CLOEXEC);
    }
    const buf = libc.alignedBuffer(4096);
    buf.fill(0x42);
    assert.equal(libc.pwrite(fd, buf, 4096), 4096);
    const back = libc.alignedBuffer(4096);
    assert.equal(libc.pread(fd, back, 4096), 4096);
    assert.ok(back.every((b) => b === 0x42));
    // Node's fs also accepts these buffers.
    assert.equal(fs.readSync(fd, back, 0, 4096, 0), 4096);
    assert.ok(back.every((b) => b === 0));
    libc.releaseMapping(buf);
    libc.releaseMapping(back);
  } finally {
    if (fd >= 0) libc.close(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("EventFd: signal adds, take reads and resets, non-blocking take gives 0", () => {
  const e = EventFd.create();
  try {
    assert.equal(e.take(), 0n);
    e.signal();
    e.signal(4);
    assert.equal(e.take(), 5n);
    assert.equal(e.take(), 0n);
  } finally {
    e.close();
  }
});
