/**
 * Host network FFI: AF_UNIX datagram and stream sockets, socketpair, and a TAP
 * interface (needs root and /dev/net/tun: where /dev/net/tun is missing the
 * TAP test fails and says so).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as dgram from "node:dgram";
import { execFileSync } from "node:child_process";
import {
  HostNetworkError,
  acceptStream,
  closeDescriptor,
  connectStream,
  listenStream,
  openDatagramSocket,
  openTap,
  readFrame,
  receiveDatagram,
  sendDatagram,
  sendDatagramTo,
  sendStream,
  setInterfaceUp,
  socketBufferBytes,
  socketPair,
  unixAddress,
  writeFrame,
} from "../../src/hypervisor/host-network.js";

function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "partis-net-"));
}

function bytes(...v: number[]): Uint8Array {
  return Uint8Array.from(v);
}

test("unixAddress: filesystem and abstract names; too long is a typed error naming the path", () => {
  const a = unixAddress("/tmp/x.sock");
  assert.equal(a.length, 2 + "/tmp/x.sock".length + 1);
  assert.equal(a.bytes[0], 1);
  const b = unixAddress("@partis-test");
  assert.equal(b.abstract, true);
  assert.equal(b.bytes[2], 0);
  assert.equal(b.length, 3 + "partis-test".length);
  const long = "/tmp/" + "x".repeat(120);
  assert.throws(
    () => unixAddress(long),
    (e: unknown) => e instanceof HostNetworkError && e.code === "UNIX_BAD_PATH" && e.context["path"] === long,
  );
});

test("socketPair(datagram): one datagram per receive; empty queue reads -1; truncation reports the full length", () => {
  const [a, b] = socketPair("datagram");
  try {
    const buf = new Uint8Array(64);
    assert.equal(receiveDatagram(b, buf), -1);
    assert.equal(sendDatagram(a, bytes(1, 2, 3), 3), true);
    assert.equal(sendDatagram(a, bytes(4, 5), 2), true);
    assert.equal(receiveDatagram(b, buf), 3);
    assert.deepEqual([...buf.subarray(0, 3)], [1, 2, 3]);
    assert.equal(receiveDatagram(b, buf), 2);
    assert.deepEqual([...buf.subarray(0, 2)], [4, 5]);
    const big = new Uint8Array(200).fill(7);
    assert.equal(sendDatagram(a, big, 200), true);
    assert.equal(receiveDatagram(b, buf), 200, "MSG_TRUNC gives the real length");
    assert.equal(receiveDatagram(b, buf), -1);
  } finally {
    closeDescriptor(a);
    closeDescriptor(b);
  }
});

test("socketPair(seqpacket) and closed peer", () => {
  const [a, b] = socketPair("seqpacket");
  const buf = new Uint8Array(16);
  assert.equal(sendDatagram(a, bytes(9, 9), 2), true);
  assert.equal(receiveDatagram(b, buf), 2);
  closeDescriptor(a);
  assert.equal(receiveDatagram(b, buf), 0, "EOF");
  assert.equal(sendDatagram(b, bytes(1), 1), "no-peer");
  closeDescriptor(b);
});

test("datagram sockets bound to paths: sendto the peer path, missing peer, full queue", () => {
  const dir = tempDir();
  const pa = path.join(dir, "a.sock");
  const pb = path.join(dir, "b.sock");
  const a = openDatagramSocket({ localPath: pa, peerPath: pb });
  try {
    assert.ok(fs.existsSync(pa));
    const frame = new Uint8Array(60).fill(0x42);
    assert.equal(sendDatagramTo(a.fd, a.peer!, frame, 60), "no-peer", "nobody at b yet");
    const b = openDatagramSocket({ localPath: pb, peerPath: pa, connect: true });
    try {
      assert.equal(sendDatagramTo(a.fd, a.peer!, frame, 60), true);
      const buf = new Uint8Array(2048);
      assert.equal(receiveDatagram(b.fd, buf), 60);
      assert.equal(buf[59], 0x42);
      assert.equal(sendDatagram(b.fd, bytes(1, 2, 3, 4), 4), true, "connected send");
      assert.equal(receiveDatagram(a.fd, buf), 4);
      // The receiver queues a bounded number of datagrams (net.unix.max_dgram_qlen): then EAGAIN.
      let sent = 0;
      let last: true | string = true;
      for (let i = 0; i < 10_000 && last === true; i++) {
        last = sendDatagramTo(a.fd, a.peer!, frame, 60);
        if (last === true) sent++;
      }
      assert.equal(last, "again");
      assert.ok(sent >= 1);
      let got = 0;
      while (receiveDatagram(b.fd, buf) > 0) got++;
      assert.equal(got, sent);
      const bufs = socketBufferBytes(b.fd);
      assert.ok(bufs.send > 0 && bufs.receive > 0);
    } finally {
      closeDescriptor(b.fd);
    }
    // b's file remains but nobody is bound: connection refused.
    assert.equal(sendDatagramTo(a.fd, a.peer!, frame, 60), "no-peer");
  } finally {
    closeDescriptor(a.fd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("datagram socket: connecting to a missing peer is a typed error with both paths; a stale socket file is replaced", () => {
  const dir = tempDir();
  const pa = path.join(dir, "a.sock");
  try {
    assert.throws(
      () => openDatagramSocket({ localPath: pa, peerPath: path.join(dir, "none.sock"), connect: true }),
      (e: unknown) => e instanceof HostNetworkError && e.code === "UNIX_CONNECT_FAILED" && e.context["peer"] === path.join(dir, "none.sock") && e.context["errno"] === "ENOENT",
    );
    const s1 = openDatagramSocket({ localPath: pa });
    closeDescriptor(s1.fd);
    const s2 = openDatagramSocket({ localPath: pa, bufferBytes: 1 << 20 });
    // Root (CAP_NET_ADMIN) gets the size asked for whatever net.core.rmem_max says; others get it capped there.
    const receive = socketBufferBytes(s2.fd).receive;
    if (process.getuid?.() === 0) assert.ok(receive >= 1 << 20, `receive buffer ${receive}`);
    else assert.ok(receive > 0);
    closeDescriptor(s2.fd);
    assert.throws(
      () => openDatagramSocket({ localPath: path.join(dir, "missing-dir", "x.sock") }),
      (e: unknown) => e instanceof HostNetworkError && e.code === "UNIX_BIND_FAILED" && String(e.context["path"]).endsWith("x.sock"),
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("abstract-namespace datagram sockets", () => {
  const tag = `@partis-net-test-${process.pid}`;
  const a = openDatagramSocket({ localPath: tag + "-a", peerPath: tag + "-b" });
  const b = openDatagramSocket({ localPath: tag + "-b", peerPath: tag + "-a" });
  try {
    assert.equal(sendDatagramTo(a.fd, a.peer!, bytes(5, 6), 2), true);
    const buf = new Uint8Array(8);
    assert.equal(receiveDatagram(b.fd, buf), 2);
    assert.equal(buf[1], 6);
  } finally {
    closeDescriptor(a.fd);
    closeDescriptor(b.fd);
  }
});

test("stream listener: accept4 non-blocking, connect, send/receive, EOF", () => {
  const dir = tempDir();
  const p = path.join(dir, "s.sock");
  const l = listenStream(p);
  try {
    assert.equal(acceptStream(l), undefined);
    const client = connectStream(p);
    const server = acceptStream(l);
    assert.ok(server !== undefined && server >= 0);
    const buf = new Uint8Array(16);
    assert.equal(receiveDatagram(server, buf), -1, "nothing yet");
    assert.equal(sendStream(client, bytes(1, 2, 3), 3), 3);
    assert.equal(receiveDatagram(server, buf), 3);
    closeDescriptor(client);
    assert.equal(receiveDatagram(server, buf), 0, "EOF");
    closeDescriptor(server);
    assert.throws(
      () => connectStream(path.join(dir, "nobody.sock")),
      (e: unknown) => e instanceof HostNetworkError && e.code === "UNIX_CONNECT_FAILED",
    );
  } finally {
    closeDescriptor(l);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("TAP: create with IFF_TAP|IFF_NO_PI, non-blocking, frames both ways", async () => {
  assert.ok(
    fs.existsSync("/dev/net/tun"),
    "/dev/net/tun does not exist on this host: load the tun module (modprobe tun) or create the node (mknod /dev/net/tun c 10 200)",
  );
  assert.throws(() => openTap({ name: "x".repeat(20) }), (e: unknown) => e instanceof HostNetworkError && e.code === "TAP_BAD_NAME");
  const tap = openTap({ name: "ptest%d" });
  try {
    assert.match(tap.name, /^ptest\d+$/);
    assert.ok(fs.existsSync(`/sys/class/net/${tap.name}`));
    const buf = new Uint8Array(2048);
    assert.equal(readFrame(tap.fd, buf), -1, "non-blocking, nothing pending");
    const frame = new Uint8Array(60);
    frame.fill(0xff, 0, 6); // broadcast
    frame.set([0x52, 0x54, 0x00, 0x12, 0x34, 0x56], 6);
    frame[12] = 0x88;
    frame[13] = 0xb5; // local experimental ethertype
    assert.equal(writeFrame(tap.fd, frame, 60), false, "interface down: refused (EIO)");
    setInterfaceUp(tap.name, true);
    const rx = (): number => Number(fs.readFileSync(`/sys/class/net/${tap.name}/statistics/rx_packets`, "utf8"));
    const before = rx();
    assert.equal(writeFrame(tap.fd, frame, 60), true);
    assert.equal(rx(), before + 1, "the host interface received the frame");

    // Host -> TAP: give the interface an address and send UDP to a neighbour: the kernel ARPs out of the TAP.
    let haveIp = true;
    try {
      execFileSync("ip", ["addr", "add", "10.213.77.1/30", "dev", tap.name], { stdio: "ignore" });
    } catch {
      haveIp = false;
    }
    if (haveIp) {
      const sock = dgram.createSocket("udp4");
      await new Promise<void>((resolve) => sock.send(Buffer.from("hi"), 9, "10.213.77.2", () => resolve()));
      sock.close();
      let arp = false;
      const deadline = Date.now() + 3000;
      while (!arp && Date.now() < deadline) {
        const n = readFrame(tap.fd, buf);
        if (n < 0) {
          await new Promise((r) => setTimeout(r, 10));
          continue;
        }
        if (n >= 42 && buf[12] === 0x08 && buf[13] === 0x06) arp = true;
      }
      assert.ok(arp, "an ARP request came out of the TAP");
    } else {
      console.log("# `ip` is not available: host-to-TAP direction not exercised");
    }
  } finally {
    closeDescriptor(tap.fd);
  }
  assert.ok(!fs.existsSync(`/sys/class/net/${tap.name}`), "non-persistent TAP goes away with its fd");
});

test("TAP with a vnet header", () => {
  assert.ok(fs.existsSync("/dev/net/tun"), "/dev/net/tun does not exist on this host");
  const tap = openTap({ vnetHeader: true });
  try {
    assert.equal(tap.vnetHeader, true);
    assert.match(tap.name, /^tap\d+$/);
  } finally {
    closeDescriptor(tap.fd);
  }
});
