/**
 * `partis run` device flags resolved into device specs (src/cli/device-options.ts):
 * what reaches the worker for the NIC options (bad input is covered by
 * run-input.test.ts, through the real CLI).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { resolveDevices } from "../../src/cli/device-options.js";
import { UsageError } from "../../src/errors.js";

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
