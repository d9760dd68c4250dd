/**
 * Boots the default guest (stock Debian kernel + Partis initramfs) under QEMU
 * TCG (pure emulation: works on any x86-64 host, PVM included) and checks the
 * guest contract: the ready marker, partis.run, `poweroff`/`reboot` typed in the
 * console shell, and the ACPI power button.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createConnection } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { GUEST_READY_MARKER, guestRunOption, prepareDefaultGuest, type DefaultGuest } from "../../src/images/default-guest.js";

const QEMU = "/usr/bin/qemu-system-x86_64";

interface Boot {
  child: ChildProcessWithoutNullStreams;
  output: () => string;
  waitFor: (text: string | RegExp, timeoutMs?: number) => Promise<void>;
  exited: Promise<number | null>;
  monitor: string;
}

function boot(guest: DefaultGuest, dir: string, extraAppend = ""): Boot {
  const monitor = join(dir, `mon-${Math.random().toString(36).slice(2)}`);
  const child = spawn(
    QEMU,
    ["-accel", "tcg", "-m", "512", "-display", "none", "-no-reboot", "-serial", "stdio", "-monitor", `unix:${monitor},server=on,wait=off`,
      "-kernel", guest.kernel, "-initrd", guest.initrd, "-append", `console=ttyS0 panic=-1 ${extraAppend}`.trim()],
    { stdio: ["pipe", "pipe", "pipe"] },
  );
  let out = "";
  const waiters: { re: string | RegExp; resolve: () => void }[] = [];
  const check = (): void => {
    for (let i = waiters.length - 1; i >= 0; i--) {
      const w = waiters[i]!;
      if (typeof w.re === "string" ? out.includes(w.re) : w.re.test(out)) {
        waiters.splice(i, 1);
        w.resolve();
      }
    }
  };
  child.stdout.on("data", (d: Buffer) => {
    out += d.toString("utf8");
    check();
  });
  child.stderr.on("data", (d: Buffer) => (out += d.toString("utf8")));
  const exited = new Promise<number | null>((r) => child.on("close", (code) => r(code)));
  return {
    child,
    monitor,
    output: () => out,
    exited,
    waitFor: (re, timeoutMs = 120_000) =>
      new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`timed out waiting for ${re}; console:\n${out.slice(-3000)}`)), timeoutMs);
        waiters.push({ re, resolve: () => { clearTimeout(t); resolve(); } });
        check();
      }),
  };
}

async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<T>((_, rej) => (t = setTimeout(() => rej(new Error(`timed out: ${what}`)), ms)))]);
  } finally {
    clearTimeout(t);
  }
}

describe("default guest boots under QEMU TCG", { skip: !existsSync(QEMU) && "qemu-system-x86_64 not installed" }, () => {
  let guest: DefaultGuest;
  let dir: string;
  const boots: Boot[] = [];
  before(async () => {
    guest = await prepareDefaultGuest();
    dir = mkdtempSync(join(tmpdir(), "partis-guest-boot-"));
  });
  after(() => {
    for (const b of boots) b.child.kill("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
  });

  it("prints the marker, runs partis.run, and powers off from it", async () => {
    const b = boot(guest, dir, guestRunOption("echo RUN-$((6*7)); grep -c . /proc/modules; poweroff"));
    boots.push(b);
    await b.waitFor(GUEST_READY_MARKER);
    await b.waitFor("RUN-42");
    await withTimeout(b.exited, 120_000, "poweroff from partis.run");
    assert.match(b.output(), /reboot: Power down/);
    assert.ok(b.output().indexOf(GUEST_READY_MARKER) < b.output().indexOf("RUN-42"));
  });

  it("accepts a percent-encoded partis.run", async () => {
    const b = boot(guest, dir, "partis.run=echo%20PCT-%41OK;poweroff%20-f");
    boots.push(b);
    await b.waitFor("PCT-AOK");
    await withTimeout(b.exited, 120_000, "poweroff -f");
  });

  it("the console shell runs typed commands; typed `reboot` restarts, the power button powers off", async () => {
    const b = boot(guest, dir);
    boots.push(b);
    await b.waitFor(GUEST_READY_MARKER);
    await b.waitFor("partis-guest:/#");
    b.child.stdin.write("echo TYPED-$((1+2)); tty\n");
    await b.waitFor("TYPED-3");
    await b.waitFor(/\/dev\/ttyS0/);
    b.child.stdin.write("reboot\n");
    await withTimeout(b.exited, 120_000, "typed reboot");
    assert.match(b.output(), /reboot: Restarting system/);

    const p = boot(guest, dir);
    boots.push(p);
    await p.waitFor("partis-guest:/#");
    await new Promise<void>((resolve, reject) => {
      const s = createConnection(p.monitor, () => s.end("system_powerdown\n"));
      s.on("error", reject);
      s.on("close", () => resolve());
      s.resume();
    });
    await withTimeout(p.exited, 120_000, "ACPI power button");
    assert.match(p.output(), /reboot: Power down/);
  });

  it("typed `poweroff` powers off", async () => {
    const b = boot(guest, dir);
    boots.push(b);
    await b.waitFor("partis-guest:/#");
    b.child.stdin.write("poweroff\n");
    await withTimeout(b.exited, 120_000, "typed poweroff");
    assert.match(b.output(), /reboot: Power down/);
  });
});
