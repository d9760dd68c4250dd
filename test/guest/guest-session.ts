/**
 * Drives `partis run` as a user would: a child process with the console on
 * pipes. Collects console output, waits for text, types input, and resolves
 * with the exit status. Used by the real-guest suites.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { fileURLToPath } from "node:url";

export const PARTIS_CLI = fileURLToPath(new URL("../../src/cli/main.js", import.meta.url));
export const READY = "PARTIS-GUEST-READY";

export class GuestSession {
  readonly child: ChildProcess;
  output = "";
  stderr = "";
  readonly exited: Promise<number>;
  private waiters: { text: string | RegExp; count: number; resolve: () => void }[] = [];

  /** Longest a session may live: a hung guest fails its test instead of hanging the suite. */
  static readonly TIMEOUT_MS = Number(process.env.PARTIS_GUEST_TIMEOUT_MS ?? 300_000);
  private readonly deadline: NodeJS.Timeout;

  constructor(args: readonly string[], env: NodeJS.ProcessEnv = process.env) {
    this.child = spawn(process.execPath, [PARTIS_CLI, "run", ...args], { stdio: ["pipe", "pipe", "pipe"], env });
    this.child.stdout!.on("data", (d: Buffer) => {
      this.output += d.toString("latin1");
      this.check();
    });
    this.child.stderr!.on("data", (d: Buffer) => {
      this.stderr += d.toString("latin1");
    });
    this.child.stdin!.on("error", () => {});
    this.exited = new Promise((resolve) => this.child.on("exit", (code, signal) => resolve(code ?? (signal ? 128 : -1))));
    this.deadline = setTimeout(() => {
      this.stderr += `\n[test] VM still running after ${GuestSession.TIMEOUT_MS} ms: killed\n`;
      this.kill();
    }, GuestSession.TIMEOUT_MS);
    void this.exited.then(() => clearTimeout(this.deadline));
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
  s.child.stdin!.end();
  const status = await s.exited;
  return { status, output: s.output, stderr: s.stderr };
}
