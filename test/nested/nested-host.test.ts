/**
 * The nested test host (QEMU TCG with emulated AMD-V): a command runs inside
 * with the host's paths, its streams and exit status come back, /dev/kvm works
 * (kvm_amd loaded, svm in cpuinfo), and nothing is left running when the
 * caller is stopped. Each boot takes ~10-20 s on two shared cores.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import { after, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { UsageError } from "../../src/errors.js";
import {
  consoleExcerpt,
  heartbeatAge,
  longestHungTask,
  longestSoftLockup,
  NESTED_HUNG_TASK_LIMIT_S,
  NESTED_LOCKUP_LIMIT_S,
  NESTED_QEMU_MIN_MAJOR,
  NestedHostError,
  nestedHostQemu,
  qemuTooOldForNestedHost,
  runNested,
} from "../../src/nested/nested-host.js";

const QEMU = "/usr/bin/qemu-system-x86_64";

function collect(): { stream: PassThrough; text: () => string } {
  const stream = new PassThrough();
  const chunks: Buffer[] = [];
  stream.on("data", (d: Buffer) => chunks.push(d));
  return { stream, text: () => Buffer.concat(chunks).toString("utf8") };
}

it("the nested host's watchdog finds the longest soft lockup its kernel reports, and nothing in a clean console", () => {
  const console = [
    "[   23.594840] kvm [155]: vcpu0, guest rIP: 0xffffffff8107e744 Unhandled WRMSR(0xc0010007) = 0xffff",
    "[   81.585574] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [partis-vcpu3:197]",
    "[  333.585224] watchdog: BUG: soft lockup - CPU#1 stuck for 261s! [partis-vcpu3:197]",
    "[  109.585369] watchdog: BUG: soft lockup - CPU#0 stuck for 53s! [node:120]",
    "",
  ].join("\n");
  const worst = longestSoftLockup(console);
  assert.equal(worst?.seconds, 261);
  assert.match(worst!.line, /CPU#1 stuck for 261s! \[partis-vcpu3:197\]$/);
  assert.ok(worst!.seconds >= NESTED_LOCKUP_LIMIT_S);
  assert.equal(longestSoftLockup(console.split("\n").slice(0, 2).join("\n"))?.seconds, 26);
  assert.equal(longestSoftLockup("[    1.0] Linux version 6.1\n[    2.0] kvm_amd: Nested Virtualization enabled\n"), undefined);
});

it("the nested host's watchdog finds the longest a task is reported blocked (the twenty-ninth session's khugepaged), and the excerpt starts at the first report", () => {
  const boot = Array.from({ length: 30 }, (_, i) => `[ ${i}.000] boot line ${i}`);
  const reports = [120, 241, 362].flatMap((n) => [
    `[  ${n + 123}.561444] INFO: task khugepaged:36 blocked for more than ${n} seconds.`,
    "[  243.561797]       Not tainted 6.1.0-57-amd64 #1 Debian 6.1.192-3",
    '[  243.561797] "echo 0 > /proc/sys/kernel/hung_task_timeout_secs" disables this message.',
  ]);
  const dump = Array.from({ length: 120 }, (_, i) => `[ 250.0]  ? frame_${i}+0x5/0x10`);
  const text = [...boot, ...reports.slice(0, 3), "[ 250.0] sysrq: Show Blocked State", ...dump, ...reports.slice(3)].join("\n");
  const worst = longestHungTask(text);
  assert.equal(worst?.seconds, 362);
  assert.match(worst!.line, /task khugepaged:36 blocked for more than 362 seconds\.$/);
  assert.ok(worst!.seconds >= NESTED_HUNG_TASK_LIMIT_S);
  assert.equal(longestHungTask(reports.slice(0, 3).join("\n"))?.seconds, 120);
  assert.ok(longestHungTask(reports.slice(0, 3).join("\n"))!.seconds < NESTED_HUNG_TASK_LIMIT_S, "one report is not enough");
  assert.equal(longestHungTask(boot.join("\n")), undefined);
  assert.equal(longestSoftLockup(text), undefined, "a blocked task is not a soft lockup");
  const short = consoleExcerpt(text).split("\n");
  assert.equal(short[3], reports[0], "the excerpt starts at the first report");
  const long = consoleExcerpt(text, 200).split("\n");
  assert.ok(long.includes("[ 250.0] sysrq: Show Blocked State") && long.includes(dump[dump.length - 1]!), "a longer head keeps the whole dump");
  assert.ok(!long.some((l) => l.startsWith("[...")));
});

it("an older QEMU than the nested host needs is told apart by its major version; an unknown one is not judged", () => {
  assert.equal(NESTED_QEMU_MIN_MAJOR, 10);
  assert.equal(qemuTooOldForNestedHost("7.2.22"), true);
  assert.equal(qemuTooOldForNestedHost("9.2"), true);
  assert.equal(qemuTooOldForNestedHost("10.0.2"), false);
  assert.equal(qemuTooOldForNestedHost("11.1.0"), false);
  assert.equal(qemuTooOldForNestedHost(undefined), false);
  assert.equal(qemuTooOldForNestedHost("unknown"), false);
});

it("the stall watchdog reads the heartbeat's age from its file, and nothing before the first beat", () => {
  const dir = mkdtempSync(join(tmpdir(), "partis-heartbeat-"));
  try {
    const file = join(dir, "heartbeat");
    assert.equal(heartbeatAge(file), undefined);
    writeFileSync(file, "");
    const written = statSync(file).mtimeMs;
    assert.equal(heartbeatAge(file, written + 42_000), 42);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

it("consoleExcerpt: a kernel crash report is shown from its first line, not just the tail of its stack dump", () => {
  const boot = Array.from({ length: 100 }, (_, i) => `[ ${i}.000] boot line ${i}`);
  assert.deepEqual(consoleExcerpt(boot.join("\n")).split("\n"), boot.slice(-25), "no crash: the last 25 lines");
  const oops = [
    "[ 35.1] BUG: TASK stack guard page was hit at 00000000deadbeef",
    "[ 35.1] kernel stack overflow (page fault): 0000 [#1] PREEMPT SMP NOPTI",
    ...Array.from({ length: 80 }, (_, i) => `[ 35.1]  ? frame_${i}+0x5/0x10`),
    "[ 35.1] Kernel Offset: 0x1e600000 from 0xffffffff81000000",
  ];
  const shown = consoleExcerpt([...boot, ...oops].join("\n")).split("\n");
  assert.deepEqual(shown.slice(0, 3), boot.slice(-3), "three lines of context");
  assert.equal(shown[3], oops[0], "then the crash report's first line");
  assert.ok(shown.includes(oops[1]!));
  assert.match(shown[40]!, /^\[\.\.\. \d+ lines \.\.\.\]$/, "the middle of a long stack dump is elided");
  assert.equal(shown[shown.length - 1], oops[oops.length - 1], "and the tail is kept");
  assert.ok(shown.length <= 51);
  // A short report: shown whole, nothing elided.
  const short = consoleExcerpt([...boot, "[ 9.9] Kernel panic - not syncing: Fatal exception", "[ 9.9] end"].join("\n")).split("\n");
  assert.deepEqual(short.slice(-2), ["[ 9.9] Kernel panic - not syncing: Fatal exception", "[ 9.9] end"]);
  assert.ok(!short.some((l) => l.startsWith("[...")));
});

describe("nested test host", { skip: !existsSync(QEMU) && "qemu-system-x86_64 not installed" }, () => {
  const dirs: string[] = [];
  after(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

  it("runs on the QEMU scripts/setup.sh installs: it says its version, and that is new enough", () => {
    const qemu = nestedHostQemu();
    assert.ok(qemu !== undefined);
    assert.match(qemu.version ?? "", /^\d+\.\d+/);
    assert.equal(qemuTooOldForNestedHost(qemu.version), false, `QEMU ${qemu.version} (run scripts/setup.sh)`);
  });

  it("runs a command with KVM (kvm_amd, svm) inside; stdout, stderr, stdin and the exit status come back", async () => {
    const work = mkdtempSync(join(tmpdir(), "partis-nested-test-"));
    dirs.push(work);
    const out = collect();
    const err = collect();
    const script = [
      "echo out-line",
      "echo err-line >&2",
      'echo "cwd=$(pwd)"',
      'echo "env=$PARTIS_TEST_VAR"',
      'echo "stdin=$(cat)"',
      'echo "svm=$(grep -cw svm /proc/cpuinfo)"',
      'test -c /dev/kvm && echo "kvm=yes"',
      'grep -q "^kvm_amd " /proc/modules && echo "kvm_amd=loaded"',
      'echo "node=$(node -e "console.log(6*7)")"',
      'echo "partis=$(partis --version)"',
      "echo written > result.txt",
      "exit 7",
    ].join("\n");
    const status = await runNested({
      command: ["/bin/sh", "-c", script],
      cwd: work,
      env: { PARTIS_TEST_VAR: "it's here" },
      partis: { node: process.execPath, cli: fileURLToPath(new URL("../../partis/partis.js", import.meta.url)), root: fileURLToPath(new URL("../../../", import.meta.url)) },
      stdio: "pipe",
      stdin: "from-the-caller",
      stdout: out.stream,
      stderr: err.stream,
    });
    assert.equal(status, 7, `stdout:\n${out.text()}\nstderr:\n${err.text()}`);
    const o = out.text();
    assert.match(o, /^out-line$/m);
    assert.doesNotMatch(o, /err-line/);
    assert.match(err.text(), /^err-line$/m);
    assert.match(o, new RegExp(`^cwd=${work}$`, "m"));
    assert.match(o, /^env=it's here$/m);
    assert.match(o, /^stdin=from-the-caller$/m);
    assert.match(o, /^svm=[1-9]\d*$/m);
    assert.match(o, /^kvm=yes$/m);
    assert.match(o, /^kvm_amd=loaded$/m);
    assert.match(o, /^node=42$/m);
    assert.match(o, /^partis=0\.1\.0$/m, "the built project's CLI on the inner PATH");
    assert.doesNotMatch(o, /\r/, "clean stream, no tty line discipline");
    assert.equal(readFileSync(join(work, "result.txt"), "utf8"), "written\n");
  });

  it("a nested host whose user space stops (no heartbeat) is stopped as stalled", async () => {
    const out = collect();
    // SIGSTOP to every process but init and this shell: the heartbeat loop stops, the command sleeps on.
    const run = runNested({ command: ["/bin/sh", "-c", "echo stopping; kill -STOP -1; sleep 600"], stdio: "pipe", stdout: out.stream, stallLimitSeconds: 20 });
    await assert.rejects(run, (e: unknown) => {
      assert.ok(e instanceof NestedHostError, String(e));
      assert.equal(e.code, "NESTED_HOST_STALLED");
      assert.match(e.message, /the nested test host stalled \(no heartbeat for \d+ s/);
      return true;
    });
    assert.match(out.text(), /^stopping$/m, "the command ran before the stall");
  });

  it("rejects bad options before booting", async () => {
    await assert.rejects(runNested({ command: [] }), UsageError);
    await assert.rejects(runNested({ command: ["true"], memory: "lots" }), UsageError);
    await assert.rejects(runNested({ command: ["true"], cpus: 0 }), UsageError);
    await assert.rejects(runNested({ command: ["true"], stallLimitSeconds: 0 }), UsageError);
  });

  it("kills QEMU when the caller gets SIGTERM", async () => {
    const runner = join(fileURLToPath(import.meta.url), "..", "..", "..", "src", "nested", "nested-host.js");
    const code = `
      import(${JSON.stringify(runner)}).then((m) => m.runNested({ command: ["sh", "-c", "echo started; sleep 600"], stdio: "pipe",
        stdout: process.stdout })).then((s) => console.log("status", s), (e) => { console.log("error", e.code); process.exitCode = 3; });`;
    const child = spawn(process.execPath, ["-e", code], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no 'started' in 180 s: ${out}`)), 180_000);
      child.stdout.on("data", (d: Buffer) => {
        out += d.toString();
        if (out.includes("started")) {
          clearTimeout(t);
          resolve();
        }
      });
    });
    const qemuPids = (): string[] => {
      const pids: string[] = [];
      for (const p of readFileSync("/proc/" + child.pid + "/task/" + child.pid + "/children", "utf8").trim().split(/\s+/).filter(Boolean)) pids.push(p);
      return pids;
    };
    const pids = qemuPids();
    assert.ok(pids.length > 0, "QEMU is a child of the runner");
    child.kill("SIGTERM");
    const exit = await new Promise<number | null>((r) => child.on("close", (c, s) => r(c ?? (s ? -1 : null))));
    assert.notEqual(exit, 0);
    for (const p of pids) {
      let alive = existsSync(`/proc/${p}`);
      for (let i = 0; alive && i < 50; i++) {
        await new Promise((r) => setTimeout(r, 100));
        alive = existsSync(`/proc/${p}`) && !readFileSync(`/proc/${p}/stat`, "utf8").includes(") Z ");
      }
      assert.ok(!alive, `QEMU pid ${p} still running`);
    }
  });
});
