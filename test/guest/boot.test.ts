/**
 * Real, unmodified Linux guests (the stock Debian kernel and the project's
 * busybox initramfs) booted by `partis run`. Runs directly on a VT-x/AMD-V
 * host, or inside the nested test host on a PVM host (scripts/run-tests.mjs).
 *
 * Boots are expensive in the nested host, so related checks share a boot:
 * the tests in each `describe` run in order against one VM.
 */
import { describe, test, before, after } from "node:test";
import assert from "node:assert/strict";
import { GuestSession, READY, runGuestCommand } from "./guest-session.js";
import { available2M, hugePagesUnusable, reserve2M } from "../fixtures/huge-page-pool.js";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

function memTotalKiB(output: string, tag: string): number {
  const m = new RegExp(`${tag}=(\\d+)`).exec(output);
  assert.ok(m, `no ${tag} in console output:\n${output.slice(-2000)}`);
  return Number(m[1]);
}

const MEMTOTAL = "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo";
/** Where the kernel's text sits in guest-physical memory (/proc/iomem "Kernel code"). */
const KERNEL_CODE = "sed -n 's/^ *\\([0-9a-f]*\\)-[0-9a-f]* : Kernel code$/\\1/p' /proc/iomem";

describe("a 5 GiB guest running a command at boot", () => {
  let r: { status: number; output: string; stderr: string };
  before(async () => {
    r = await runGuestCommand(`echo CPUS=$(nproc); echo MEMTOTAL=$(${MEMTOTAL}); echo KCODE=$(${KERNEL_CODE}); poweroff -f`, ["--memory", "5G"]);
  });

  test("boots to the init marker", () => {
    assert.match(r.output, new RegExp(READY), `${r.output.slice(-2000)}\n${r.stderr}`);
  });
  test("--memory 5G: RAM above 4 GiB is all there (MemTotal within the kernel's reservations)", () => {
    const kib = memTotalKiB(r.output, "MEMTOTAL");
    assert.ok(kib <= 5 * 1024 * 1024, `MemTotal ${kib} kB exceeds 5 GiB`);
    assert.ok(kib >= (5 * 1024 - 256) * 1024, `MemTotal ${kib} kB: RAM above 4 GiB is missing`);
  });
  test("guest poweroff: partis run exits 0", () => {
    assert.equal(r.status, 0, r.stderr);
  });
  test("the kernel was unpacked on the host: it runs at its link address, 16 MiB", () => {
    assert.match(r.output, /KCODE=0*1000000\b/, r.output.slice(-2000));
  });
});

test("--kernel-unpack guest: the bzImage's own decompressor boots the same kernel", async () => {
  const r = await runGuestCommand(`echo KCODE=$(${KERNEL_CODE}); poweroff -f`, ["--kernel-unpack", "guest", "--memory", "512M"]);
  assert.match(r.output, new RegExp(READY), `${r.output.slice(-2000)}\n${r.stderr}`);
  assert.match(r.output, /KCODE=[0-9a-f]+\b/);
  assert.equal(r.status, 0, r.stderr);
});

test("--cpus 4: the guest sees 4 online CPUs, and SMP poweroff ends the run with status 0", async () => {
  const r = await runGuestCommand("echo CPUS=$(nproc); echo ONLINE=$(cat /sys/devices/system/cpu/online); poweroff -f", ["--cpus", "4", "--memory", "512M"]);
  assert.match(r.output, /CPUS=4\b/, `${r.output.slice(-2000)}\n${r.stderr}`);
  assert.match(r.output, /ONLINE=0-3\b/);
  assert.equal(r.status, 0, r.stderr);
});

