/**
 * Real, unmodified Linux guests (the stock Debian kernel and the project's
 * busybox initramfs) booted by `partis run`. Runs directly on a VT-x/AMD-V
 * host, or inside the nested test host on a PVM host (scripts/run-tests.mjs).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { GuestSession, READY, runGuestCommand } from "./guest-session.js";


function memTotalKiB(output: string): number {
  const m = /MEMTOTAL=(\d+)/.exec(output);
  assert.ok(m, `no MEMTOTAL in console output:\n${output.slice(-2000)}`);
  return Number(m[1]);
}

test("boots to the init marker and powers off with status 0", async () => {
  const r = await runGuestCommand("echo BOOTED-OK; poweroff -f");
  assert.match(r.output, new RegExp(READY));
  assert.match(r.output, /BOOTED-OK/);
  assert.equal(r.status, 0, r.stderr);
});

test("--cpus 4: the guest sees 4 online CPUs", async () => {
  const r = await runGuestCommand("echo CPUS=$(nproc); cat /sys/devices/system/cpu/online; poweroff -f", ["--cpus", "4"]);
  assert.match(r.output, /CPUS=4\b/, r.output.slice(-2000));
  assert.match(r.output, /^0-3\r?$/m);
  assert.equal(r.status, 0);
});

test("--memory 512M: MemTotal matches within the kernel's reservations", async () => {
  const r = await runGuestCommand("echo MEMTOTAL=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo); poweroff -f", ["--memory", "512M"]);
  const kib = memTotalKiB(r.output);
  assert.ok(kib <= 512 * 1024, `MemTotal ${kib} kB exceeds 512 MiB`);
  assert.ok(kib >= 512 * 1024 * 0.8, `MemTotal ${kib} kB is far below 512 MiB`);
  assert.equal(r.status, 0);
});

test("--memory 5G: a guest with RAM above 4 GiB sees all of it", async () => {
  const r = await runGuestCommand("echo MEMTOTAL=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo); poweroff -f", ["--memory", "5G"]);
  const kib = memTotalKiB(r.output);
  assert.ok(kib <= 5 * 1024 * 1024, `MemTotal ${kib} kB exceeds 5 GiB`);
  assert.ok(kib >= (5 * 1024 - 256) * 1024, `MemTotal ${kib} kB: RAM above 4 GiB is missing`);
  assert.equal(r.status, 0);
});

test("console input reaches the guest and its output comes back", async () => {
  const s = new GuestSession(["--memory", "256M"]);
  await s.waitFor(READY);
  s.type("echo SUM=$((6*7))\n");
  await s.waitFor("SUM=42");
  s.type("poweroff\n");
  assert.equal(await s.exited, 0, s.stderr);
});

test("guest reboot boots the guest again; poweroff after it exits 0", async () => {
  const s = new GuestSession(["--memory", "256M"]);
  await s.waitFor(READY);
  s.type("reboot\n");
  await s.waitFor(READY, 2);
  s.type("poweroff\n");
  assert.equal(await s.exited, 0, s.stderr);
});

test("--no-reboot: guest reboot ends the run with status 3", async () => {
  const r = await runGuestCommand("reboot -f", ["--no-reboot", "--memory", "256M"]);
  assert.equal(r.status, 3, r.stderr);
  assert.match(r.stderr, /rebooted/);
});

test("host shutdown request: the guest's ACPI power-button handling powers it off", async () => {
  const s = new GuestSession(["--memory", "256M"]);
  await s.waitFor(READY);
  s.child.kill("SIGTERM");
  assert.equal(await s.exited, 0, s.stderr);
  assert.match(s.output, /PARTIS-POWER-BUTTON/);
});
