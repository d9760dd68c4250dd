import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { POLLIN, addressOfView, alignedBuffer, poll, releaseMapping } from "../../../src/hypervisor/libc.js";
import { setInterfaceUp } from "../../../src/hypervisor/host-network.js";
import { DatagramPairPort, FrameBuffer, MAX_PORT_FRAME_BYTES, MemoryPortPair, NetworkPortError, TapPort } from "../../../src/devices/net/network-port.js";

function readable(fd: number): boolean {
  const fds = new Int32Array([fd, POLLIN]);
  return poll(fds, 1, 0) === 1;
}

function frame(len: number, fill: number): Uint8Array {
  return new Uint8Array(len).fill(fill);
}

test("FrameBuffer: a view per length, reused while its set holds that length; every length a hostile guest can send leaves a bounded cache", () => {
  for (const bad of [-1, -1025, MAX_PORT_FRAME_BYTES + 1, 0.5, Number.NaN]) assert.throws(() => new FrameBuffer(MAX_PORT_FRAME_BYTES).view(bad), RangeError, `a fresh buffer: view(${bad})`);
  const buf = new FrameBuffer(MAX_PORT_FRAME_BYTES);
  buf.bytes.set([1, 2, 3, 4]);
  const v = buf.view(3);
  assert.deepEqual([...v], [1, 2, 3]);
  assert.equal(buf.view(3), v, "the same length: the same view, nothing allocated");
  assert.equal(buf.view(0).length, 0);
  for (let n = 0; n <= MAX_PORT_FRAME_BYTES; n++) assert.equal(buf.view(n).length, n);
  assert.ok(buf.cachedViews <= FrameBuffer.VIEW_SLOTS, `${buf.cachedViews} views cached`);
  const w = buf.view(3 + FrameBuffer.VIEW_SLOTS);
  assert.equal(w.length, 3 + FrameBuffer.VIEW_SLOTS, "a length sharing a slot gets its own view");
  assert.equal(buf.view(3).length, 3);
  for (const bad of [-1, MAX_PORT_FRAME_BYTES + 1, 1.5, Number.NaN]) assert.throws(() => buf.view(bad), RangeError);
  // Full-size frames and 490-byte ones share a set (1514 = 490 + 1024): both keep their views, alternating.
  const mixed = new FrameBuffer(MAX_PORT_FRAME_BYTES);
  const big = mixed.view(1514);
  const small = mixed.view(490);
  for (let i = 0; i < 4; i++) {
    assert.equal(mixed.view(1514), big);
    assert.equal(mixed.view(490), small);
  }
  // A third length of the set replaces the one used less recently (1514), not the last (490).
  assert.equal(mixed.view(490 + 2048).length, 490 + 2048);
  assert.equal(mixed.view(490), small);
  assert.notEqual(mixed.view(1514), big);
  assert.equal(mixed.cachedViews, 2);
});

test("MemoryPortPair: frames cross in order; fd readable exactly while frames are pending", () => {
  const pair = new MemoryPortPair("t", 4);
  try {
    const buf = new Uint8Array(MAX_PORT_FRAME_BYTES);
    assert.equal(pair.b.receive(buf), 0);
    assert.equal(readable(pair.b.fd), false);
    assert.equal(pair.a.send(frame(60, 1)), true);
    assert.equal(pair.a.send(frame(1514, 2)), true);
    assert.equal(readable(pair.b.fd), true);
    assert.equal(readable(pair.a.fd), false);
    assert.equal(pair.b.receive(buf), 60);
    assert.equal(buf[0], 1);
    assert.equal(readable(pair.b.fd), true);
    assert.equal(pair.b.receive(buf), 1514);
    assert.equal(buf[1513], 2);
    assert.equal(readable(pair.b.fd), false);
    assert.equal(pair.b.receive(buf), 0);
    // Capacity 4: the fifth is dropped and counted.
    for (let i = 0; i < 4; i++) assert.equal(pair.a.send(frame(64, i)), true);
    assert.equal(pair.a.send(frame(64, 9)), false);
    assert.equal(pair.a.counters.txDropped, 1);
    assert.equal(pair.a.counters.txFrames, 6);
    // A frame larger than the receiver's buffer is dropped, the next one delivered.
    const small = new Uint8Array(32);
    assert.equal(pair.b.receive(small), 0, "all four are 64 bytes: none fits");
    assert.equal(pair.b.counters.rxOversize, 4);
    assert.equal(pair.b.send(frame(10, 3)), true);
    assert.equal(pair.a.receive(small), 10);
  } finally {
    pair.close();
  }
});

