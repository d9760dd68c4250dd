import { test } from "node:test";
import assert from "node:assert/strict";
import { hintsFromArgs } from "../../src/cli/early-threads.js";
import { prestartArgs, MAX_PRESTART_VCPUS } from "../../src/worker/thread-prestart.js";

test("thread hints from `partis run` arguments: --cpus N / --cpus=N, device options, junk ignored", () => {
  const W = ["--vcpu-threads", "worker"];
  assert.deepEqual(hintsFromArgs([...W]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "4", "--memory", "1G", ...W]), { vcpus: 4, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus=8", ...W]), { vcpus: 8, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "zero", ...W]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "0", ...W]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "5000", ...W]), { vcpus: 1, devices: false }, "a count no VM can have starts no crowd of threads");
  assert.deepEqual(hintsFromArgs(["--disk", "a.raw", ...W]), { vcpus: 1, devices: true });
  assert.deepEqual(hintsFromArgs(["--nic=tap:t0", ...W]), { vcpus: 1, devices: true });
  assert.deepEqual(hintsFromArgs(["--rng", "--cpus", "2", ...W]), { vcpus: 2, devices: true });
  // --append's value is not an option, even when it looks like one.
  assert.deepEqual(hintsFromArgs(["--append", "console=ttyS0", "--framebuffer", ...W]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs([...W, "--", "--disk"]), { vcpus: 1, devices: false });
  // --vcpu-threads native: one thread runs every vCPU (their own threads are native ones).
  assert.deepEqual(hintsFromArgs(["--cpus", "16", "--vcpu-threads", "native"]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--vcpu-threads=native", "--cpus=4", "--rng"]), { vcpus: 1, devices: true });
  // --vcpu-threads native-main: no vCPU thread at all (the main thread serves the native ones).
  assert.deepEqual(hintsFromArgs(["--cpus", "8", "--vcpu-threads", "native-main"]), { vcpus: 0, devices: false });
  assert.deepEqual(hintsFromArgs(["--vcpu-threads=native-main", "--rng"]), { vcpus: 0, devices: true });
});

test("thread hints under --vcpu-threads auto (the default) follow vcpuThreadsFor: a worker per vCPU only with an IDE drive or an NE2000", () => {
  assert.deepEqual(hintsFromArgs([]), { vcpus: 0, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "4", "--vcpu-threads", "auto"]), { vcpus: 0, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "4", "--disk", "a.raw", "--nic", "tap:t0", "--rng", "--channel", "s.sock"]), { vcpus: 0, devices: true }, "virtio only");
  assert.deepEqual(hintsFromArgs(["--cpus", "4", "--disk", "a.raw,if=virtio,ro"]), { vcpus: 0, devices: true });
  assert.deepEqual(hintsFromArgs(["--cpus", "4", "--disk", "a.raw,if=ide"]), { vcpus: 4, devices: true });
  assert.deepEqual(hintsFromArgs(["--cpus=2", "--disk=a.raw,ro,if=ide"]), { vcpus: 2, devices: true });
  assert.deepEqual(hintsFromArgs(["--cpus", "3", "--cdrom", "x.iso"]), { vcpus: 3, devices: true });
  assert.deepEqual(hintsFromArgs(["--cdrom="]), { vcpus: 1, devices: true }, "an empty CD-ROM drive is an IDE drive too");
  assert.deepEqual(hintsFromArgs(["--nic", "none,model=ne2k", "--cpus", "2"]), { vcpus: 2, devices: true });
  assert.deepEqual(hintsFromArgs(["--disk", "if=ide.raw"]), { vcpus: 0, devices: true }, "a path is not an option");
  assert.deepEqual(hintsFromArgs(["--cdrom", "x.iso", "--vcpu-threads", "native"]), { vcpus: 1, devices: true }, "a kind named wins");
});

test("prestart arguments are bounded", () => {
  assert.deepEqual(prestartArgs(2, false), ["--prestart-vcpus", "2"]);
  assert.deepEqual(prestartArgs(1000, true), ["--prestart-vcpus", String(MAX_PRESTART_VCPUS), "--prestart-devices"]);
  assert.deepEqual(prestartArgs(Number.NaN, false), ["--prestart-vcpus", "1"]);
});
