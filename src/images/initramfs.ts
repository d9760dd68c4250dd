/**
 * Assembles a busybox initramfs (gzip-compressed newc cpio): the directory
 * skeleton, busybox with a symlink per applet, the kernel modules of a load
 * plan (plus a trimmed modules.dep so busybox modprobe works too, and a
 * `load-order` file for insmod), and caller-supplied files such as /init.
 */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import { writeNewcCpio, type CpioEntry } from "./cpio.js";
import type { ModuleIndex, ModuleLoadPlan } from "./kernel-modules.js";

/** Path inside the initramfs of the module load order: one path (relative to /lib/modules/<ver>) per line. */
export const LOAD_ORDER_FILE = "lib/modules/load-order";

export interface InitramfsSpec {
  busybox: string;
  modules: { index: ModuleIndex; plan: ModuleLoadPlan };
  /** Extra files and directories (e.g. /init, /etc/inittab); parents are created automatically. */
  files: readonly CpioEntry[];
}

/** Applet install paths from `busybox --list-full` (e.g. `bin/sh`, `sbin/poweroff`). */
export async function busyboxApplets(busybox: string): Promise<string[]> {
  const { stdout } = await promisify(execFile)(busybox, ["--list-full"]);
  return stdout.split("\n").map((l) => l.trim()).filter((l) => l.length > 0 && !l.includes(".."));
}

/** Builds the cpio entries (uncompressed) for a spec. */
export async function initramfsEntries(spec: InitramfsSpec): Promise<CpioEntry[]> {
  const entries: CpioEntry[] = [];
  const dirs = new Set<string>();
  const ensureDir = (path: string): void => {
    const parts = path.split("/").filter(Boolean);
    for (let i = 1; i <= parts.length; i++) {
      const d = parts.slice(0, i).join("/");
      if (!dirs.has(d)) {
        dirs.add(d);
        entries.push({ kind: "dir", path: d, mode: d === "tmp" ? 0o1777 : 0o755 });
      }
    }
  };
  const parentOf = (p: string): string => p.split("/").filter(Boolean).slice(0, -1).join("/");
  for (const d of ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "var/log", "mnt"]) ensureDir(d);
  // The kernel opens /dev/console before /init runs, i.e. before devtmpfs is mounted.
  entries.push({ kind: "chardev", path: "dev/console", major: 5, minor: 1, mode: 0o600 });
  entries.push({ kind: "chardev", path: "dev/null", major: 1, minor: 3, mode: 0o666 });
  entries.push({ kind: "file", path: "bin/busybox", data: await readFile(spec.busybox), mode: 0o755 });
  const explicit = new Set(spec.files.map((f) => f.path.replace(/^\/+/, "")));
  for (const applet of await busyboxApplets(spec.busybox)) {
    if (applet === "bin/busybox" || explicit.has(applet)) continue;
    ensureDir(parentOf(applet));
    entries.push({ kind: "symlink", path: applet, target: "/bin/busybox" });
  }
  const { index, plan } = spec.modules;
  const modRoot = `lib/modules/${index.kernelVersion}`;
  ensureDir(modRoot);
  const depLines: string[] = [];
  for (const m of plan.load) {
    const dest = `${modRoot}/${m.path}`;
    ensureDir(parentOf(dest));
    entries.push({ kind: "file", path: dest, data: await readFile(join(index.modulesDir, m.path)), mode: 0o644 });
    const deps = (index.deps.get(m.name) ?? []).map((d) => index.paths.get(d)).filter((p): p is string => p !== undefined);
    depLines.push(`${m.path}: ${deps.join(" ")}`.trimEnd());
  }
  entries.push({ kind: "file", path: `${modRoot}/modules.dep`, data: Buffer.from(depLines.join("\n") + "\n") });
  for (const f of ["modules.builtin", "modules.order"]) {
    try {
      entries.push({ kind: "file", path: `${modRoot}/${f}`, data: await readFile(join(index.modulesDir, f)) });
    } catch {
      /* optional */
    }
  }
  entries.push({ kind: "file", path: LOAD_ORDER_FILE, data: Buffer.from(plan.load.map((m) => `${index.kernelVersion}/${m.path}`).join("\n") + "\n") });
  for (const f of spec.files) {
    const p = f.path.replace(/^\/+/, "");
    ensureDir(parentOf(p));
    if (f.kind === "dir") ensureDir(p);
    else entries.push({ ...f, path: p });
  }
  return entries;
}

/** Builds the gzip-compressed newc archive for a spec. */
export async function buildInitramfs(spec: InitramfsSpec): Promise<Buffer> {
  return gzipSync(writeNewcCpio(await initramfsEntries(spec)), { level: 6 });
}
