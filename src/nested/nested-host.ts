/**
 * The nested test host: a Linux host with AMD-V, booted under QEMU's software
 * emulator (TCG, `-cpu EPYC`), in which a command runs with a real /dev/kvm
 * (kvm-amd). This is how stock guests run on machines whose own /dev/kvm is PVM
 * (docs/guests.md, shared/design/GUESTS-HERE.md).
 *
 * Inside, the host's / is mounted read-only over virtfs (9p) and chrooted into,
 * so absolute paths (node, dist/, node_modules/, ~/.cache/partis) are the same;
 * the working directory and the image cache are writable shares; /tmp and /run
 * are tmpfs. The command's stdin/stdout/stderr are virtio-serial ports wired to
 * unix sockets here (clean streams, separate from the kernel console, which
 * goes to a log file), or one virtio console (a terminal, /dev/hvc0) when the
 * caller's stdin and stdout are terminals. The exit status comes back through
 * the control share.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { Readable, Writable } from "node:stream";
import { HostCapabilityError, PartisError, UsageError, type ErrorContext } from "../errors.js";
import { defaultCacheDir } from "../images/image-cache.js";
import { prepareNestedHostImage } from "./nested-host-image.js";

/** The nested host could not run the command (QEMU failed, the host did not come up, interrupted). */
export class NestedHostError extends PartisError {
  constructor(code: "NESTED_QEMU_FAILED" | "NESTED_NO_STATUS" | "NESTED_INTERRUPTED" | "NESTED_SETUP_FAILED" | "NESTED_KERNEL_LOCKUP" | "NESTED_HOST_STALLED", message: string, context: ErrorContext = {}) {
    super(code, message, context);
  }
}

export interface RunNestedOptions {
  /** argv of the command to run inside (resolved with the inner PATH). */
  command: string[];
  /** QEMU -m syntax, default "6G". */
  memory?: string;
  /** vCPUs of the nested host, default 2. */
  cpus?: number;
  /** Working directory inside (same path as here); shared writable. Default process.cwd(). */
  cwd?: string;
  /** Environment of the command: process.env overlaid with these. */
  env?: Record<string, string>;
  /**
   * "inherit" (default): the caller's stdin/stdout/stderr (a terminal inside
   * when the caller's stdin and stdout are terminals). "pipe": `stdin`,
   * `stdout`, `stderr` below (stdin empty and output discarded when absent).
   */
  stdio?: "inherit" | "pipe";
  stdin?: Readable | string | Buffer;
  stdout?: Writable;
  stderr?: Writable;
  /** Extra writable directories shared at the same path (the cwd and the image cache are always shared). */
  shares?: string[];
  /** Seconds without the nested host's heartbeat before it is stopped as stalled; default NESTED_STALL_LIMIT_S. */
  stallLimitSeconds?: number;
  /**
   * The built project on the command's PATH: `partis` inside runs `cli` (the
   * CLI's script) with `node`. `root`, the project directory (the CLI, its
   * package.json and node_modules), is shared at its own path, so it is
   * there even where the host root is not (/tmp is a tmpfs inside).
   * `partis host nested` passes its own.
   */
  partis?: { readonly node: string; readonly cli: string; readonly root: string };
  log?: (l: string) => void;
}

/** Where the `partis` launcher goes inside (the chroot's /run is a tmpfs). */
const INNER_BIN = "/run/partis-bin";

const QEMU = "qemu-system-x86_64";

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function commandScript(command: string[], cwd: string, env: Record<string, string>, partis: RunNestedOptions["partis"]): string {
  let launcher = "";
  if (partis !== undefined) {
    env = { ...env, PATH: `${INNER_BIN}:${env["PATH"] ?? "/usr/bin:/bin"}` };
    const body = `#!/bin/sh\nexec ${shellQuote(partis.node)} ${shellQuote(partis.cli)} "$@"\n`;
    launcher = `mkdir -p ${INNER_BIN} && printf '%s' ${shellQuote(body)} > ${INNER_BIN}/partis && chmod +x ${INNER_BIN}/partis || exit 126\n`;
  }
  const vars = Object.entries(env)
    .filter(([k]) => /^[A-Za-z_][A-Za-z0-9_]*$/.test(k))
    .map(([k, v]) => shellQuote(`${k}=${v}`));
  return `${launcher}cd ${shellQuote(cwd)} || exit 126\nexec env -i ${vars.join(" ")} ${command.map(shellQuote).join(" ")}\n`;
}

