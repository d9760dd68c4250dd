/**
 * `partis run` with bad input: one clear line on stderr, exit status 2,
 * nothing left running, no file changed. Runs on any host (nothing boots).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, readdirSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { makeBzImage, TRIPLE_FAULT_CODE } from "../fixtures/bzimage.js";
import { readHugePagePools } from "../../src/hypervisor/host.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "partis-run-input-"));
const kernel = join(dir, "bzImage");
writeFileSync(kernel, makeBzImage(TRIPLE_FAULT_CODE));
const notKernel = join(dir, "not-a-kernel");
writeFileSync(notKernel, Buffer.alloc(64 * 1024, 0x41));
const bigInitrd = join(dir, "big-initrd");
// Sparse 200 MiB file: larger than a 64 MiB guest can hold.
writeFileSync(bigInitrd, "");
execFileSync("truncate", ["-s", "200M", bigInitrd]);

function workerCount(): number {
  try {
    return execFileSync("pgrep", ["-f", "dist/partis/partis"], { encoding: "utf8" }).trim().split("\n").filter(Boolean).length;
  } catch {
    return 0;
  }
}

function snapshotDir(): string {
  return readdirSync(dir)
    .map((f) => `${f}:${statSync(join(dir, f)).size}:${statSync(join(dir, f)).mtimeMs}`)
    .join("|");
}

function expectUsageError(args: string[], pattern: RegExp, env: NodeJS.ProcessEnv = {}): void {
  const before = snapshotDir();
  const workersBefore = workerCount();
  const r = spawnSync(process.execPath, [CLI, "run", ...args], { encoding: "utf8", input: "", env: { ...process.env, ...env }, timeout: 60_000 });
  assert.equal(r.status, 2, `expected status 2 for ${args.join(" ")}; got ${r.status}\nstderr: ${r.stderr}`);
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `expected one line, got:\n${r.stderr}`);
  assert.match(lines[0]!, pattern);
  assert.doesNotMatch(r.stderr, /\n\s+at /, "no stack trace");
  assert.equal(r.stdout, "");
  assert.equal(workerCount(), workersBefore, "no worker left running");
  assert.equal(snapshotDir(), before, "no file changed");
}

test("missing --kernel file", () => expectUsageError(["--kernel", join(dir, "nope")], /--kernel .*nope: no such file/));
test("--kernel that is not a kernel", () => expectUsageError(["--kernel", notKernel], /not a Linux bzImage/));
test("--kernel that is a directory", () => expectUsageError(["--kernel", dir], /not a regular file/));
test("initrd larger than guest RAM allows", () =>
  expectUsageError(["--kernel", kernel, "--initrd", bigInitrd, "--memory", "64M"], /initrd .*does not fit/));
test("missing --initrd file", () => expectUsageError(["--kernel", kernel, "--initrd", join(dir, "nope.img")], /--initrd .*no such file/));
test("--memory beyond what the host has", () => expectUsageError(["--kernel", kernel, "--memory", "64T"], /--memory: .*more than this host has/));
test("--memory below the minimum", () => expectUsageError(["--kernel", kernel, "--memory", "4M"], /--memory: .*below the minimum/));
test("malformed --memory", () => expectUsageError(["--kernel", kernel, "--memory", "lots"], /--memory: "lots" is not a size/));
test("malformed --memory with a bad unit", () => expectUsageError(["--kernel", kernel, "--memory", "12X"], /--memory: "12X" is not a size/));
test("--cpus 0", () => expectUsageError(["--kernel", kernel, "--cpus", "0"], /--cpus: 0 is outside 1\.\.\d+/));
test("--cpus above KVM's maximum", () => expectUsageError(["--kernel", kernel, "--cpus", "100000"], /--cpus: 100000 is outside/));
test("--cpus not a number", () => expectUsageError(["--kernel", kernel, "--cpus", "two"], /--cpus: "two" is not a whole number/));
test("--vcpu-threads neither auto, worker, native nor native-main", () => expectUsageError(["--kernel", kernel, "--vcpu-threads", "green"], /--vcpu-threads: "green" is not auto, worker, native or native-main/));
test("--hugepages with a size that is no huge-page size", () =>
  expectUsageError(["--kernel", kernel, "--hugepages", "3M"], /--hugepages: "3M" is not a huge-page size \(2M or 1G\)/));
test("--hugepages 1G with --memory not a whole number of 1 GiB pages", () =>
  expectUsageError(["--kernel", kernel, "--hugepages", "1G", "--memory", "1536M"], /--hugepages 1 GiB: --memory 1\.5 GiB is not a whole number of 1 GiB pages/));
test("--hugepages with more memory than the host's pool has available", () => {
  // The 1 GiB pool: no other test grows it, so one page more than it has is more than it can give.
  const pool = readHugePagePools().find((p) => p.pageBytes === 2 ** 30);
  const gib = (pool?.available ?? 0) + 1;
  expectUsageError(
    ["--kernel", kernel, "--hugepages", "1024", "--memory", `${gib}G`],
    pool === undefined
      ? /--hugepages 1 GiB: this host's kernel has no 1 GiB huge-page pool/
      : new RegExp(`--hugepages 1 GiB: the guest needs ${gib} huge pages of 1 GiB; the host has ${gib - 1} available \\(of ${pool.total} in its pool; grow it with /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages\\)`),
  );
});
test("no /dev/kvm", () => expectUsageError(["--kernel", kernel], /\/dev\/kvm is missing|kvm.*missing/i, { PARTIS_KVM_DEVICE: join(dir, "no-kvm") }));
test("a /dev/kvm that is not KVM", () => expectUsageError(["--kernel", kernel], /not usable/, { PARTIS_KVM_DEVICE: notKernel }));

// Devices: every problem is caught before anything starts.
const disk = join(dir, "disk.raw");
writeFileSync(disk, Buffer.alloc(1024 * 1024));
const badVhdx = join(dir, "broken.vhdx");
writeFileSync(badVhdx, Buffer.concat([Buffer.from("vhdxfile"), Buffer.alloc(1024 * 1024)]));
test("--disk that does not exist", () => expectUsageError(["--kernel", kernel, "--disk", join(dir, "nope.raw")], /--disk .*nope\.raw: no such file/));
test("--disk that is a directory", () => expectUsageError(["--kernel", kernel, "--disk", dir], /--disk .*: is a directory/));
test("--disk with an unknown interface", () => expectUsageError(["--kernel", kernel, "--disk", `${disk},if=scsi`], /--disk .*if=scsi is not virtio or ide/));
test("--disk with an unknown option", () => expectUsageError(["--kernel", kernel, "--disk", `${disk},iothread=1`], /unknown option "iothread"/));
test("--disk with a cache mode that is not one", () => expectUsageError(["--kernel", kernel, "--disk", `${disk},cache=fast`], /--disk .*cache=fast: cache takes one of writeback, none, writethrough, directsync, unsafe/));
test("--disk packed with a value", () => expectUsageError(["--kernel", kernel, "--disk", `${disk},packed=on`], /--disk .*: packed takes no value/));
test("--disk packed on an IDE disk", () => expectUsageError(["--kernel", kernel, "--disk", `${disk},if=ide,packed`], /--disk .*: packed is for virtio devices/));
test("--nic packed on the emulated NE2000", () => expectUsageError(["--kernel", kernel, "--nic", "none,model=ne2k,packed"], /--nic none,model=ne2k,packed: packed is for virtio devices/));
test("--nic offload with a value that is not on or off", () => expectUsageError(["--kernel", kernel, "--nic", "none,offload=maybe"], /--nic none,offload=maybe: offload=maybe is not on or off/));
test("--nic offload on the emulated NE2000", () => expectUsageError(["--kernel", kernel, "--nic", "none,model=ne2k,offload=off"], /offload is for virtio NICs/));
test("--nic offload=on without a TAP", () => expectUsageError(["--kernel", kernel, "--nic", "none,offload=on"], /offloads need a TAP back end/));
test("--disk with a corrupt VHDX", () => expectUsageError(["--kernel", kernel, "--disk", badVhdx], /--disk .*broken\.vhdx: /));
test("five IDE drives", () =>
  expectUsageError(["--kernel", kernel, ...[1, 2, 3, 4].flatMap(() => ["--disk", `${disk},if=ide`]), "--cdrom", disk], /IDE drives; the IDE controller takes at most 4/));
test("--cdrom that does not exist", () => expectUsageError(["--kernel", kernel, "--cdrom", join(dir, "nope.iso")], /--cdrom .*nope\.iso: no such file/));
test("--nic with an unknown backend", () => expectUsageError(["--kernel", kernel, "--nic", "bridge:br0"], /--nic bridge:br0: unknown backend/));
test("--nic with a bad MAC", () => expectUsageError(["--kernel", kernel, "--nic", "none,mac=52:54:00:zz:00:01"], /not a MAC address/));
test("--nic with a multicast MAC", () => expectUsageError(["--kernel", kernel, "--nic", "none,mac=01:00:5e:00:00:01"], /multicast/));
test("--nic with an unknown model", () => expectUsageError(["--kernel", kernel, "--nic", "none,model=e1000"], /model=e1000 is not virtio or ne2k/));
test("--nic tap with an invalid interface name", () => expectUsageError(["--kernel", kernel, "--nic", "tap:this-name-is-far-too-long"], /not a valid interface name/));
test("--nic dgram without a peer", () => expectUsageError(["--kernel", kernel, "--nic", `dgram:${join(dir, "a.sock")}`], /expected dgram:LOCAL\.sock:PEER\.sock/));
test("--channel in a missing directory", () => expectUsageError(["--kernel", kernel, "--channel", join(dir, "no-dir", "c.sock")], /--channel .*does not exist/));
test("--channel on an existing regular file", () => expectUsageError(["--kernel", kernel, "--channel", disk], /exists and is not a socket/));
test("--channel with a name that is no port name", () => expectUsageError(["--kernel", kernel, "--channel", `${join(dir, "c.sock")},name=no spaces`], /--channel .*name must be 1-127 letters/));
test("--nic dgram whose local path is a regular file", () => expectUsageError(["--kernel", kernel, "--nic", `dgram:${disk}:${join(dir, "peer.sock")}`], /exists and is not a socket/));
