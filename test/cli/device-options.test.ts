/**
 * `partis run` device flags resolved into device specs (src/cli/device-options.ts):
 * what reaches the worker for the NIC options and disk cache modes (bad
 * input is covered by run-input.test.ts, through the real CLI, and here for
 * cache modes).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { resolveDevices } from "../../src/cli/device-options.js";
import { UsageError } from "../../src/errors.js";
import { createDisk } from "../../src/storage/open.js";
import { scratchDir } from "../storage/tools/oracle.js";

const tun = existsSync("/dev/net/tun");

test("--nic offload: a virtio NIC on a TAP keeps its offloads unless offload=off; packed and offload combine", { skip: tun ? false : "no /dev/net/tun" }, () => {
  const [plain, off, on, both] = resolveDevices({ nic: ["tap:pt0", "tap:pt1,offload=off", "tap:pt2,offload=on", "tap:pt3,packed,offload=off"] }, "vm", 1);
  assert.equal(plain?.kind, "virtio-net");
  assert.equal(plain !== undefined && "offloads" in plain, false, "default: nothing said, offloads on");
  assert.equal(off !== undefined && "offloads" in off ? off.offloads : undefined, false);
  assert.equal(on !== undefined && "offloads" in on, false, "offload=on is the default");
  assert.ok(both !== undefined && "offloads" in both && both.offloads === false && both.ringPacked === true);
});

test("--nic offload=off is accepted on a datagram pair or none (nothing to turn off); offload=on is not", () => {
  const [n] = resolveDevices({ nic: ["none,offload=off"] }, "vm", 1);
  assert.ok(n !== undefined && "offloads" in n && n.offloads === false);
  assert.throws(() => resolveDevices({ nic: ["none,offload=on"] }, "vm", 1), UsageError);
  assert.throws(() => resolveDevices({ nic: ["none,model=ne2k,offload=off"] }, "vm", 1), UsageError);
});

test("--nic queues=N and mtu=N: carried to a virtio NIC (queues on a TAP only); out of range, on an NE2000 or a single-queue back end refused", { skip: tun ? false : "no /dev/net/tun" }, () => {
  const [mq, one, mtu] = resolveDevices({ nic: ["tap:pt0,queues=4", "tap:pt1,queues=1", "dgram:/tmp/a.sock:/tmp/b.sock,mtu=9000"] }, "vm", 2);
  assert.ok(mq !== undefined && "queues" in mq && mq.queues === 4);
  assert.equal(one !== undefined && "queues" in one, false, "one queue: the default, a plain TAP");
  assert.ok(mtu !== undefined && "mtu" in mtu && mtu.mtu === 9000);
  for (const bad of ["tap:pt0,queues=0", "tap:pt0,queues=65", "tap:pt0,queues", "tap:pt0,queues=2x", "dgram:/tmp/a.sock:/tmp/b.sock,queues=2", "none,queues=2", "tap:pt0,model=ne2k,queues=2", "tap:pt0,mtu=67", "tap:pt0,mtu=65536", "tap:pt0,model=ne2k,mtu=1500"])
    assert.throws(() => resolveDevices({ nic: [bad] }, "vm", 1), UsageError, bad);
});

test("--disk iops/mbps limits and --nic rate: carried to virtio and IDE disks and to NICs in operations and bytes per second; bad values and a NE2000 below 0.1 MiB/s refused", () => {
  const { dir, cleanup } = scratchDir("cli-limits");
  try {
    const raw = join(dir, "a.raw");
    createDisk(raw, "raw", { type: "dynamic", size: 1024 * 1024 });
    const [d, n] = resolveDevices({ disk: [`${raw},iops=500,iops_wr=100,mbps=12.5,mbps_rd=4`], nic: ["none,rate=0.5"] }, "vm", 1);
    assert.ok(d?.kind === "virtio-blk");
    assert.deepEqual(d.limits, { iops: 500, writeIops: 100, bytesPerSecond: 12.5 * 1024 * 1024, readBytesPerSecond: 4 * 1024 * 1024 });
    assert.ok(n?.kind === "virtio-net" && n.rateBytesPerSecond === 512 * 1024);
    const [plain] = resolveDevices({ disk: [raw] }, "vm", 1);
    assert.ok(plain?.kind === "virtio-blk" && plain.limits === undefined);
    const [ide] = resolveDevices({ disk: [`${raw},if=ide,iops_rd=50,mbps_wr=2`] }, "vm", 1);
    assert.ok(ide?.kind === "ide-disk");
    assert.deepEqual(ide.limits, { readIops: 50, writeBytesPerSecond: 2 * 1024 * 1024 });
    for (const bad of ["iops=0", "iops=1.5", "iops", "iops=-3", "mbps=0", "mbps=abc", "mbps_wr=2000000", "iops_rd=1e3", "if=ide,iops=0", "if=ide,mbps=x"])
      assert.throws(() => resolveDevices({ disk: [`${raw},${bad}`] }, "vm", 1), UsageError, bad);
    for (const bad of ["none,rate=0", "none,rate", "none,rate=fast", "none,model=ne2k,rate=0.09", "none,model=ne2k,rate=0"]) assert.throws(() => resolveDevices({ nic: [bad] }, "vm", 1), UsageError, bad);
    assert.throws(() => resolveDevices({ nic: ["none,model=ne2k,rate=0.05"] }, "vm", 1), /watchdog/);
    const [ne2k] = resolveDevices({ nic: ["none,model=ne2k,rate=0.1"] }, "vm", 1);
    assert.ok(ne2k?.kind === "ne2k" && ne2k.rateBytesPerSecond === 0.1 * 1024 * 1024);
  } finally {
    cleanup();
  }
});

test("--disk cache=MODE: carried to the drive for raw, VHDX and VHD images (virtio and IDE); refused for a bad or missing value", () => {
  const { dir, cleanup } = scratchDir("cli-cache");
  try {
    const raw = join(dir, "a.raw");
    const vhdx = join(dir, "b.vhdx");
    const vhd = join(dir, "c.vhd");
    createDisk(raw, "raw", { type: "dynamic", size: 1024 * 1024 });
    createDisk(vhdx, "vhdx", { type: "dynamic", size: 8 * 1024 * 1024 });
    createDisk(vhd, "vhd", { type: "dynamic", size: 8 * 1024 * 1024 });
    const specs = resolveDevices({ disk: [`${raw},cache=none`, `${raw},if=ide,cache=unsafe`, raw, `${vhdx},cache=directsync`, `${vhd},cache=writethrough`, `${vhd},if=ide,cache=writeback`] }, "vm", 2);
    const caches = specs.map((s) => ("disk" in s && s.disk !== undefined ? s.disk.cache : "?"));
    assert.deepEqual(caches, ["none", "unsafe", undefined, "directsync", "writethrough", "writeback"]);
    assert.deepEqual(specs.map((s) => s.kind), ["virtio-blk", "ide-disk", "virtio-blk", "virtio-blk", "virtio-blk", "ide-disk"]);
    for (const bad of ["cache", "cache=", "cache=writeback2", "cache=NONE"])
      assert.throws(() => resolveDevices({ disk: [`${raw},${bad}`] }, "vm", 1), (e: unknown) => e instanceof UsageError && /cache takes one of writeback, none, writethrough, directsync, unsafe/.test(e.message), bad);
  } finally {
    cleanup();
  }
});

test("--disk serial=S: the guest's serial number for virtio and IDE disks; refused empty, over 20 characters or with spaces", () => {
  const { dir, cleanup } = scratchDir("cli-serial");
  try {
    const raw = join(dir, "a.raw");
    createDisk(raw, "raw", { type: "dynamic", size: 1024 * 1024 });
    const specs = resolveDevices({ disk: [`${raw},serial=PVE-0001`, `${raw},if=ide,serial=ABCDEFGHIJ0123456789,cache=none`, raw] }, "vm", 1);
    assert.deepEqual(
      specs.map((s) => ("disk" in s && s.disk !== undefined ? [s.disk.serial, s.disk.cache] : [])),
      [["PVE-0001", undefined], ["ABCDEFGHIJ0123456789", "none"], [undefined, undefined]],
    );
    for (const bad of ["serial", "serial=", "serial=ABCDEFGHIJ01234567890", "serial=a b", "serial=é"])
      assert.throws(() => resolveDevices({ disk: [`${raw},${bad}`] }, "vm", 1), (e: unknown) => e instanceof UsageError && /serial takes 1 to 20 printable ASCII characters without spaces/.test(e.message), bad);
  } finally {
    cleanup();
  }
});

test("--channel SOCK[,name=NAME]: unnamed channels are consoles of their own, named ones the ports of one virtio-serial device in the order given; bad names, repeats and unknown options refused", (t) => {
  const { dir, cleanup } = scratchDir("channels");
  t.after(cleanup);
  const [con0, con2, serial] = resolveDevices({ channel: [join(dir, "con.sock"), join(dir, "qga.sock") + ",name=org.qemu.guest_agent.0", join(dir, "con2.sock"), join(dir, "kvp.sock") + ",name=partis.kvp"] }, "vm", 1);
  assert.deepEqual(con0, { kind: "virtio-console", id: "channel0", socketPath: join(dir, "con.sock") });
  assert.deepEqual(con2, { kind: "virtio-console", id: "channel2", socketPath: join(dir, "con2.sock") }, "consoles first, in order");
  assert.deepEqual(serial, {
    kind: "virtio-serial",
    id: "serial0",
    ports: [
      { name: "org.qemu.guest_agent.0", socketPath: join(dir, "qga.sock") },
      { name: "partis.kvp", socketPath: join(dir, "kvp.sock") },
    ],
  });
  const bad: string[][] = [
    [join(dir, "a.sock") + ",name="],
    [join(dir, "a.sock") + ",name=has space"],
    [join(dir, "a.sock") + ",name=-dash"],
    [join(dir, "a.sock") + ",name=a/b"],
    [join(dir, "a.sock") + ",name=" + "x".repeat(128)],
    [join(dir, "a.sock") + ",name"],
    [join(dir, "a.sock") + ",nmae=x"],
    [join(dir, "a.sock") + ",name=x", join(dir, "b.sock") + ",name=x"],
    [join(dir, "a.sock"), join(dir, "a.sock") + ",name=x"],
    [join(dir, "a.sock"), join(dir, ".", "a.sock")],
    Array.from({ length: 32 }, (_, i) => `${join(dir, `p${i}.sock`)},name=p${i}`),
  ];
  for (const b of bad) assert.throws(() => resolveDevices({ channel: b }, "vm", 1), UsageError, b.join(" ").slice(0, 200));
  assert.equal(resolveDevices({ channel: Array.from({ length: 31 }, (_, i) => `${join(dir, `p${i}.sock`)},name=p${i}`) }, "vm", 1).length, 1, "31 named channels: one device");
});

test("--vsock SOCK[,cid=N]: one virtio-vsock device, CID 3 unless given; reserved CIDs, a second --vsock, long paths and unknown options refused", (t) => {
  const { dir, cleanup } = scratchDir("vsock");
  t.after(cleanup);
  assert.deepEqual(resolveDevices({ vsock: [join(dir, "v.sock")] }, "vm", 1), [{ kind: "virtio-vsock", id: "vsock0", socketPath: join(dir, "v.sock"), cid: 3 }]);
  assert.deepEqual(resolveDevices({ vsock: [join(dir, "v.sock") + ",cid=4294967294"] }, "vm", 1)[0], { kind: "virtio-vsock", id: "vsock0", socketPath: join(dir, "v.sock"), cid: 4294967294 });
  const bad: { vsock: string[]; channel?: string[] }[] = [
    { vsock: [join(dir, "v.sock") + ",cid=2"] }, // the host
    { vsock: [join(dir, "v.sock") + ",cid=0"] },
    { vsock: [join(dir, "v.sock") + ",cid=4294967295"] }, // VMADDR_CID_ANY
    { vsock: [join(dir, "v.sock") + ",cid=-3"] },
    { vsock: [join(dir, "v.sock") + ",cid=3.5"] },
    { vsock: [join(dir, "v.sock") + ",cid"] },
    { vsock: [join(dir, "v.sock") + ",port=3"] },
    { vsock: [join(dir, "v.sock"), join(dir, "w.sock")] },
    { vsock: [join(dir, "x".repeat(Math.max(1, 97 - dir.length - 1)))] }, // PATH_<port> would not fit a UNIX socket address
    { vsock: [join(dir, "no-such-dir", "v.sock")] },
    { vsock: [join(dir, "c.sock")], channel: [join(dir, "c.sock")] },
    { vsock: [""] },
  ];
  for (const b of bad) assert.throws(() => resolveDevices(b, "vm", 1), UsageError, JSON.stringify(b).slice(0, 200));
});
