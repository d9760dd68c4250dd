/**
 * Partis's devices seen from a real, stock Linux guest (Debian 6.1 kernel, its
 * own virtio_pci/virtio_blk/virtio_net/virtio_console/virtio-rng, ata_piix,
 * sr_mod and ne2k-pci drivers), in the nested test host on a PVM machine.
 *
 *  - storage: a raw disk (cache=none: O_DIRECT) and a VHDX disk
 *    (directsync: O_DIRECT and O_DSYNC) on virtio-blk, a VHD disk on the IDE
 *    controller (cache=none) and an ISO on the ATAPI CD-ROM; the guest sees
 *    the write cache modes and turns the raw disk's off; files written in one
 *    boot are read back (contents and checksums) after a restart of the VM;
 *  - the virtio-console byte channel carries bytes both ways over its socket,
 *    and so does a named port of the virtio-serial device (MULTIPORT): the
 *    guest finds it by its name in sysfs;
 *  - the entropy source feeds the guest's hwrng;
 *  - virtio-vsock: the guest's AF_VSOCK connects to host services (UNIX
 *    sockets <path>_<port>) and moves 1 MiB each way intact; a host program
 *    connects to a guest listener (CONNECT port); a port with no service is
 *    refused;
 *  - two VMs wired back to back (AF_UNIX datagram pairs) ping each other over
 *    virtio-net and over the NE2000, and a VM pings the host through a TAP;
 *    over that TAP (checksum and segmentation offloads negotiated) 4 MiB go
 *    each way by TCP, checked by SHA-256, the host seeing frames larger than
 *    the MTU (TSO).
 */
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, constants, mkdtempSync, mkdirSync, openSync, readFileSync, writeFileSync, existsSync, rmSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { GuestSession, READY } from "./guest-session.js";
import { openFlagsOn } from "../storage/tools/oracle.js";
import { initrdWithTools } from "./guest-tools.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "partis-devices-"));
/**
 * The cache=none disk's directory: under the working directory, a file
 * system that takes O_DIRECT where the test tmpfs may not (in the nested
 * test host: the 9p share of this checkout; its /tmp is a tmpfs).
 */
mkdirSync(join(process.cwd(), ".cache"), { recursive: true });
const directDir = mkdtempSync(join(process.cwd(), ".cache", "guest-direct-"));
/** Whether that file system takes O_DIRECT (else Partis must say it fell back). */
const directHere = ((): boolean => {
  const probe = join(directDir, "probe");
  writeFileSync(probe, Buffer.alloc(4096));
  try {
    closeSync(openSync(probe, constants.O_RDONLY | constants.O_DIRECT));
    return true;
  } catch {
    return false;
  } finally {
    rmSync(probe);
  }
})();

function runArgs(script: string, extra: readonly string[]): string[] {
  const b64 = Buffer.from(script, "utf8").toString("base64");
  const append = `console=ttyS0 quiet panic=-1 partis.run=b64:${b64}`;
  // The x86 kernel keeps 2047 bytes of its command line and drops the rest without a word.
  if (append.length > 2047) throw new Error(`the guest script's command line is ${append.length} bytes, over the kernel's 2047`);
  return ["--append", append, ...extra];
}

async function runToEnd(s: GuestSession): Promise<{ status: number; output: string; stderr: string }> {
  s.endInput();
  const status = await s.exited;
  return { status, output: s.output, stderr: s.stderr };
}

function value(output: string, key: string): string | undefined {
  return new RegExp(`^${key}=(.*?)\\r?$`, "m").exec(output)?.[1];
}

