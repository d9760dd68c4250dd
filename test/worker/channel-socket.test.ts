/**
 * The host end of a console channel (device-assembly.ts ChannelSocket) with a
 * scripted device-thread loop: the loop is synchronous on the device thread,
 * so whatever the channel leaves for later must go through the loop, not a
 * microtask (which would wait until the thread ends).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ChannelSocket } from "../../src/worker/device-assembly.js";
import type { HostByteStream } from "../../src/devices/virtio/virtio-console.js";

/** The device thread's loop, run by hand: watches are called and deferred tasks run when the test says. */
class ScriptedLoop {
  readonly watches: { fd: number; handler: () => void; closed: boolean }[] = [];
  readonly deferred: (() => void)[] = [];
  watch(fd: number, onReadable: () => void) {
    const w = { fd, handler: onReadable, closed: false };
    this.watches.push(w);
    return { close: () => void (w.closed = true) };
  }
  /** A channel socket never waits for room (its device keeps or drops output): recorded to be asserted empty. */
  readonly writableWatches: number[] = [];
  watchWritable(fd: number) {
    this.writableWatches.push(fd);
    return { close: () => undefined };
  }
  defer(task: () => void): void {
    this.deferred.push(task);
  }
  runDeferred(): void {
    for (const t of this.deferred.splice(0)) t();
  }
}

class RecordingDevice {
  stream: HostByteStream | undefined;
  readonly connects: ("stream" | "none")[] = [];
  connect(s: HostByteStream | undefined): void {
    this.stream = s;
    this.connects.push(s === undefined ? "none" : "stream");
  }
}

function connected(path: string): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const c = connect(path, () => resolve(c));
    c.on("error", reject);
  });
}

const fdOpen = (fd: number): boolean => existsSync(`/proc/self/fd/${fd}`);

/** A channel on a fresh socket path with a scripted loop and a recording device; closed and removed after `body`. */
async function withChannel(body: (c: { path: string; loop: ScriptedLoop; device: RecordingDevice; channel: ChannelSocket }) => Promise<void>): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), "partis-channel-"));
  const path = join(dir, "c.sock");
  const loop = new ScriptedLoop();
  const device = new RecordingDevice();
  const channel = new ChannelSocket(path, device, { loop });
  try {
    await body({ path, loop, device, channel });
  } finally {
    channel.close();
    rmSync(dir, { recursive: true, force: true });
  }
  return path;
}

test("a client that hangs up is closed by a task on the device loop once the device has seen it go; the newest client wins", async () => {
  const path = await withChannel(async ({ path, loop, device, channel }) => {
    const listen = loop.watches[0]!;
    const first = await connected(path);
    listen.handler(); // the listening socket polled readable
    const firstFd = channel.clientFd!;
    assert.ok(firstFd !== undefined && device.stream?.fd === firstFd);

    // The newest client wins: the first is closed at once.
    const second = await connected(path);
    listen.handler();
    const secondFd = channel.clientFd!;
    assert.notEqual(secondFd, firstFd);
    assert.deepEqual(device.connects, ["stream", "none", "stream"]);
    first.destroy();

    // The second hangs up. From here on nothing awaits: the device thread's loop never yields to microtasks.
    second.destroy();
    await new Promise((r) => second.once("close", r));
    const buf = new Uint8Array(16);
    assert.equal(device.stream!.read(buf), -1, "the device sees the peer gone");
    assert.equal(channel.clientFd, secondFd, "dropped only after the device has seen it");
    assert.ok(fdOpen(secondFd));
    loop.runDeferred();
    assert.equal(channel.clientFd, undefined, "the loop's deferred task dropped the client");
    assert.equal(device.stream, undefined);
    assert.equal(device.connects.at(-1), "none");
  });
  assert.ok(!existsSync(path), "close removes the socket path");
});

test("a client that hangs up while the device is not reading is seen gone on the device's next write, and dropped by a loop task", async () => {
  await withChannel(async ({ path, loop, device, channel }) => {
    const client = await connected(path);
    loop.watches[0]!.handler();
    const fd = channel.clientFd!;
    client.destroy();
    await new Promise((r) => client.once("close", r));
    const bytes = new Uint8Array(4096).fill(0x41);
    // The first send may still land in the socket buffer before the kernel notices the reset; the next cannot.
    let n = 0;
    for (let i = 0; i < 4 && n >= 0; i++) n = device.stream!.write(bytes);
    assert.equal(n, -1, "a write to a client that is gone says so (-1), it does not look like a full socket (0)");
    assert.ok(fdOpen(fd));
    loop.runDeferred();
    assert.equal(channel.clientFd, undefined);
    assert.equal(device.connects.at(-1), "none");
  });
});