function listenOnce(path: string): { server: Server; connection: Promise<Socket> } {
  const server = createServer();
  const connection = new Promise<Socket>((res, rej) => {
    server.once("connection", (s) => res(s));
    server.once("error", rej);
  });
  server.maxConnections = 1;
  server.listen(path);
  return { server, connection };
}

/**
 * The oldest QEMU the nested test host is meant to run on (docs/guests.md, "QEMU 10 for the nested
 * test host"): the test bed and the benchmarks' QEMU baseline are measured on 10.0 since the
 * twenty-ninth session (Debian 12's 7.2 before; 10.0 did not end the nested host's stack-guard
 * panics). scripts/setup.sh installs it (bookworm-backports, Debian 13); an older one still runs,
 * with a warning.
 */
export const NESTED_QEMU_MIN_MAJOR = 10;

/** The QEMU the nested host would run: its path and version ("10.0.2"; undefined where it does not say). */
export function nestedHostQemu(): { path: string; version: string | undefined } | undefined {
  const path = whichQemu();
  if (path === undefined) return undefined;
  const r = spawnSync(path, ["--version"], { encoding: "utf8", timeout: 10_000 });
  return { path, version: /QEMU emulator version (\d+\.\d+(?:\.\d+)?)/.exec(r.stdout ?? "")?.[1] };
}

/** True for a version older than NESTED_QEMU_MIN_MAJOR (an unknown one is not judged). */
export function qemuTooOldForNestedHost(version: string | undefined): boolean {
  const major = version === undefined ? NaN : Number(version.split(".")[0]);
  return Number.isInteger(major) && major < NESTED_QEMU_MIN_MAJOR;
}

function whichQemu(): string | undefined {
  for (const dir of (process.env["PATH"] ?? "/usr/bin:/bin").split(":")) {
    const p = join(dir || ".", QEMU);
    if (existsSync(p)) return p;
  }
  return existsSync(`/usr/bin/${QEMU}`) ? `/usr/bin/${QEMU}` : undefined;
}

/**
 * How long one CPU of the nested host's own kernel may be reported stuck
 * ("watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [partis-vcpu3:197]")
 * before the nested host is given up. Seen in CI: a CPU stuck inside KVM for
 * a vCPU thread of a 4-vCPU guest for 25 minutes and counting; the thread
 * never left the kernel, so no signal reached it and the suite hung until the
 * CI limit. A stall that long is the test bed (nested SVM under TCG), not a test.
 */
export const NESTED_LOCKUP_LIMIT_S = 180;

/**
 * How long the nested host's heartbeat (its init touches ctl/heartbeat every
 * 10 s) may stop before the nested host is given up as stalled. Seen in a
 * benchmark: the whole nested host went quiet (no console output, a 300 s
 * timer in a process inside never fired) and no soft lockup was reported, so
 * the lockup watchdog could not see it. Busy is not stalled: the loop is one
 * shell process, and a loaded host still runs it every few seconds.
 */
export const NESTED_STALL_LIMIT_S = 300;

/** Seconds since the nested host's last heartbeat (undefined before the first). */
export function heartbeatAge(heartbeatFile: string, nowMs = Date.now()): number | undefined {
  try {
    return (nowMs - statSync(heartbeatFile).mtimeMs) / 1000;
  } catch {
    return undefined;
  }
}

/**
 * How long a task of the nested host's own kernel may be reported blocked ("INFO: task khugepaged:36
 * blocked for more than 241 seconds.") before the nested host is given up. Seen in the twenty-ninth
 * session: khugepaged blocked for 10 minutes and more, the real-guest suite's VM stuck with it, the
 * heartbeat going on (so the stall watchdog did not fire) and no CPU stuck (no soft lockup): the suite
 * would have waited for CI's limit. The kernel reports a blocked task every 120 s; the first report
 * makes the nested host's init dump every blocked task's stack on the console (sysrq w), and the
 * second one, at 240 s, stops it.
 */
export const NESTED_HUNG_TASK_LIMIT_S = 240;

/** First line of a kernel crash report on a console (oops, BUG, panic, fatal exception, a task blocked for minutes). */
const KERNEL_CRASH_LINE = /BUG: |Oops: |Kernel panic|general protection fault|kernel BUG at|Fatal exception|stack guard page|double fault|INFO: task \S+ blocked for more than/;

/**
 * The part of the nested host's console worth showing when it died: from just
 * before the first kernel crash report (where it says what went wrong, which
 * a plain tail of a long oops misses) for up to `headLines` lines (40; 200 for
 * a blocked task, whose report is followed by every blocked task's stack), then the last 10;
 * with no crash report, the last 25 lines.
 */