describe("disks and a CD-ROM: virtio-blk (raw on packed virtqueues, cache=none, rate-limited; VHDX on split ones, directsync), IDE (VHD, cache=none, rate-limited), ATAPI (ISO); data survives a restart", () => {
  const raw = join(directDir, "virtio.raw");
  const vhdx = join(directDir, "virtio.vhdx");
  const vhd = join(directDir, "ide.vhd");
  const iso = join(dir, "cd.iso");
  const channel = join(dir, "channel.sock");
  const namedChannel = join(dir, "named.sock");
  const screenshot = join(dir, "screen.ppm");
  let first: { status: number; output: string; stderr: string };
  let second: { status: number; output: string; stderr: string };
  let channelReceived = "";
  let namedReceived = "";
  /** Open flags seen on the raw and VHDX images' descriptors in the running VMM, polled through both boots. */
  const rawFlags: number[] = [];
  const vhdxFlags: number[] = [];
  const vhdFlags: number[] = [];

  before(async () => {
    writeFileSync(raw, Buffer.alloc(0));
    execFileSync("truncate", ["-s", "64M", raw]);
    execFileSync(process.execPath, [CLI, "disk", "new", "--type", "dynamic", "--size", "64M", vhdx]);
    execFileSync(process.execPath, [CLI, "disk", "new", "--type", "dynamic", "--size", "64M", vhd]);
    const isoDir = join(dir, "iso");
    mkdirSync(isoDir);
    writeFileSync(join(isoDir, "hello.txt"), "PARTIS-ISO-CONTENT\n");
    execFileSync("genisoimage", ["-quiet", "-V", "PARTISCD", "-o", iso, isoDir]);
    // The raw disk offers packed virtqueues (the guest's virtio_ring takes them), the VHDX one split only;
    // all three disks bypass the host's page cache (O_DIRECT), the VHDX's writes each synchronous too (O_DSYNC).
    // The raw disk and the IDE disk are rate-limited too: the guest's virtio requests are held by the device and done
    // later, out of order; its IDE write commands wait with BSY set.
    const disks = ["--disk", `${raw},packed,cache=none,serial=PARTIS-RAW-7,iops=100,mbps_wr=4`, "--disk", `${vhdx},cache=directsync`, "--disk", `${vhd},if=ide,cache=none,mbps_wr=2`, "--cdrom", iso];
    const watchFlags = (s: GuestSession): NodeJS.Timeout =>
      setInterval(() => {
        if (s.child.pid === undefined) return;
        rawFlags.push(...openFlagsOn(s.child.pid, raw));
        vhdxFlags.push(...openFlagsOn(s.child.pid, vhdx));
        vhdFlags.push(...openFlagsOn(s.child.pid, vhd));
      }, 250);

    const script1 = [
      "for b in vda vdb sda sr0; do echo DRIVER-$b=$(basename $(readlink /sys/block/$b/device/driver) 2>/dev/null); done",
      "for b in vda vdb; do echo FEATURES-$b=$(cat /sys/block/$b/device/features); echo WC-$b=$(cat /sys/block/$b/cache_type); echo SERIAL-$b=$(cat /sys/block/$b/serial); done",
      // The guest turns vda's write cache off (CONFIG_WCE): its files below are then written with a flush after every write.
      "echo 'write through' > /sys/block/vda/cache_type; echo WC2-vda=$(cat /sys/block/vda/cache_type)",
      "echo PIIX=$(ls /sys/bus/pci/drivers/ata_piix | grep -c 0000:)",
      "for d in vda vdb sda; do mkdir -p /mnt/$d; mke2fs -q /dev/$d && mount /dev/$d /mnt/$d && echo PARTIS-FILE-$d > /mnt/$d/file && dd if=/dev/urandom of=/mnt/$d/big bs=64k count=48 2>/dev/null && echo SUM1-$d=$(md5sum /mnt/$d/big | cut -d' ' -f1); umount /mnt/$d; done",
      "mkdir -p /mnt/cd; mount -t iso9660 -o ro /dev/sr0 /mnt/cd && echo ISO=$(cat /mnt/cd/hello.txt); umount /mnt/cd",
      "echo RNG=$(cat /sys/class/misc/hw_random/rng_current); echo RNGBYTES=$(head -c 64 /dev/hwrng | wc -c)",
      "echo FB=$(cat /proc/fb); echo PARTIS-ON-SCREEN > /dev/tty1",
      // One open file for both directions: bytes that arrive while no one has the tty open are lost in the guest.
      "exec 3<>/dev/hvc0; stty -F /dev/hvc0 raw -echo; echo GUEST-TO-HOST >&3; read -r line <&3; echo CHANNEL-GOT=$line; exec 3>&-",
      // The named port: found by its name; writes wait until the host side is open (PORT_OPEN from the device).
      "for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = org.partis.test ] && v=/dev/${p##*/}; done; echo VPORT=$v",
      "exec 4<>$v; echo PORT-G2H >&4; read -r l <&4; echo PORT-GOT=$l; exec 4>&-",
      "sync; poweroff -f",
    ].join("\n");
    const s1 = new GuestSession(runArgs(script1, [...disks, "--channel", channel, "--channel", `${namedChannel},name=org.partis.test`, "--rng", "--cpus", "2", "--screenshot", screenshot]), { ...process.env, PARTIS_STATS: "1" });
    // The host end of each channel: connect once the VM listens, answer the guest's line (again for a rebooted VM).
    const sockets: Socket[] = [];
    const answer = (path: string, expect: string, reply: string, seen: (text: string) => void): void => {
      const tryConnect = (generation: number): void => {
        if (s1.child.exitCode !== null || generation !== s1.generation) return;
        if (!existsSync(path)) {
          setTimeout(() => tryConnect(generation), 200);
          return;
        }
        const c = connect(path);
        sockets.push(c);
        let got = "";
        let replied = false;
        c.on("error", () => setTimeout(() => tryConnect(generation), 200));
        c.on("data", (d) => {
          const text = d.toString("latin1");
          seen(text);
          got += text;
          if (!replied && got.includes(expect)) {
            replied = true;
            c.write(reply);
          }
        });
      };
      s1.onEachLaunch(tryConnect);
    };
    answer(channel, "GUEST-TO-HOST", "HOST-TO-GUEST\n", (t) => (channelReceived += t));
    answer(namedChannel, "PORT-G2H", "PORT-H2G\n", (t) => (namedReceived += t));
    const poll1 = watchFlags(s1);
    first = await runToEnd(s1);
    clearInterval(poll1);
    for (const c of sockets) c.destroy();

    const script2 = [
      "for d in vda vdb sda; do mkdir -p /mnt/$d; mount /dev/$d /mnt/$d && echo READ-$d=$(cat /mnt/$d/file) && echo SUM2-$d=$(md5sum /mnt/$d/big | cut -d' ' -f1); umount /mnt/$d; done",
      "poweroff -f",
    ].join("\n");
    const s2 = new GuestSession(runArgs(script2, disks));
    const poll2 = watchFlags(s2);
    second = await runToEnd(s2);
    clearInterval(poll2);
  });

  after(() => rmSync(directDir, { recursive: true, force: true }));

  test("cache modes: the VMM holds the raw and VHD images with O_DIRECT (cache=none), the VHDX with O_DIRECT|O_DSYNC (directsync) where the file system takes O_DIRECT, and says so where it does not", () => {
    const seen = (flags: number[]): string => flags.map((f) => f.toString(8)).join(", ");
    const direct = (flags: number[]): boolean => flags.some((f) => (f & constants.O_DIRECT) !== 0);
    if (directHere) {
      assert.ok(direct(rawFlags), `no O_DIRECT descriptor seen on ${raw} (flags seen: ${seen(rawFlags)})`);
      assert.ok(vhdxFlags.some((f) => (f & constants.O_DIRECT) !== 0 && (f & constants.O_DSYNC) !== 0), `no O_DIRECT|O_DSYNC descriptor seen on ${vhdx} (flags seen: ${seen(vhdxFlags)})`);
      assert.ok(direct(vhdFlags), `no O_DIRECT descriptor seen on ${vhd} (flags seen: ${seen(vhdFlags)})`);
      assert.doesNotMatch(first.stderr + second.stderr, /O_DIRECT/, "nothing fell back");
    } else {
      assert.match(first.stderr, /virtio-blk0 \(.*virtio\.raw\): the file system refused O_DIRECT; using buffered I\/O/);
      assert.match(first.stderr, /virtio-blk1 \(.*virtio\.vhdx\): the file system refused O_DIRECT; using buffered I\/O/);
      assert.match(first.stderr, /ide-disk2 \(.*ide\.vhd\): the file system refused O_DIRECT; using buffered I\/O/);
      assert.ok(!direct(rawFlags) && !direct(vhdxFlags) && !direct(vhdFlags));
      assert.ok(vhdxFlags.some((f) => (f & constants.O_DSYNC) !== 0), "directsync keeps O_DSYNC without O_DIRECT");
    }
  });

  test("the guest's own drivers bind: virtio_blk for both virtio disks, ata_piix + sd for IDE, sr for the CD-ROM", () => {
    const o = first.output;
    assert.equal(value(o, "DRIVER-vda"), "virtio_blk", `${o.slice(-3000)}\n${first.stderr}`);
    assert.equal(value(o, "DRIVER-vdb"), "virtio_blk");
    assert.equal(value(o, "DRIVER-sda"), "sd");
    assert.equal(value(o, "DRIVER-sr0"), "sr");
    assert.equal(value(o, "PIIX"), "1");
  });

  test("the guest sees each virtio disk's write cache as its cache mode has it (CONFIG_WCE: cache=none write back, directsync write through) and can turn it off", () => {
    assert.equal(value(first.output, "WC-vda"), "write back", first.output.slice(-3000));
    assert.equal(value(first.output, "WC-vdb"), "write through");
    assert.equal(value(first.output, "WC2-vda"), "write through", "the device took the guest's write to its writeback field");
  });

  test("the guest reads each virtio disk's serial number: the one given (serial=), else the drive's id", () => {
    assert.equal(value(first.output, "SERIAL-vda"), "PARTIS-RAW-7", first.output.slice(-3000));
    assert.equal(value(first.output, "SERIAL-vdb"), "virtio-blk1");
  });

  test("the guest chose packed virtqueues where offered (VIRTIO_F_RING_PACKED, bit 34): the raw disk, not the VHDX one", () => {
    const bit = (d: string): string | undefined => value(first.output, `FEATURES-${d}`)?.charAt(34);
    assert.equal(bit("vda"), "1", first.output.slice(-3000));
    assert.equal(bit("vdb"), "0");
  });

  test("the rate-limited disks held some of the guest's requests (their data is checked below), the other virtio disk none; none is left held", () => {
    const stat = (key: string): number | undefined => {
      const m = new RegExp(`"${key.replace(/\./g, "\\.")}":(\\d+)`).exec(first.stderr);
      return m === null ? undefined : Number(m[1]);
    };
    assert.ok((stat("virtio-blk0.throttled") ?? 0) > 0, `virtio-blk0.throttled: ${String(stat("virtio-blk0.throttled"))}\n${first.stderr.slice(-2000)}`);
    assert.equal(stat("virtio-blk1.throttled"), 0);
    assert.equal(stat("virtio-blk0.heldNow"), 0);
    assert.ok((stat("ide0.throttled") ?? 0) > 0, `ide0.throttled: ${String(stat("ide0.throttled"))}`);
  });

  test("files written through virtio-blk (raw and VHDX) and IDE (VHD) are read back after a restart", () => {
    for (const d of ["vda", "vdb", "sda"]) {
      assert.equal(value(second.output, `READ-${d}`), `PARTIS-FILE-${d}`, `${d}\n${second.output.slice(-3000)}\n${second.stderr}`);
      const sum1 = value(first.output, `SUM1-${d}`);
      assert.match(sum1 ?? "", /^[0-9a-f]{32}$/, `${d}: no checksum in the first boot`);
      assert.equal(value(second.output, `SUM2-${d}`), sum1, `${d}: 3 MiB of random data changed across the restart`);
    }
  });

  test("the disk images stay valid: qemu-img checks the VHDX and reads the VHD; partis disk check passes both", () => {
    execFileSync("qemu-img", ["check", vhdx]);
    // qemu-img has no check for VHD ("vpc"): its info must parse the footer and the sizes must agree.
    const info = JSON.parse(execFileSync("qemu-img", ["info", "--output=json", vhd], { encoding: "utf8" })) as { format: string; "virtual-size": number };
    assert.equal(info.format, "vpc");
    assert.ok(info["virtual-size"] >= 64 * 1024 * 1024);
    for (const p of [vhd, vhdx]) execFileSync(process.execPath, [CLI, "disk", "check", p]);
  });

  test("the CD-ROM reads the ISO's file", () => {
    assert.equal(value(first.output, "ISO"), "PARTIS-ISO-CONTENT");
  });

  test("virtio-rng is the guest's hwrng and delivers bytes", () => {
    assert.match(value(first.output, "RNG") ?? "", /^virtio_rng/);
    assert.equal(value(first.output, "RNGBYTES"), "64");
  });

  test("the console channel carries bytes guest -> host and host -> guest", () => {
    assert.match(channelReceived, /GUEST-TO-HOST/);
    assert.equal(value(first.output, "CHANNEL-GOT"), "HOST-TO-GUEST");
  });

  test("a named channel is a port of the guest's virtio-serial device under its name, and carries bytes both ways", () => {
    assert.match(value(first.output, "VPORT") ?? "", /^\/dev\/vport\d+p1$/, first.output.slice(-3000));
    assert.match(namedReceived, /PORT-G2H/);
    assert.equal(value(first.output, "PORT-GOT"), "PORT-H2G");
  });

  test("the framebuffer: the guest's vesafb binds and its console draws text the host sees", () => {
    assert.equal(value(first.output, "FB"), "0 VESA VGA");
    const ppm = readFileSync(screenshot);
    const header = "P6\n1024 768\n255\n";
    assert.equal(ppm.subarray(0, header.length).toString("latin1"), header);
    let lit = 0;
    for (let i = header.length; i < ppm.length; i++) if (ppm[i] !== 0) lit++;
    assert.ok(lit > 200, `only ${lit} non-black bytes on the screen`);
  });

  test("both boots power off cleanly", () => {
    assert.equal(first.status, 0, first.stderr);
    assert.equal(second.status, 0, second.stderr);
  });
});

