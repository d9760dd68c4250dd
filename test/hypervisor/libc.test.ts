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
    assert.equal(e.take(), 0);
    e.signal();
    e.signal(4);
    assert.equal(e.take(), 5);
    assert.equal(e.take(), 0);
    // Counts past 32 bits keep both halves.
    e.signal(2 ** 40 + 3);
    assert.equal(e.take(), 2 ** 40 + 3);
  } finally {
    e.close();
  }
});

test("preadvHost/pwritevHost: scatter/gather on host spans of mapped memory; spans outside live mappings are refused before any I/O", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "partis-iov-"));
  const memfd = libc.memfdCreate("iov-test");
  try {
    libc.ftruncate(memfd, 1 << 20);
    const ram = libc.mapSharedFile(memfd, 0, 1 << 20);
    const base = Number(libc.addressOfView(ram));
    for (let i = 0; i < 8192; i++) ram[0x1000 + i] = (i * 7) & 0xff;
    const fd = libc.open(path.join(dir, "f"), libc.O_RDWR | libc.O_CREAT);
    // Two spans written back to back: [0x1000, +100) then [0x3000-50, +50) gives 150 bytes.
    ram.fill(0xab, 0x3000 - 50, 0x3000);
    const addrs = Float64Array.of(base + 0x1000, base + 0x3000 - 50);
    const lens = Uint32Array.of(100, 50);
    assert.equal(libc.pwritevHost(fd, addrs, lens, 2, 4096), 150);
    const back = new Uint8Array(150);
    assert.equal(libc.pread(fd, back, 4096), 150);
    assert.deepEqual(back.subarray(0, 100), ram.subarray(0x1000, 0x1000 + 100));
    assert.ok(back.subarray(100).every((b) => b === 0xab));
    // Read them into two other places.
    const into = Float64Array.of(base + 0x8000, base + 0x9000);
    assert.equal(libc.preadvHost(fd, into, Uint32Array.of(120, 30), 2, 4096), 150);
    assert.deepEqual(ram.subarray(0x8000, 0x8000 + 120), back.subarray(0, 120));
    assert.deepEqual(ram.subarray(0x9000, 0x9000 + 30), back.subarray(120));
    // A span running past the mapping, an address nothing here mapped, and a released mapping: RangeError, file untouched.
    assert.throws(() => libc.pwritevHost(fd, Float64Array.of(base + (1 << 20) - 10), Uint32Array.of(20), 1, 0), RangeError);
    assert.throws(() => libc.preadvHost(fd, Float64Array.of(4096), Uint32Array.of(16), 1, 0), RangeError);
    libc.releaseMapping(ram);
    assert.throws(() => libc.preadvHost(fd, Float64Array.of(base + 0x1000), Uint32Array.of(16), 1, 4096), RangeError);
    assert.equal(fs.statSync(path.join(dir, "f")).size, 4096 + 150);
    libc.close(fd);
  } finally {
    libc.close(memfd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