export function consoleExcerpt(console: string, headLines = 40): string {
  const lines = console.split("\n");
  const at = lines.findIndex((l) => KERNEL_CRASH_LINE.test(l));
  if (at < 0) return lines.slice(-25).join("\n");
  const from = Math.max(0, at - 3);
  const head = lines.slice(from, from + headLines);
  const tailFrom = Math.max(from + headLines, lines.length - 10);
  if (tailFrom >= lines.length) return head.join("\n");
  const skipped = tailFrom - (from + headLines);
  return [...head, ...(skipped > 0 ? [`[... ${skipped} lines ...]`] : []), ...lines.slice(tailFrom)].join("\n");
}

/** The longest soft lockup the nested host's console reports, and its line (undefined: none). */
export function longestSoftLockup(console: string): ReportedDuration | undefined {
  return longestReported(console, /^.*soft lockup - CPU#\d+ stuck for (\d+)s!.*$/gm);
}

/** The longest a task of the nested host's kernel is reported blocked, and its line (undefined: none). */
export function longestHungTask(console: string): ReportedDuration | undefined {
  return longestReported(console, /^.*INFO: task \S+ blocked for more than (\d+) seconds\..*$/gm);
}

/** A duration the nested host's kernel reports on its console (a CPU stuck, a task blocked), and the line. */
export interface ReportedDuration {
  seconds: number;
  line: string;
}

/** The longest of the durations `report` (global, multiline; group 1 the seconds) finds on the console. */
function longestReported(console: string, report: RegExp): ReportedDuration | undefined {
  let worst: ReportedDuration | undefined;
  for (const m of console.matchAll(report)) {
    const seconds = Number(m[1]);
    if (worst === undefined || seconds > worst.seconds) worst = { seconds, line: m[0].trim() };
  }
  return worst;
}

/**
 * Boots the nested test host, runs `opts.command` inside and returns its exit
 * status. QEMU is killed when this process exits or gets SIGINT/SIGTERM (and
 * by the kernel, through PR_SET_PDEATHSIG, if it dies outright).
 */
export async function runNested(opts: RunNestedOptions): Promise<number> {
  const log = opts.log ?? ((): void => {});
  if (opts.command.length === 0) throw new UsageError("runNested: empty command");
  const memory = opts.memory ?? "6G";
  if (!/^\d+[MGmgKkTt]?$/.test(memory)) throw new UsageError(`bad memory size ${memory} (e.g. 6G, 4096M)`, { memory });
  const cpus = opts.cpus ?? 2;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 64) throw new UsageError(`bad vCPU count ${cpus}`, { cpus });
  const stallLimit = opts.stallLimitSeconds ?? NESTED_STALL_LIMIT_S;
  if (!(stallLimit >= 1)) throw new UsageError(`bad stall limit ${stallLimit} s (at least 1)`, { stallLimitSeconds: stallLimit });
  const cwd = resolve(opts.cwd ?? process.cwd());
  const qemu = whichQemu();
  if (!qemu) throw new HostCapabilityError("HOST_NO_QEMU", `${QEMU} is not installed (run scripts/setup.sh)`);
  const t0 = performance.now();
  const image = await prepareNestedHostImage({ log });

  const stdio = opts.stdio ?? "inherit";
  const tty = stdio === "inherit" && process.stdin.isTTY === true && process.stdout.isTTY === true;
  const ctl = mkdtempSync(join(tmpdir(), "partis-nested-"));
  const consolePath = join(ctl, "console.log");
  const consoleTail = (headLines?: number): string => (existsSync(consolePath) ? consoleExcerpt(readFileSync(consolePath, "utf8"), headLines) : "");
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined) env[k] = v;
  Object.assign(env, opts.env ?? {});
  writeFileSync(join(ctl, "command.sh"), commandScript(opts.command, cwd, env, opts.partis));
  // Parents before the directories inside them: a share mounted later at a parent path would hide the child's.
  const shares = [...new Set([cwd, defaultCacheDir(), ...(opts.partis !== undefined ? [opts.partis.root] : []), ...(opts.shares ?? [])].map((p) => resolve(p)))]
    .filter((p) => p !== "/" && existsSync(p))
    .sort((a, b) => a.split("/").length - b.split("/").length);
  writeFileSync(join(ctl, "shares"), shares.map((p, i) => `share${i} ${p}\n`).join(""));
  if (tty) writeFileSync(join(ctl, "tty"), `${process.stdout.rows ?? 24} ${process.stdout.columns ?? 80}\n`);

  const ports = tty ? ["tty"] : ["stdin", "stdout", "stderr"];
  const listeners = new Map(ports.map((p) => [p, listenOnce(join(ctl, `${p}.sock`))]));
  await Promise.all([...listeners.values()].map((l) => new Promise<void>((r) => (l.server.listening ? r() : l.server.once("listening", () => r())))));

  const args = [
    "-accel", "tcg,thread=multi", "-cpu", "EPYC", "-smp", String(cpus), "-m", memory,
    "-nodefaults", "-display", "none", "-no-reboot",
    "-kernel", image.kernel, "-initrd", image.initrd,
    // nokaslr: a crash report's addresses then tell the nested host's own (direct map from
    // 0xffff888000000000) from a nested guest's (randomised): see docs/guests.md, "QEMU 10 for the nested test host".
    "-append", "console=ttyS0 panic=-1 quiet loglevel=4 nokaslr",
    "-serial", `file:${consolePath}`,
    "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    "-virtfs", `local,path=${ctl},mount_tag=partisctl,security_model=none`,
    ...shares.flatMap((p, i) => ["-virtfs", `local,path=${p},mount_tag=share${i},security_model=none,multidevs=remap`]),
    "-device", "virtio-serial-pci,id=vser",
  ];
  for (const p of ports) {
    args.push("-chardev", `socket,id=c${p},path=${join(ctl, `${p}.sock`)}`);
    args.push("-device", p === "tty" ? `virtconsole,bus=vser.0,chardev=c${p},name=partis.tty` : `virtserialport,bus=vser.0,chardev=c${p},name=partis.${p}`);
  }
  // setpriv: QEMU dies with us even on SIGKILL (PR_SET_PDEATHSIG).
  const useSetpriv = existsSync("/usr/bin/setpriv");
  const file = useSetpriv ? "/usr/bin/setpriv" : qemu;
  const argv = useSetpriv ? ["--pdeathsig", "KILL", "--", qemu, ...args] : args;
  log(`nested host: ${qemu} ${args.join(" ")}`);

  const child: ChildProcess = spawn(file, argv, { stdio: ["ignore", "ignore", "pipe"], detached: true });
  let qemuStderr = "";
  child.stderr!.on("data", (d: Buffer) => (qemuStderr = (qemuStderr + d.toString()).slice(-4000)));
  const killQemu = (): void => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  };
  let interrupted: NodeJS.Signals | undefined;
  const onSignal = (sig: NodeJS.Signals): void => {
    interrupted = sig;
    killQemu();
  };
  const onExit = (): void => killQemu();
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  process.on("exit", onExit);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    child.on("close", (code, signal) => res({ code, signal })),
  );
  const spawnError = new Promise<Error>((res) => child.on("error", res));

  // Watchdogs over the nested host itself (see NESTED_LOCKUP_LIMIT_S, NESTED_HUNG_TASK_LIMIT_S and NESTED_STALL_LIMIT_S).
  // What the lockup watchdog saw: the console line, the limit it passed, how much console to show.
  let lockup: { line: string; limitSeconds: number; excerptLines: number } | undefined;
  let stalled: number | undefined;
  const heartbeat = join(ctl, "heartbeat");
  const watchdog = setInterval(() => {
    const age = heartbeatAge(heartbeat);
    if (age !== undefined && age >= stallLimit && stalled === undefined) {
      stalled = Math.round(age);
      killQemu();
      return;
    }
    let text = "";
    try {
      text = readFileSync(consolePath, "utf8");
    } catch {
      return;
    }
    const worst = longestSoftLockup(text);
    const hung = longestHungTask(text);
    if (worst !== undefined && worst.seconds >= NESTED_LOCKUP_LIMIT_S) {
      lockup = { line: worst.line, limitSeconds: NESTED_LOCKUP_LIMIT_S, excerptLines: 40 };
      killQemu();
    } else if (hung !== undefined && hung.seconds >= NESTED_HUNG_TASK_LIMIT_S) {
      // The blocked tasks' stacks (sysrq w, dumped at the first report) are what the next reader needs.
      lockup = { line: `a task blocked: ${hung.line}`, limitSeconds: NESTED_HUNG_TASK_LIMIT_S, excerptLines: 200 };
      killQemu();
    }
  }, Math.min(10_000, stallLimit * 500));
  watchdog.unref();

  // Wire the streams.
  const drains: Promise<void>[] = [];
  let restoreTty = (): void => {};
  const connect = async (name: string): Promise<Socket | undefined> =>
    Promise.race([listeners.get(name)!.connection, exited.then(() => undefined)]);
  const firstOutput = (s: Socket): void => {
    s.once("data", () => log(`nested host: first output after ${((performance.now() - t0) / 1000).toFixed(2)} s`));
  };
  if (tty) {
    const sock = await connect("tty");
    if (sock) {
      firstOutput(sock);
      process.stdin.setRawMode(true);
      restoreTty = (): void => {
        process.stdin.unpipe(sock);
        process.stdin.setRawMode(false);
        process.stdin.pause();
      };
      process.stdin.pipe(sock);
      drains.push(new Promise((r) => sock.on("close", () => r())));
      sock.pipe(process.stdout, { end: false });
      sock.on("error", () => {});
    }
  } else {
    const [sin, sout, serr] = await Promise.all([connect("stdin"), connect("stdout"), connect("stderr")]);
    const outTarget = stdio === "inherit" ? process.stdout : opts.stdout;
    const errTarget = stdio === "inherit" ? process.stderr : opts.stderr;
    for (const [s, target] of [[sout, outTarget], [serr, errTarget]] as const) {
      if (!s) continue;
      s.on("error", () => {});
      if (target) s.pipe(target, { end: false });
      else s.resume();
      drains.push(new Promise((r) => s.on("close", () => r())));
    }
    if (sout) firstOutput(sout);
    if (sin) {
      sin.on("error", () => {});
      const source = stdio === "inherit" ? process.stdin : opts.stdin;
      if (source === undefined) sin.end();
      else if (typeof source === "string" || Buffer.isBuffer(source)) sin.end(source);
      else {
        source.pipe(sin);
        restoreTty = (): void => {
          source.unpipe(sin);
          if (source === process.stdin) process.stdin.pause();
        };
      }
    }
  }

  try {
    const result = await Promise.race([exited, spawnError.then((e) => ({ error: e }))]);
    if ("error" in result) throw new HostCapabilityError("HOST_NO_QEMU", `cannot start ${QEMU}: ${result.error.message}`);
    await Promise.race([Promise.all(drains), new Promise((r) => setTimeout(r, 2000))]);
    log(`nested host: exited after ${((performance.now() - t0) / 1000).toFixed(2)} s`);
    if (lockup !== undefined) {
      // The console's tail holds the lockup's trace (where the CPU was stuck): what the next reader needs.
      throw new NestedHostError("NESTED_KERNEL_LOCKUP", `the nested test host's kernel locked up (${lockup.line}); the nested host was stopped; its console's last lines:\n${consoleTail(lockup.excerptLines)}`, {
        limitSeconds: lockup.limitSeconds,
      });
    }
    if (stalled !== undefined) {
      throw new NestedHostError("NESTED_HOST_STALLED", `the nested test host stalled (no heartbeat for ${stalled} s; its console's last lines below); the nested host was stopped\n${consoleTail()}`, {
        limitSeconds: stallLimit,
      });
    }
    if (interrupted) throw new NestedHostError("NESTED_INTERRUPTED", `nested host stopped by ${interrupted}`, { signal: interrupted });
    const statusFile = join(ctl, "status");
    if (existsSync(statusFile)) {
      const status = Number.parseInt(readFileSync(statusFile, "utf8").trim(), 10);
      if (Number.isInteger(status)) return status;
    }
    const error = existsSync(join(ctl, "error")) ? readFileSync(join(ctl, "error"), "utf8").trim() : "";
    if (result.code !== 0) {
      throw new NestedHostError("NESTED_QEMU_FAILED", `${QEMU} exited with ${result.signal ?? result.code}: ${qemuStderr.trim()}\n${consoleTail()}`, { status: result.code ?? -1 });
    }
    throw new NestedHostError(
      error ? "NESTED_SETUP_FAILED" : "NESTED_NO_STATUS",
      `nested host ended without the command's exit status${error ? `: ${error}` : ""}\n--- nested host console (last lines) ---\n${consoleTail()}`,
    );
  } finally {
    clearInterval(watchdog);
    killQemu();
    restoreTty();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    process.off("exit", onExit);
    for (const l of listeners.values()) l.server.close();
    if (!process.env["PARTIS_NESTED_KEEP"]) rmSync(ctl, { recursive: true, force: true });
    else log(`nested host: control directory kept at ${ctl}`);
    if (interrupted && process.listenerCount(interrupted) === 0) process.kill(process.pid, interrupted);
  }
}