/** Deterministic bytes the host sends the guest over TCP (the guest prints their SHA-256). */
function downloadBytes(n: number): Buffer {
  const b = Buffer.alloc(n);
  let x = 0x2545f491;
  for (let i = 0; i < n; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b.writeUInt32LE(x >>> 0, i);
  }
  return b;
}

describe("networks: two VMs back to back over virtio-net and a rate-limited NE2000, and a VM to the host over TAP", () => {
  let a: { status: number; output: string; stderr: string };
  let b: { status: number; output: string; stderr: string };
  const tap = "ptap-test0";
  const TRANSFER = 4 << 20;
  const download = downloadBytes(TRANSFER);
  /** What the host's upload server saw: the bytes' SHA-256, and the TAP's frames up to then. */
  const upload = { sha: "", bytes: 0, rxPackets: 0, rxBytes: 0, neighbour: "" };
  const servers: Server[] = [];

  before(async () => {
    // The host's end of the TCP transfers (the test runs where the TAP is): 5000 takes the guest's upload and
    // closes after TRANSFER bytes; 5001 sends `download` and closes.
    const up = createServer((sock) => {
      const h = createHash("sha256");
      sock.on("data", (d: Buffer) => {
        h.update(d);
        upload.bytes += d.length;
        if (upload.bytes >= TRANSFER && upload.sha === "") {
          upload.sha = h.digest("hex");
          const stat = (name: string) => Number(readFileSync(`/sys/class/net/${tap}/statistics/${name}`, "utf8"));
          upload.rxPackets = stat("rx_packets");
          upload.rxBytes = stat("rx_bytes");
          // The address the host learnt for the guest (from its ARP replies): the one the guest set.
          upload.neighbour = execFileSync("ip", ["neigh", "show", "10.0.2.2", "dev", tap], { encoding: "utf8" }).trim();
          sock.end();
        }
      });
      sock.on("error", () => undefined);
    });
    const down = createServer((sock) => {
      sock.on("error", () => undefined);
      sock.end(download);
    });
    servers.push(up, down);
    await Promise.all([new Promise<void>((r) => up.listen(5000, "0.0.0.0", r)), new Promise<void>((r) => down.listen(5001, "0.0.0.0", r))]);
    const sock = (n: string) => join(dir, n);
    // Shell functions (the script travels on the kernel command line, at most 2047 bytes there): pl IP KEY pings
    // until it answers, then 3 more, one at a time, each with 10 s for its reply (busybox's `ping -c 3` waits only
    // about 1 s for the last reply once it has had one, and a nested TCG guest can take longer: two CI runs counted
    // "2 packets received" so); nic MAC IP KEY reports the driver and negotiated features and brings it up.
    // Interfaces are found by MAC: the guest names them in driver load order, not slot order.
    const ifmac = [
      'ifmac() { for i in /sys/class/net/*; do [ "$(cat $i/address)" = "$1" ] && basename $i; done; }',
      "pl() { ok=0; for i in $(seq 1 60); do ping -c1 -W1 $1 >/dev/null 2>&1 && { ok=1; break; }; done; echo $2=$ok; n=0; for i in 1 2 3; do ping -c1 -W10 $1 >/dev/null 2>&1 && n=$((n+1)); done; echo $2-RECEIVED=$n; }",
      "nic() { i=$(ifmac $1); echo DRIVER-$3=$(basename $(readlink /sys/class/net/$i/device/driver)); echo FEATURES-$3=$(cat /sys/class/net/$i/device/features 2>/dev/null); ip addr add $2/24 dev $i; ip link set $i up; }",
      // meet PEER: the VMs wait for each other's pings to end before either goes on (and powers off): each
      // listens once its own pings are over and connects to the other's listener (over virtio-net) until it answers.
      "meet() { nc -l -p 7000 </dev/null >/dev/null 2>&1 & for k in $(seq 1 120); do nc -w 1 $1 7000 </dev/null >/dev/null 2>&1 && break; sleep 1; done; }",
    ].join("\n");
    const pingLoop = (ip: string, key: string) => `pl ${ip} ${key}`;
    const nic = (mac: string, ip: string, key: string) => `nic ${mac} ${ip} ${key}`;
    const scriptA = [
      ifmac,
      nic("52:54:00:00:00:a0", "10.0.0.1", "virtio"),
      nic("52:54:00:00:00:a1", "10.0.1.1", "ne2k"),
      nic("52:54:00:00:00:a2", "10.0.2.2", "tap"),
      // The TAP NIC's queue pairs in use and MTU, and a new MAC address (the device must take it: its filter now
      // passes unicast frames to the new address only, so the pings and transfers below go through it).
      "i=$(ifmac 52:54:00:00:00:a2); n=/sys/class/net/$i; ip link set $i address 52:54:00:00:00:a9; echo TAPQ=$(ls -d $n/queues/rx-*|wc -l) TAPMTU=$(cat $n/mtu) TAPMAC=$(cat $n/address)",
      pingLoop("10.0.0.2", "VIRTIO-PING"),
      pingLoop("10.0.1.2", "NE2K-PING"),
      "meet 10.0.0.2",
      pingLoop("10.0.2.1", "TAP-PING"),
      `dd if=/dev/urandom of=/tmp/up bs=4096 count=${TRANSFER / 4096} 2>/dev/null; echo UP-SHA=$(sha256sum < /tmp/up | cut -d' ' -f1)`,
      // The upload from the second vCPU: it transmits on the second queue pair, and the TAP steers the flow's
      // frames back to that pair; Q1 counts the pair's receive and transmit interrupts.
      "timeout 120 taskset 2 nc 10.0.2.1 5000 < /tmp/up > /dev/null; echo UP-DONE=$?",
      "timeout 120 nc 10.0.2.1 5001 < /dev/null > /tmp/down; echo DOWN-SHA=$(sha256sum < /tmp/down | cut -d' ' -f1); echo DOWN-BYTES=$(wc -c < /tmp/down)",
      "awk '/input\\.1/{i+=$2+$3}/output\\.1/{o+=$2+$3}END{print \"Q1=\"i\",\"o}' /proc/interrupts",
      "sleep 5; poweroff -f",
    ].join("\n");
    const scriptB = [
      ifmac,
      nic("52:54:00:00:00:b0", "10.0.0.2", "virtio"),
      nic("52:54:00:00:00:b1", "10.0.1.2", "ne2k"),
      pingLoop("10.0.0.1", "VIRTIO-PING"),
      pingLoop("10.0.1.1", "NE2K-PING"),
      // 60 more echoes, one page each way: both receive rings go round past their end (52 pages).
      "n=0; for i in $(seq 60); do ping -c1 -W10 10.0.1.1 >/dev/null 2>&1 && n=$((n+1)); done; echo NE2K-60=$n",
      // A 30 KB echo: 21 fragments back to back each way, more than the rate-limited NE2000s' buckets hold.
      "ping -c1 -W20 -s 30000 10.0.1.1 >/dev/null 2>&1; echo NE2K-BIG=$?",
      "meet 10.0.0.1",
      "sleep 5; poweroff -f",
    ].join("\n");
    const nicsA = [
      "--nic", `dgram:${sock("a0")}:${sock("b0")},model=virtio,mac=52:54:00:00:00:a0`,
      // Both NE2000s at their least rate (0.1 MiB/s each way: buckets of 10 KiB).
      "--nic", `dgram:${sock("a1")}:${sock("b1")},model=ne2k,mac=52:54:00:00:00:a1,rate=0.1`,
      // Two queue pairs on a multi-queue TAP (VM A has two vCPUs, so its driver uses both) and a 1400-byte MTU.
      "--nic", `tap:${tap},model=virtio,mac=52:54:00:00:00:a2,queues=2,mtu=1400`,
    ];
    const nicsB = [
      // B's virtio NIC offers packed virtqueues: a packed ring talks to a split one.
      "--nic", `dgram:${sock("b0")}:${sock("a0")},model=virtio,mac=52:54:00:00:00:b0,packed`,
      "--nic", `dgram:${sock("b1")}:${sock("a1")},model=ne2k,mac=52:54:00:00:00:b1,rate=0.1`,
    ];
    // PARTIS_STATS: the NE2000s' counters reach stderr at exit (read by the NE2000 ping test).
    const sa = new GuestSession(runArgs(scriptA, [...nicsA, "--name", "vm-a", "--cpus", "2"]), { ...process.env, PARTIS_STATS: "1" });
    const sb = new GuestSession(runArgs(scriptB, [...nicsB, "--name", "vm-b"]), { ...process.env, PARTIS_STATS: "1" });
    // The host side of the TAP: address it once the VM has created it (again for a rebooted VM: a new TAP).
    const configureTap = (generation: number): void => {
      if (sa.child.exitCode !== null || generation !== sa.generation) return;
      if (!existsSync(`/sys/class/net/${tap}`)) {
        setTimeout(() => configureTap(generation), 200);
        return;
      }
      try {
        execFileSync("ip", ["addr", "add", "10.0.2.1/24", "dev", tap]);
        execFileSync("ip", ["link", "set", tap, "up"]);
      } catch {
        setTimeout(() => configureTap(generation), 200); // the TAP went away under us (its VM is being replaced)
      }
    };
    sa.onEachLaunch(configureTap);
    // A VM booted once more after a test-bed crash (docs/guests.md) voids what its peer measured meanwhile (pings into
    // a rebooting VM go unanswered): the peer is restarted with it. A peer's own restart does not bounce back.
    sa.onEachLaunch((g) => void (g > 0 && sa.relaunchReason === "crash" && sb.relaunchWithPeer()));
    sb.onEachLaunch((g) => void (g > 0 && sb.relaunchReason === "crash" && sa.relaunchWithPeer()));
    [a, b] = await Promise.all([runToEnd(sa), runToEnd(sb)]);
  });
  after(() => {
    for (const s of servers) s.close();
    rmSync(dir, { recursive: true, force: true });
  });

  test("the guest's virtio_net and ne2k-pci drivers bind", () => {
    for (const r of [a, b]) {
      assert.equal(value(r.output, "DRIVER-virtio"), "virtio_net", `${r.output.slice(-3000)}\n${r.stderr}`);
      assert.equal(value(r.output, "DRIVER-ne2k"), "ne2k-pci");
    }
    assert.equal(value(a.output, "DRIVER-tap"), "virtio_net");
    assert.equal(value(b.output, "FEATURES-virtio")?.charAt(34), "1", "VM B's virtio NIC runs on packed virtqueues");
    assert.equal(value(a.output, "FEATURES-virtio")?.charAt(34), "0", "VM A's on split ones");
  });

  test("ping between the two VMs over virtio-net", () => {
    for (const r of [a, b]) {
      assert.equal(value(r.output, "VIRTIO-PING"), "1", `${r.output.slice(-3000)}\n${r.stderr}`);
      assert.equal(value(r.output, "VIRTIO-PING-RECEIVED"), "3", "three more pings, each answered");
    }
  });

  test("ping between the two VMs over the emulated NE2000 (rate-limited: 0.1 MiB/s): small echoes past the rings' end, and a 30 KB one", (t) => {
    // The NE2000s' host-side counters (PARTIS_STATS): frames, drops, holds for the rate limit, and acknowledgements
    // of PRX that came after a frame the driver had not yet seen (lib8390 acknowledges after reading the ring).
    const counters = (r: { stderr: string }): string =>
      [...r.stderr.matchAll(/"nic\d+\.(rxFrames|rxDropped|rxFiltered|rxHeld|rxAckRaces|throttled|stops|txFrames|txDroppedByPort|txErrors)":(\d+)/g)].map((m) => `${m[1]} ${m[2]}`).join(", ");
    const both = `VM A's NE2000: ${counters(a)}\nVM B's NE2000: ${counters(b)}`;
    t.diagnostic(`VM A's NE2000: ${counters(a)}`);
    t.diagnostic(`VM B's NE2000: ${counters(b)}`);
    const detail = `${both}\n--- VM A ---\n${a.output.slice(-2500)}\n--- VM B ---\n${b.output.slice(-2500)}`;
    for (const [name, r] of [["A", a], ["B", b]] as const) {
      assert.equal(value(r.output, "NE2K-PING"), "1", `VM ${name}\n${detail}`);
      assert.equal(value(r.output, "NE2K-PING-RECEIVED"), "3", `three more pings, each answered: VM ${name}\n${detail}`);
    }
    // Until the twenty-fifth session, a receive ring that went round exactly at its end dropped every frame after.
    assert.equal(value(b.output, "NE2K-60"), "60", `60 echoes in a row, each answered (both rings go round)\n${detail}`);
    assert.equal(value(b.output, "NE2K-BIG"), "0", `a 30 KB echo through both rate-limited NE2000s, and its reply\n${detail}`);
  });

  test("ping from a VM to the host through a TAP device", () => {
    assert.equal(value(a.output, "TAP-PING"), "1", `${a.output.slice(-3000)}\n${a.stderr}`);
  });

  test("over the multi-queue TAP the guest runs two queue pairs, takes the MTU, and changes its MAC address through the control queue", (t) => {
    const features = value(a.output, "FEATURES-tap") ?? "";
    for (const [bit, name] of [[3, "MTU"], [17, "CTRL_VQ"], [18, "CTRL_RX"], [22, "MQ"], [23, "CTRL_MAC_ADDR"]] as const) assert.equal(features.charAt(bit), "1", `${name} negotiated on the TAP NIC (${features})`);
    const line = /^TAPQ=(\d+) TAPMTU=(\d+) TAPMAC=(\S+)\r?$/m.exec(a.output);
    assert.deepEqual(line?.slice(1), ["2", "1400", "52:54:00:00:00:a9"], a.output.slice(-3000));
    assert.match(upload.neighbour, /lladdr 52:54:00:00:00:a9/, "the host reached the guest at its new address");
    const [rx1, tx1] = (value(a.output, "Q1") ?? "").split(",").map(Number);
    t.diagnostic(`second queue pair's interrupts in the guest: input.1 ${rx1}, output.1 ${tx1}`);
    assert.ok(rx1! > 0, `the second pair received (interrupts: input.1 ${rx1}, output.1 ${tx1})`);
  });

  test("over the TAP, offloads are negotiated and TCP carries 4 MiB each way intact, the guest sending segmentation-offload frames", () => {
    const features = value(a.output, "FEATURES-tap") ?? "";
    for (const [bit, name] of [[0, "CSUM"], [1, "GUEST_CSUM"], [7, "GUEST_TSO4"], [11, "HOST_TSO4"]] as const) assert.equal(features.charAt(bit), "1", `${name} negotiated on the TAP NIC (${features})`);
    assert.equal(value(a.output, "FEATURES-virtio")?.charAt(0), "0", "no offloads on a datagram-pair NIC");
    assert.equal(upload.sha, value(a.output, "UP-SHA"), `the host received what the guest sent (${upload.bytes} bytes)\n${a.output.slice(-3000)}`);
    assert.ok(upload.rxBytes / upload.rxPackets > 1514, `frames from the guest average ${Math.round(upload.rxBytes / upload.rxPackets)} bytes: larger than the MTU, so TSO frames went through whole`);
    assert.equal(value(a.output, "DOWN-BYTES"), String(TRANSFER));
    assert.equal(value(a.output, "DOWN-SHA"), createHash("sha256").update(download).digest("hex"), "the guest received what the host sent");
  });

  test("both VMs power off cleanly", () => {
    assert.equal(a.status, 0, a.stderr);
    assert.equal(b.status, 0, b.stderr);
  });
});

