/**
 * The host side of virtio-vsock (src/worker/vsock-host.ts): a host program's
 * `CONNECT <port>` line (read byte by byte, so its first data stays in the
 * socket), bad lines refused, and the device's connections to `<path>_<port>`.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { acceptStream, closeDescriptor, connectStream, listenStream, receiveStream, sendStream } from "../../src/hypervisor/host-network.js";
import type { VsockHostStream } from "../../src/devices/virtio/virtio-vsock.js";
import { CONNECT_LINE_TIMEOUT_MS, VsockHostSockets } from "../../src/worker/vsock-host.js";

class Loop {
  readonly watches: { fd: number; handler: () => void; closed: boolean }[] = [];
  watch(fd: number, handler: () => void) {
    const w = { fd, handler, closed: false };
    this.watches.push(w);
    return { close: () => void (w.closed = true) };
  }
  watchWritable(): { close(): void } {
    throw new Error("the listener never waits for room");
  }
  defer(): void {
    throw new Error("the listener defers nothing");
  }
  /** Run every open watch's handler (as poll reporting them all ready: handlers must cope with nothing to read). */
  run(): void {
    for (const w of [...this.watches]) if (!w.closed) w.handler();
  }
  get open(): number {
    return this.watches.filter((w) => !w.closed).length;
  }
}

/** What the socket holds now; eof when it ended (closed, or reset: a socket closed with bytes unread resets). */
function text(fd: number): { text: string; eof: boolean } {
  const buf = new Uint8Array(256);
  let out = "";
  for (;;) {
    let n: number;
    try {
      n = receiveStream(fd, buf, buf.length);
    } catch {
      return { text: out, eof: true };
    }
    if (n === 0) return { text: out, eof: true };
    if (n < 0) return { text: out, eof: false };
    out += Buffer.from(buf.subarray(0, n)).toString("latin1");
  }
}

function send(fd: number, s: string): void {
  const b = Buffer.from(s, "latin1");
  assert.equal(sendStream(fd, b, b.length), b.length);
}

test("vsock host: CONNECT <port> hands the socket to the device, the bytes after the line still in it; bad lines close the socket", (t) => {
  const dir = mkdtempSync(join(tmpdir(), "partis-vsock-host-"));
  const path = join(dir, "v.sock");
  const loop = new Loop();
  const host = new VsockHostSockets(path, { loop });
  const handed: { port: number; stream: VsockHostStream }[] = [];
  host.attach({ connectFromHost: (port, stream) => (handed.push({ port, stream }), true) });
  t.after(() => {
    host.close();
    rmSync(dir, { recursive: true, force: true });
  });

  // The line in two pieces, data right behind it.
  const a = connectStream(path);
  loop.run();
  send(a, "CONN");
  loop.run();
  assert.equal(handed.length, 0, "half a line: waiting");
  send(a, "ECT 5555\nfirst bytes");
  loop.run();
  assert.equal(handed.length, 1);
  assert.equal(handed[0]!.port, 5555);
  const got = new Uint8Array(64);
  const n = handed[0]!.stream.read(got, got.length);
  assert.equal(Buffer.from(got.subarray(0, n)).toString(), "first bytes", "nothing after the line was taken by the listener");
  handed[0]!.stream.write(Buffer.from("OK 1073741824\n"), 14);
  assert.equal(text(a).text, "OK 1073741824\n");

  // Bad lines: each closed at once, counted.
  const bads = ["CONNECT\n", "CONNECT 4294967296\n", "connect 5\n", "CONNECT 5 6\n", `CONNECT ${"1".repeat(40)}`];
  const fds = bads.map((line) => {
    const fd = connectStream(path);
    loop.run();
    send(fd, line);
    loop.run();
    return fd;
  });
  for (const fd of fds) assert.deepEqual(text(fd), { text: "", eof: true });
  assert.equal(host.badRequests, bads.length);
  assert.equal(handed.length, 1);
  // A program that hangs up before its line is forgotten without a count.
  const quitter = connectStream(path);
  loop.run();
  closeDescriptor(quitter);
  loop.run();
  assert.equal(host.badRequests, bads.length);
  assert.equal(loop.open, 2, "only the listener (and its retry alarm) are watched");
  for (const fd of [a, ...fds]) closeDescriptor(fd);
  handed[0]!.stream.close();
});

test("vsock host: the device's connection for guest port P goes to <path>_P; none listening there is undefined", (t) => {
  const dir = mkdtempSync(join(tmpdir(), "partis-vsock-host-"));
  const path = join(dir, "v.sock");
  const host = new VsockHostSockets(path, { loop: new Loop() });
  const service = listenStream(`${path}_1234`);
  t.after(() => {
    host.close();
    closeDescriptor(service);
    rmSync(dir, { recursive: true, force: true });
  });
  assert.equal(host.connect(4321), undefined);
  const s = host.connect(1234);
  assert.ok(s !== undefined);
  const peer = acceptStream(service);
  assert.ok(peer !== undefined);
  s.write(Buffer.from("hi"), 2);
  assert.equal(text(peer).text, "hi");
  s.shutdownWrite();
  assert.deepEqual(text(peer), { text: "", eof: true }, "the write side shut: the service reads the end");
  send(peer, "back");
  const buf = new Uint8Array(16);
  assert.equal(s.read(buf, 16), 4, "the other way still open");
  closeDescriptor(peer);
  assert.equal(s.read(buf, 16), -1, "the service closed: end of stream");
  s.close();
  s.close(); // twice is harmless
  host.close();
  assert.equal(existsSync(path), false, "the listening socket's path is removed");
});

test("vsock host: a program that does not finish its CONNECT line within 2 s is closed", (t) => {
  const dir = mkdtempSync(join(tmpdir(), "partis-vsock-host-"));
  let now = 0;
  const loop = new Loop();
  const host = new VsockHostSockets(join(dir, "v.sock"), { loop }, () => now);
  const handed: number[] = [];
  host.attach({ connectFromHost: (port, stream) => (handed.push(port), stream.close(), true) });
  t.after(() => {
    host.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const idle = connectStream(join(dir, "v.sock"));
  loop.run();
  send(idle, "CONNECT 1");
  now += CONNECT_LINE_TIMEOUT_MS - 1;
  loop.run();
  assert.equal(text(idle).eof, false, "still in time");
  const late = connectStream(join(dir, "v.sock"));
  loop.run();
  now += 2;
  loop.run(); // the loop reports the alarm's timer (the test's loop runs every handler)
  assert.equal(text(idle).eof, true, "past its deadline: closed");
  assert.equal(host.lineTimeouts, 1);
  send(late, "CONNECT 9\n");
  loop.run();
  assert.deepEqual(handed, [9], "the later program still has its time");
  for (const fd of [idle, late]) closeDescriptor(fd);
});
