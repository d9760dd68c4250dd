import { test } from "node:test";
import assert from "node:assert/strict";
import { hintsFromArgs } from "../../src/cli/early-threads.js";
import { prestartArgs, MAX_PRESTART_VCPUS } from "../../src/worker/thread-prestart.js";

test("thread hints from `partis run` arguments: --cpus N / --cpus=N, device options, junk ignored", () => {
  assert.deepEqual(hintsFromArgs([]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "4", "--memory", "1G"]), { vcpus: 4, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus=8"]), { vcpus: 8, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "zero"]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "0"]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--cpus", "5000"]), { vcpus: 1, devices: false }, "a count no VM can have starts no crowd of threads");
  assert.deepEqual(hintsFromArgs(["--disk", "a.raw"]), { vcpus: 1, devices: true });
  assert.deepEqual(hintsFromArgs(["--nic=tap:t0"]), { vcpus: 1, devices: true });
  assert.deepEqual(hintsFromArgs(["--rng", "--cpus", "2"]), { vcpus: 2, devices: true });
  // --append's value is not an option, even when it looks like one.
  assert.deepEqual(hintsFromArgs(["--append", "console=ttyS0", "--framebuffer"]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--", "--disk"]), { vcpus: 1, devices: false });
  // --vcpu-threads native: one thread runs every vCPU (their own threads are native ones).
  assert.deepEqual(hintsFromArgs(["--cpus", "16", "--vcpu-threads", "native"]), { vcpus: 1, devices: false });
  assert.deepEqual(hintsFromArgs(["--vcpu-threads=native", "--cpus=4", "--rng"]), { vcpus: 1, devices: true });
  // --vcpu-threads native-main: no vCPU thread at all (the main thread serves the native ones).
  assert.deepEqual(hintsFromArgs(["--cpus", "8", "--vcpu-threads", "native-main"]), { vcpus: 0, devices: false });
  assert.deepEqual(hintsFromArgs(["--vcpu-threads=native-main", "--rng"]), { vcpus: 0, devices: true });
  assert.deepEqual(hintsFromArgs(["--cpus", "4", "--vcpu-threads", "worker"]), { vcpus: 4, devices: false });
});

test("prestart arguments are bounded", () => {
  assert.deepEqual(prestartArgs(2, false), ["--prestart-vcpus", "2"]);
  assert.deepEqual(prestartArgs(1000, true), ["--prestart-vcpus", String(MAX_PRESTART_VCPUS), "--prestart-devices"]);
  assert.deepEqual(prestartArgs(Number.NaN, false), ["--prestart-vcpus", "1"]);
});
