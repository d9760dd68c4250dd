import { test } from "node:test";
import assert from "node:assert/strict";
import { EXIT_BOUND_DEVICE_KINDS, vcpuThreadsFor } from "../../src/worker/vm-config.js";
import type { DeviceSpec } from "../../src/worker/device-plan.js";

const rng: DeviceSpec = { kind: "virtio-rng", id: "rng0" };
const net: DeviceSpec = { kind: "virtio-net", id: "nic0", mac: "52:54:00:00:00:01", backend: { kind: "none" } };
const cdrom: DeviceSpec = { kind: "ide-cdrom", id: "cdrom0", disk: undefined };
const ne2k: DeviceSpec = { kind: "ne2k", id: "nic1", mac: "52:54:00:00:00:02", backend: { kind: "none" } };

test("vcpuThreadsFor: a kind the configuration names wins; else native-main, or a worker per vCPU when a device is exit-bound", () => {
  assert.equal(vcpuThreadsFor({}), "native-main");
  assert.equal(vcpuThreadsFor({ devices: [rng, net] }), "native-main");
  assert.equal(vcpuThreadsFor({ devices: [rng, cdrom] }), "worker");
  assert.equal(vcpuThreadsFor({ devices: [ne2k] }), "worker");
  for (const kind of ["worker", "native", "native-main"] as const) {
    assert.equal(vcpuThreadsFor({ vcpuThreads: kind, devices: [cdrom] }), kind);
    assert.equal(vcpuThreadsFor({ vcpuThreads: kind }), kind);
  }
  assert.deepEqual([...EXIT_BOUND_DEVICE_KINDS].sort(), ["ide-cdrom", "ide-disk", "ne2k"]);
});