// Two vCPUs, not four: the nested test host's own kernel dies more often the more vCPUs its guests
// have (docs/guests.md); the --cpus 4 test above covers that count.
for (const [kind, handler] of [["native", "the one exit-handling thread"], ["native-main", "the VM's main thread"]] as const) {
  test(`--vcpu-threads ${kind}: 2 vCPUs on native threads boot; disks (virtio-blk, IDE) and virtio-rng work through ${handler}`, async () => {
    const dir = mkdtempSync(join(tmpdir(), "partis-native-vcpus-"));
    try {
      const disks = ["virtio", "ide"].map((bus) => {
        const path = join(dir, `${bus}.raw`);
        writeFileSync(path, Buffer.alloc(8 << 20));
        return ["--disk", `${path},if=${bus}`];
      });
      const script = [
        "echo CPUS=$(nproc)",
        // A pattern through each disk's own driver, read back past the page cache.
        "for d in vda sda; do dd if=/dev/urandom of=/tmp/$d.in bs=64k count=32 2>/dev/null; dd if=/tmp/$d.in of=/dev/$d bs=64k oflag=direct 2>/dev/null; dd if=/dev/$d of=/tmp/$d.out bs=64k count=32 iflag=direct 2>/dev/null; cmp -s /tmp/$d.in /tmp/$d.out && echo SAME-$d; done",
        "echo RNGBYTES=$(head -c 64 /dev/hwrng | wc -c)",
        "poweroff -f",
      ].join("; ");
      const r = await runGuestCommand(script, ["--cpus", "2", "--memory", "512M", "--vcpu-threads", kind, "--rng", ...disks.flat()]);
      assert.match(r.output, /CPUS=2\b/, `${r.output.slice(-2000)}\n${r.stderr}`);
      assert.match(r.output, /SAME-vda/, r.output.slice(-2000));
      assert.match(r.output, /SAME-sda/, r.output.slice(-2000));
      assert.match(r.output, /RNGBYTES=64\b/);
      assert.equal(r.status, 0, r.stderr);
      // The host file holds what the guest wrote (not zeros any more).
      assert.ok(readFileSync(join(dir, "virtio.raw")).subarray(0, 1 << 21).some((b) => b !== 0));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

describe("an interactive 512 MiB guest on the console", () => {
  let s: GuestSession;
  before(async () => {
    s = new GuestSession(["--memory", "512M"]);
    await s.waitFor(READY);
  });
  after(() => s.kill());

  test("console input reaches the guest and its output comes back", async () => {
    s.type("echo SUM=$((6*7))\n");
    await s.waitFor(/SUM=42/);
  });
  test("--memory 512M: MemTotal matches within the kernel's reservations", async () => {
    s.type(`echo MEMTOTAL512=$(${MEMTOTAL})\n`);
    await s.waitFor(/MEMTOTAL512=\d+\r?\n/);
    const kib = memTotalKiB(s.output, "MEMTOTAL512");
    assert.ok(kib <= 512 * 1024, `MemTotal ${kib} kB exceeds 512 MiB`);
    assert.ok(kib >= 512 * 1024 * 0.8, `MemTotal ${kib} kB is far below 512 MiB`);
  });
  test("guest reboot: the guest boots again", async () => {
    s.type("reboot\n");
    await s.waitFor(READY, 2);
  });
  test("host shutdown request: the guest's ACPI power-button handling powers it off, status 0", async () => {
    s.child.kill("SIGTERM");
    assert.equal(await s.exited, 0, s.stderr);
    assert.match(s.output, /PARTIS-POWER-BUTTON/);
  });
});

test(
  "--hugepages: a stock guest runs on RAM from the host's 2 MiB pool (all of it reserved while it runs, given back at exit)",
  { skip: hugePagesUnusable },
  async () => {
    const restore = reserve2M(128);
    try {
      const before = available2M();
      const s = new GuestSession(["--memory", "256M", "--hugepages", "2M"]);
      try {
        await s.waitFor(READY);
        assert.equal(available2M(), before - 128, "256 MiB of guest RAM = 128 pages of 2 MiB, all reserved");
        // Touch a good part of RAM: 80 MiB into the initramfs (its tmpfs takes at most half of RAM).
        s.type(`dd if=/dev/zero of=/big bs=1M count=80 2>/dev/null; echo BIG=$(wc -c < /big); echo MEMTOTALHP=$(${MEMTOTAL}); rm /big; poweroff -f\n`);
        assert.equal(await s.exited, 0, s.stderr);
      } finally {
        s.kill();
      }
      assert.match(s.output, /BIG=83886080\b/, s.output.slice(-2000));
      const kib = memTotalKiB(s.output, "MEMTOTALHP");
      assert.ok(kib <= 256 * 1024 && kib >= 256 * 1024 * 0.7, `MemTotal ${kib} kB for a 256 MiB guest`);
      assert.equal(available2M(), before, "the pages are given back when the VM exits");
    } finally {
      restore();
    }
  },
);

test("a script piped in before the guest boots reaches its shell (the main job's way); --no-reboot: guest reboot ends the run with status 3", async () => {
  // `printf ... | partis run`: all input is there before the VM exists and ends at once. It must wait
  // until the guest's serial driver has finished opening the port (its FIFO reset would drop it).
  const s = new GuestSession(["--no-reboot", "--memory", "256M"]);
  s.type("echo EARLY=$((6*7))\nreboot -f\n");
  s.endInput();
  const status = await s.exited;
  assert.match(s.output, /EARLY=42/, `${s.output.slice(-2000)}\n${s.stderr}`);
  assert.equal(status, 3, s.stderr);
  assert.match(s.stderr, /rebooted/);
});

test("guest kernel panic: reported through pvpanic, the run ends with status 4 and the reason", async () => {
  const r = await runGuestCommand("echo PANIC-NOW; echo c > /proc/sysrq-trigger", ["--memory", "256M"]);
  assert.match(r.output, /PANIC-NOW/, `${r.output.slice(-2000)}\n${r.stderr}`);
  assert.equal(r.status, 4, r.stderr);
  assert.match(r.stderr, /kernel panic/);
});
