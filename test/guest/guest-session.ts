/**
 * Drives `partis run` as a user would: a child process with the console on
 * pipes. Collects console output, waits for text, types input, and resolves
 * with the exit status. Used by the real-guest suites.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";

export const PARTIS_CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
export const READY = "PARTIS-GUEST-READY";

export class GuestSession {
  /** The current `partis run` process (replaced when a test-bed crash is retried: see shouldRelaunch). */
  child: ChildProcess;
  output = "";
  stderr = "";
  readonly exited: Promise<number>;
  private waiters: { text: string | RegExp; count: number; resolve: () => void }[] = [];
  private inputEnded = false;
  private readonly launchHooks: ((generation: number) => void)[] = [];
  /** Which boot this is: 0, then 1, 2... after retries. */
  generation = 0;
  private typed = false;
  /** Everything typed so far: a VM booted once more gets it again (it is only booted again if its guest ran none of it). */
  private typedText = "";
  /** The current VM showed the test bed's SMP hang (a soft lockup) and was killed to be booted again. */
  private lockedUp = false;
  private relaunches = 0;
  /** Boots a session may retry after test-bed crashes (see shouldRelaunch). */
  static readonly MAX_RELAUNCHES = 4;

  /** The current VM made no progress until its deadline and was killed to be booted again (see shouldRelaunch). */
  private hung = false;
  /** The current VM is being killed to be booted again with a VM it works with (relaunchWithPeer). */
  private peerRestart = false;
  /** Why the current VM is a relaunch: a test-bed crash of its own, or a restart with its peer; undefined for the first boot. */
  relaunchReason: "crash" | "peer" | undefined;

  /** Longest one boot may live: a hung guest fails its test (or is retried) instead of hanging the suite. */
  static readonly TIMEOUT_MS = Number(process.env.PARTIS_GUEST_TIMEOUT_MS ?? 300_000);
  private deadline: NodeJS.Timeout | undefined;

  constructor(
    private readonly args: readonly string[],
    private readonly env: NodeJS.ProcessEnv = process.env,
  ) {
    let resolveExit!: (status: number) => void;
    this.exited = new Promise((resolve) => (resolveExit = resolve));
    this.child = this.launch(resolveExit);
    void this.exited.then(() => clearTimeout(this.deadline));
  }

  /**
   * Each boot's deadline. Where the guest stopped is the first thing whoever
   * reads the failure needs: its console's tail, and Partis's state report
   * (SIGQUIT: every vCPU's registers and LAPIC, every virtqueue) before the kill.
   */
  private armDeadline(child: ChildProcess): void {
    clearTimeout(this.deadline);
    this.deadline = setTimeout(() => {
      this.hung = this.mayRelaunch();
      this.stderr += `\n[test] VM still running after ${GuestSession.TIMEOUT_MS} ms: asking for its state report, then killing it. Its console's last lines:\n${this.output.slice(-2500)}\n`;
      child.kill("SIGQUIT");
      setTimeout(() => child.kill("SIGKILL"), 3000).unref();
    }, GuestSession.TIMEOUT_MS);
  }

  private launch(resolveExit: (status: number) => void): ChildProcess {
    const child = spawn(process.execPath, [PARTIS_CLI, "run", ...this.args], { stdio: ["pipe", "pipe", "pipe"], env: this.env });
    this.armDeadline(child);
    child.stdout!.on("data", (d: Buffer) => {
      this.output += d.toString("latin1");
      this.check();
      // The same SMP failure in its other form: a vCPU stops answering IPIs and another soft-locks
      // waiting for it. The guest never recovers; retry now instead of at the session's deadline.
      if (!this.lockedUp && /watchdog: BUG: soft lockup/.test(this.output) && this.mayRelaunch()) {
        this.lockedUp = true;
        child.kill("SIGKILL");
      }
    });
    child.stderr!.on("data", (d: Buffer) => {
      this.stderr += d.toString("latin1");
    });
    child.stdin!.on("error", () => {});
    // A script piped in before the guest booted (the main job's way): the VM that crashed before its shell never ran it.
    if (this.typedText !== "") child.stdin!.write(this.typedText);
    if (this.inputEnded) child.stdin!.end();
    child.on("exit", (code, signal) => {
      const status = code ?? (signal ? 128 : -1);
      if (this.shouldRelaunch(status)) {
        this.relaunches++;
        this.relaunchReason = this.peerRestart ? "peer" : "crash";
        process.stderr.write(
          this.peerRestart
            ? `[test] WARNING: a VM this one works with was booted once more after a test-bed crash; this one is restarted with it (what it measured meanwhile is void).\n`
            : this.hung
            ? `[test] WARNING: the guest made no progress for ${GuestSession.TIMEOUT_MS} ms inside the nested test host (docs/guests.md); killed, booting it once more. Its console and Partis's state report:\n${this.stderr.trim()}\n`
            : this.lockedUp
              ? `[test] WARNING: the guest soft-locked inside the nested test host (docs/guests.md); killed, booting it once more. Its console:\n${this.output.slice(-600).trim()}\n`
              : `[test] WARNING: the guest triple-faulted inside the nested test host (nested SVM emulated by TCG; docs/guests.md); booting it once more. The crash:\n${this.stderr.trim()}\n`,
        );
        this.lockedUp = false;
        this.hung = false;
        this.peerRestart = false;
        this.output = "";
        this.stderr = "";
        this.generation++;
        this.child = this.launch(resolveExit);
        for (const hook of this.launchHooks) hook(this.generation);
        return;
      }
      resolveExit(status);
    });
    return child;
  }

  /**
   * The retries this harness allows (at most MAX_RELAUNCHES per session), inside
   * the nested test host only: a VM that died of a triple fault, that
   * soft-locked (killed on its console's "soft lockup" line), or that made no
   * progress until its deadline (killed after its state report), is booted once
   * more when that cannot hide a test's own effect: either it died before the
   * guest's init printed its marker (no guest command ran, no disk was
   * touched), or nothing was typed into it (its whole job is the command
   * line's script, and the suites' scripts start from scratch: mke2fs before
   * writing, and so on). Such
   * crashes hit a random vCPU of a multi-vCPU guest at a random point of boot
   * or run there (docs/guests.md); one more than MAX_RELAUNCHES in a session fails the
   * test.
   */
  private shouldRelaunch(status: number): boolean {
    const crashed = status === 4 && /guest crashed: vCPU \d+: triple fault/.test(this.stderr);
    return (crashed || this.lockedUp || this.hung || this.peerRestart) && this.mayRelaunch();
  }

  /**
   * Boot this VM once more because a VM it works with was (two VMs wired
   * together: what this one measured while the other rebooted is void), on
   * the same terms and budget as a crash of its own. False, with nothing
   * done, where that is not allowed or this VM has already ended.
   */
  relaunchWithPeer(): boolean {
    if (this.child.exitCode !== null || this.child.signalCode !== null || !this.mayRelaunch()) return false;
    this.peerRestart = true;
    this.child.kill("SIGKILL");
    return true;
  }

  private mayRelaunch(): boolean {
    return (
      this.relaunches < GuestSession.MAX_RELAUNCHES &&
      process.env.PARTIS_IN_NESTED_HOST === "1" &&
      (!this.output.includes(READY) || !this.typed)
    );
  }

  /**
   * Run `hook` now and again whenever the VM is booted once more: the
   * host-side set-up a new VM process needs (connecting to its channel
   * socket, addressing its TAP). A hook's pending work should stop when
   * `generation` is no longer current.
   */
  onEachLaunch(hook: (generation: number) => void): void {
    this.launchHooks.push(hook);
    hook(this.generation);
  }

  /** Close the console input (the guest sees end of file when it reads it). */
  endInput(): void {
    this.inputEnded = true;
    this.child.stdin!.end();
  }

  private occurrences(text: string | RegExp): number {
    if (text instanceof RegExp) return (this.output.match(new RegExp(text.source, text.flags.includes("g") ? text.flags : text.flags + "g")) ?? []).length;
    let n = 0;
    for (let i = this.output.indexOf(text); i >= 0; i = this.output.indexOf(text, i + text.length)) n++;
    return n;
  }

  private check(): void {
    this.waiters = this.waiters.filter((w) => {
      if (this.occurrences(w.text) >= w.count) {
        w.resolve();
        return false;
      }
      return true;
    });
  }

  /**
   * Resolves once `text` (a string, or a pattern: use one when the typed command
   * itself contains the text, since the console echoes input) has appeared
   * `count` times on the console; rejects if the VM exits first.
   */
  waitFor(text: string | RegExp, count = 1): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.occurrences(text) >= count) return resolve();
      this.waiters.push({ text, count, resolve });
      void this.exited.then((status) => {
        if (this.occurrences(text) < count)
          reject(new Error(`VM exited (status ${status}) before "${text}" x${count}\n--- console ---\n${this.output.slice(-3000)}\n--- stderr ---\n${this.stderr.slice(-2000)}`));
      });
    });
  }

  type(text: string): void {
    this.typed = true;
    this.typedText += text;
    this.child.stdin!.write(text);
  }

  kill(): void {
    this.child.kill("SIGKILL");
  }
}

/** Runs a VM whose init runs `command` (via partis.run) and returns its console output and status. */
export async function runGuestCommand(command: string, args: readonly string[] = []): Promise<{ status: number; output: string; stderr: string }> {
  const b64 = Buffer.from(command, "utf8").toString("base64");
  const s = new GuestSession(["--append", `console=ttyS0 quiet panic=-1 partis.run=b64:${b64}`, ...args]);
  s.endInput();
  const status = await s.exited;
  return { status, output: s.output, stderr: s.stderr };
}
