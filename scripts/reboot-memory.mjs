#!/usr/bin/env node
// What a guest reboot leaves behind in `partis run`'s process and on the host
// (docs/guests.md, "Reboots"): boots the default guest with a device thread
// (--rng), whose init writes 100 MiB to its tmpfs and reboots, and prints at
// each of 4 boots the process's RSS, its fds and the host's Shmem (guest RAM
// the process no longer maps still counts there). Run it where stock guests
// run, e.g. `node dist/partis/partis.js host nested -- node scripts/reboot-memory.mjs`;
// an argument names another build's dist/partis/partis.js.
import { spawn } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { fileURLToPath } from "node:url";

const cli = process.argv[2] ?? fileURLToPath(new URL("../dist/partis/partis.js", import.meta.url));
const BOOTS = 4;
const script = "dd if=/dev/zero of=/x bs=1M count=100 2>/dev/null; echo WROTE; reboot -f";
const b64 = Buffer.from(script).toString("base64");
const child = spawn(process.execPath, [cli, "run", "--memory", "512M", "--rng", "--append", `console=ttyS0 quiet panic=-1 partis.run=b64:${b64}`], {
  stdio: ["pipe", "pipe", "inherit"],
});
const mib = (text, key) => Number(new RegExp(`${key}:\\s+(\\d+)`).exec(text)?.[1] ?? 0) >> 10;
const sample = () => {
  const status = readFileSync(`/proc/${child.pid}/status`, "utf8");
  const fds = readdirSync(`/proc/${child.pid}/fd`).length;
  return `RSS ${mib(status, "VmRSS")} MiB (shmem ${mib(status, "RssShmem")}, anon ${mib(status, "RssAnon")}), fds ${fds}, host Shmem ${mib(readFileSync("/proc/meminfo", "utf8"), "Shmem")} MiB`;
};
let out = "";
let boots = 0;
const timer = setTimeout(() => {
  console.log(`no boot ${boots + 1} within 400 s; console tail:\n${out.slice(-500)}`);
  child.kill("SIGKILL");
  process.exitCode = 1;
}, 400_000);
child.stdout.on("data", (d) => {
  out += d.toString("latin1");
  const n = out.split("WROTE").length - 1;
  if (n <= boots) return;
  boots = n;
  console.log(`boot ${n}: ${sample()}`);
  if (n >= BOOTS) child.kill("SIGKILL");
});
child.on("exit", () => clearTimeout(timer));