test("DatagramPairPort: two ends wired back to back; missing peer counted; peer restarts", () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "partis-port-"));
  const pa = path.join(dir, "vm-a.sock");
  const pb = path.join(dir, "vm-b.sock");
  try {
    assert.throws(() => DatagramPairPort.open(pa, pa), (e: unknown) => e instanceof NetworkPortError);
    const a = DatagramPairPort.open(pa, pb);
    const buf = new Uint8Array(MAX_PORT_FRAME_BYTES);
    assert.equal(a.send(frame(60, 1)), false, "b not there yet");
    assert.equal(a.counters.txNoPeer, 1);
    let b = DatagramPairPort.open(pb, pa);
    assert.equal(a.send(frame(1514, 5)), true);
    assert.equal(readable(b.fd), true);
    assert.equal(b.receive(buf), 1514);
    assert.equal(buf[100], 5);
    assert.equal(b.receive(buf), 0);
    assert.equal(b.send(frame(64, 6)), true);
    assert.equal(a.receive(buf), 64);
    b.close();
    assert.ok(!fs.existsSync(pb), "the socket file goes with the port");
    assert.equal(a.send(frame(60, 1)), false);
    b = DatagramPairPort.open(pb, pa);
    assert.equal(a.send(frame(60, 7)), true, "peer came back");
    assert.equal(b.receive(buf), 60);
    assert.equal(a.counters.txNoPeer, 2);
    assert.equal(b.send(frame(70, 8)), true);
    assert.equal(a.receive(buf), 70);
    // b restarts again and speaks first: a hears it at once (its receiving socket is not tied to the old b).
    b.close();
    b = DatagramPairPort.open(pb, pa);
    assert.equal(b.send(frame(80, 9)), true, "the restarted end reaches the other before it has sent anything");
    assert.equal(b.counters.txNoPeer, 0);
    assert.equal(a.receive(buf), 80);
    assert.equal(buf[50], 9);
    // a's sender finds its old association dead, readdresses by path, and reaches the new b.
    assert.equal(a.send(frame(90, 10)), true);
    assert.equal(b.receive(buf), 90);
    assert.equal(b.send(frame(100, 11)), true);
    assert.equal(a.receive(buf), 100);
    for (let i = 0; i < 50; i++) {
      assert.equal(a.send(frame(60, i)), true);
      assert.equal(b.receive(buf), 60);
      assert.equal(b.send(frame(61, i)), true);
      assert.equal(a.receive(buf), 61);
    }
    b.close();
    a.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("TapPort: opens a TAP; a frame to a down interface is dropped and counted", () => {
  assert.ok(fs.existsSync("/dev/net/tun"), "/dev/net/tun does not exist on this host (modprobe tun)");
  const port = TapPort.open("pport%d");
  try {
    assert.match(port.interfaceName, /^pport\d+$/);
    assert.equal(port.name, `tap:${port.interfaceName}`);
    const buf = new Uint8Array(MAX_PORT_FRAME_BYTES);
    assert.equal(port.receive(buf), 0);
    assert.equal(port.send(frame(60, 0xff)), false);
    assert.equal(port.counters.txDropped, 1);
  } finally {
    port.close();
  }
});

test("TapPort.sendHost: a frame gathered from host spans reaches the interface whole; down or unmapped: dropped or refused", () => {
  const port = TapPort.open("pport%d");
  const ram = alignedBuffer(3 * 4096);
  try {
    const stat = (name: string) => Number(fs.readFileSync(`/sys/class/net/${port.interfaceName}/statistics/${name}`, "utf8"));
    // A 300-byte broadcast frame (local experimental EtherType 0x88b5) in three pieces of `ram`.
    const f = frame(300, 0x5a);
    f.fill(0xff, 0, 6);
    f.set([0x52, 0x54, 0, 0, 0, 1], 6);
    f.set([0x88, 0xb5], 12);
    const at = [100, 5000, 9000];
    const lengths = Uint32Array.from([14, 186, 100]);
    ram.set(f.subarray(0, 14), at[0]);
    ram.set(f.subarray(14, 200), at[1]);
    ram.set(f.subarray(200), at[2]);
    const base = Number(addressOfView(ram));
    const addresses = Float64Array.from(at, (o) => base + o);

    assert.equal(port.sendHost(addresses, lengths, 3, 300), false, "interface down: dropped");
    assert.equal(port.counters.txDropped, 1);
    setInterfaceUp(port.interfaceName, true);
    const packets = stat("rx_packets");
    const bytes = stat("rx_bytes");
    assert.equal(port.sendHost(addresses, lengths, 3, 300), true);
    assert.equal(stat("rx_packets"), packets + 1, "one frame");
    assert.equal(stat("rx_bytes"), bytes + 300, "all three spans, as one frame");
    assert.equal(port.counters.txFrames, 1);
    assert.equal(port.counters.txBytes, 300);
    // A span outside memory Partis mapped is refused before any system call.
    assert.throws(() => port.sendHost(Float64Array.from([4096]), Uint32Array.from([64]), 1, 64), RangeError);
    assert.equal(stat("rx_packets"), packets + 1);
  } finally {
    port.close();
    releaseMapping(ram);
  }
});

test("TapPort with a virtio-net header: frames go out and come in behind a 12-byte header; the kernel refuses a bad one; receive offloads set", async () => {
  const { execFileSync } = await import("node:child_process");
  const dgram = await import("node:dgram");
  const port = TapPort.open("pport%d", { vnetHeader: true });
  const plain = TapPort.open("pport%d");
  try {
    assert.equal(port.vnetHeader, true);
    assert.equal(plain.vnetHeader, false);
    const stat = (name: string) => Number(fs.readFileSync(`/sys/class/net/${port.interfaceName}/statistics/${name}`, "utf8"));
    setInterfaceUp(port.interfaceName, true);
    const f = frame(300, 0x5a);
    f.fill(0xff, 0, 6);
    f.set([0x52, 0x54, 0, 0, 0, 1], 6);
    f.set([0x88, 0xb5], 12);
    const packets = stat("rx_packets");
    const bytes = stat("rx_bytes");
    const withHeader = new Uint8Array(12 + 300);
    withHeader.set(f, 12);
    assert.equal(port.send(withHeader), true);
    assert.equal(stat("rx_packets"), packets + 1);
    assert.equal(stat("rx_bytes"), bytes + 300, "the header is not part of the frame");
    withHeader[1] = 0x42; // no such GSO type: the kernel refuses the header
    assert.equal(port.send(withHeader), false);
    assert.equal(stat("rx_packets"), packets + 1);
    assert.equal(port.counters.txDropped, 1);
    port.setReceiveOffloads({ csum: true, tso4: true, tso6: true, ecn: true });
    port.setReceiveOffloads({ csum: false, tso4: true, tso6: true, ecn: true }); // TSO without csum: asked for as none, not refused
    port.setReceiveOffloads({ csum: false, tso4: false, tso6: false, ecn: false });
    // A frame from the host: an ARP request for a neighbour on the interface's subnet.
    execFileSync("ip", ["addr", "add", "10.254.77.1/24", "dev", port.interfaceName]);
    const sock = dgram.createSocket("udp4");
    await new Promise<void>((resolve) => sock.send(Buffer.from("x"), 9, "10.254.77.2", () => resolve()));
    sock.close();
    const buf = new Uint8Array(MAX_PORT_FRAME_BYTES);
    let n = 0;
    for (let i = 0; i < 100 && n === 0; i++) {
      await new Promise((r) => setTimeout(r, 20));
      // Stop at the ARP request: the host's own IPv6 frames (neighbour discovery) may follow it into `buf`.
      for (let m; n === 0 && (m = port.receive(buf)) > 0; ) if (buf[12 + 12] === 0x08 && buf[12 + 13] === 0x06) n = m;
    }
    assert.ok(n >= 12 + 42, `an ARP request arrived behind its header (${n} bytes)`);
    assert.deepEqual([...buf.subarray(12, 18)], [0xff, 0xff, 0xff, 0xff, 0xff, 0xff], "broadcast, right after the header");
    assert.equal(buf[1], 0, "no GSO type on a small frame");
  } finally {
    port.close();
    plain.close();
  }
});

test("TapPort.openQueues: one multi-queue interface, a port per queue, each sending; a detached queue gets no frames; single- and multi-queue opens do not mix", async () => {
  const { execFileSync } = await import("node:child_process");
  const dgram = await import("node:dgram");
  assert.throws(() => TapPort.openQueues("pport%d", 0), NetworkPortError);
  const [single] = TapPort.openQueues("pport%d", 1);
  const ports = TapPort.openQueues("pport%d", 2, { vnetHeader: true });
  try {
    assert.equal(single!.multiQueue, false, "one queue: a plain TAP");
    const name = ports[0]!.interfaceName;
    assert.equal(ports[1]!.interfaceName, name, "both queues belong to one interface");
    assert.notEqual(Number(fs.readFileSync(`/sys/class/net/${name}/tun_flags`, "utf8")) & 0x100, 0, "IFF_MULTI_QUEUE");
    assert.throws(() => TapPort.open(name), /TAP_CREATE_FAILED|cannot create/, "a single-queue open of a multi-queue interface");
    const stat = (s: string) => Number(fs.readFileSync(`/sys/class/net/${name}/statistics/${s}`, "utf8"));
    setInterfaceUp(name, true);
    const f = new Uint8Array(12 + 120);
    f.fill(0xff, 12, 18);
    f.set([0x52, 0x54, 0, 0, 0, 1, 0x88, 0xb5], 18);
    const before = stat("rx_packets");
    assert.equal(ports[0]!.send(f), true);
    assert.equal(ports[1]!.send(f), true);
    assert.equal(stat("rx_packets"), before + 2, "a frame from each queue");
    // Queue 1 detached: every frame from the host comes to queue 0.
    ports[1]!.setQueueEnabled(false);
    execFileSync("ip", ["addr", "add", "10.254.78.1/24", "dev", name]);
    const sock = dgram.createSocket("udp4");
    for (let host = 2; host < 10; host++) await new Promise<void>((resolve) => sock.send(Buffer.from("x"), 9, `10.254.78.${host}`, () => resolve()));
    sock.close();
    const buf = new Uint8Array(MAX_PORT_FRAME_BYTES);
    const arps = [0, 0];
    for (let i = 0; i < 50 && arps[0]! < 8; i++) {
      await new Promise((r) => setTimeout(r, 20));
      ports.forEach((p, q) => {
        while (p.receive(buf) > 0) if (buf[12 + 12] === 0x08 && buf[12 + 13] === 0x06) arps[q]!++;
      });
    }
    assert.ok(arps[0]! >= 8, `ARP requests for 8 neighbours on queue 0 (${arps[0]})`);
    assert.equal(arps[1], 0, "none on the detached queue");
    ports[1]!.setQueueEnabled(true);
    ports[1]!.setQueueEnabled(true); // already attached: nothing to do
  } finally {
    for (const p of ports) p.close();
    single!.close();
  }
});