describe("vsock: AF_VSOCK stream sockets between the guest and host programs, both ways (Firecracker's UNIX-socket convention)", () => {
  const vdir = mkdtempSync(join(tmpdir(), "partis-vsock-"));
  const sock = join(vdir, "v.sock");
  const BULK = 1 << 20;
  const down = downloadBytes(BULK);
  /** What the host's services and the host program saw. */
  const seen = { hello: "", upMd5: "", upBytes: 0, ok: "", fromGuestServer: "", hostConnectError: "" };
  const servers: Server[] = [];
  let r: { status: number; output: string; stderr: string };

  before(async () => {
    const initrd = await initrdWithTools(["vsock"]);
    const serve = (port: number, onConnection: (s: Socket) => void): Promise<void> => {
      const srv = createServer(onConnection);
      servers.push(srv);
      return new Promise((res) => srv.listen(`${sock}_${port}`, res));
    };
    await Promise.all([
      // 1234 answers after the guest's end of stream; 1235 hashes an upload; 1236 sends BULK bytes. Nothing listens on 4444.
      serve(1234, (s) => {
        let got = "";
        s.on("data", (d: Buffer) => (got += d.toString("latin1")));
        s.on("end", () => {
          seen.hello = got;
          s.end("HOST-REPLY\n");
        });
        s.on("error", () => undefined);
      }),
      serve(1235, (s) => {
        const h = createHash("md5");
        s.on("data", (d: Buffer) => {
          h.update(d);
          seen.upBytes += d.length;
        });
        s.on("end", () => {
          seen.upMd5 = h.digest("hex");
          s.end(`${seen.upMd5}\n`);
        });
        s.on("error", () => undefined);
      }),
      serve(1236, (s) => {
        s.on("error", () => undefined);
        s.end(down);
      }),
    ]);
    const script = [
      'for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0013 ] && echo VSOCK-DRIVER=$(basename $(readlink $d/driver)); done',
      "echo VS-HELLO=$(echo GUEST-HELLO | vsock connect 2 1234)",
      `dd if=/dev/urandom of=/tmp/up bs=64k count=${BULK / 65536} 2>/dev/null; echo UP-MD5=$(md5sum < /tmp/up | cut -d' ' -f1); echo VS-UP=$(vsock connect 2 1235 < /tmp/up)`,
      "echo DOWN-MD5=$(vsock connect 2 1236 < /dev/null | md5sum | cut -d' ' -f1)",
      "echo VS-REFUSED=$(vsock connect 2 4444 < /dev/null 2>&1)",
      "echo GUEST-SERVER | vsock listen 5555 > /tmp/got; echo VS-LISTEN=$? $(cat /tmp/got)",
      "poweroff -f",
    ].join("\n");
    const s = new GuestSession(runArgs(script, ["--initrd", initrd, "--vsock", `${sock},cid=42`]), { ...process.env, PARTIS_STATS: "1" });
    // The host program: once the guest listens, CONNECT 5555; after OK, send a line and end; read the guest's line.
    void s.waitFor("VSOCK-LISTENING 5555").then(() => {
      const c = connect(sock);
      let buf = "";
      c.on("connect", () => c.write("CONNECT 5555\n"));
      c.on("data", (d: Buffer) => {
        buf += d.toString("latin1");
        if (seen.ok === "" && buf.includes("\n")) {
          seen.ok = buf.slice(0, buf.indexOf("\n"));
          buf = buf.slice(buf.indexOf("\n") + 1);
          c.end("HOST-TO-GUEST\n");
        }
      });
      c.on("end", () => (seen.fromGuestServer = buf));
      c.on("error", (e) => (seen.hostConnectError = e.message));
    });
    r = await runToEnd(s);
  });
  after(() => {
    for (const srv of servers) srv.close();
    rmSync(vdir, { recursive: true, force: true });
  });

  const detail = (): string => `${r.output.slice(-3000)}\n${r.stderr.slice(-2000)}`;

  test("the guest's vmw_vsock_virtio_transport binds the device", () => {
    assert.equal(value(r.output, "VSOCK-DRIVER"), "vmw_vsock_virtio_transport", detail());
  });

  test("the guest connects to host services (<socket>_<port>): a line each way, 1 MiB each way intact", () => {
    assert.equal(seen.hello, "GUEST-HELLO\n", detail());
    assert.equal(value(r.output, "VS-HELLO"), "HOST-REPLY", detail());
    assert.equal(seen.upBytes, BULK, detail());
    assert.equal(value(r.output, "VS-UP"), value(r.output, "UP-MD5"), `the host hashed what the guest sent\n${detail()}`);
    assert.equal(value(r.output, "DOWN-MD5"), createHash("md5").update(down).digest("hex"), `the guest received what the host sent\n${detail()}`);
  });

  test("a port no host service listens on is refused", () => {
    assert.match(value(r.output, "VS-REFUSED") ?? "", /connect: Connection (reset by peer|refused)/, detail());
  });

  test("a host program connects to the guest's listener (CONNECT port, OK <host port>): a line each way", () => {
    assert.equal(seen.hostConnectError, "", detail());
    assert.equal(seen.ok, "OK 1073741824", detail());
    assert.equal(seen.fromGuestServer, "GUEST-SERVER\n", detail());
    assert.equal(value(r.output, "VS-LISTEN"), "0 HOST-TO-GUEST", detail());
  });

  test("the device's counters agree, no connection is left open, and the VM powers off cleanly", () => {
    const stat = (key: string): number | undefined => {
      const m = new RegExp(`"vsock0\\.${key}":(\\d+)`).exec(r.stderr);
      return m === null ? undefined : Number(m[1]);
    };
    assert.equal(stat("fromGuest"), 3, detail());
    assert.equal(stat("fromHost"), 1, detail());
    assert.equal(stat("refused"), 1, detail());
    assert.equal(stat("badPackets"), 0, detail());
    assert.equal(stat("open"), 0, detail());
    assert.equal(r.status, 0, detail());
  });
});

void READY;
