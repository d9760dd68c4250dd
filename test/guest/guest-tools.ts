/**
 * Guest programs busybox lacks, built with `gcc -static` (scripts/setup.sh
 * installs gcc and libc6-dev) and appended to a copy of an initramfs as
 * /bin/<name>: the real-guest tests' (test/guest/tools/*.c) and the in-guest
 * benchmarks' (bench/devices/guest-diskbench.c). Binaries and initramfs
 * copies are cached under .cache/guest-tools by content, so a rerun builds
 * nothing.
 */
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { writeNewcCpio } from "../../src/images/cpio.js";
import { prepareDefaultGuest } from "../../src/images/default-guest.js";

const REPO = fileURLToPath(new URL("../../..", import.meta.url));
const WORK = join(REPO, ".cache", "guest-tools");

function sha(data: Buffer | string): string {
  return createHash("sha256").update(data).digest("hex").slice(0, 16);
}

/** gcc -static -O2 `source` (a C file) as `name`: the binary's path. */
export function buildStaticTool(source: string, name: string): string {
  const text = readFileSync(source);
  const out = join(WORK, `${name}-${sha(text)}`);
  if (existsSync(out)) return out;
  mkdirSync(WORK, { recursive: true });
  const tmp = `${out}.tmp${process.pid}`;
  const r = spawnSync("gcc", ["-static", "-O2", "-Wall", "-o", tmp, source], { encoding: "utf8" });
  if (r.error !== undefined) throw new Error(`gcc could not run (${r.error.message}): scripts/setup.sh installs gcc and libc6-dev`);
  if (r.status !== 0) throw new Error(`gcc -static ${source} failed (libc6-dev has libc.a):\n${r.stderr}`);
  renameSync(tmp, out);
  return out;
}

/** test/guest/tools/<name>.c, built: the binary's path. */
export function buildGuestTool(name: string): string {
  return buildStaticTool(join(REPO, "test", "guest", "tools", `${name}.c`), name);
}

/** A copy of `baseInitrd` with the binaries appended as /bin/<name> (a second gzip'ed cpio member). */
export function initrdWith(baseInitrd: string, tools: readonly { readonly name: string; readonly path: string }[]): string {
  const base = readFileSync(baseInitrd);
  const bins = tools.map((t) => ({ name: t.name, data: readFileSync(t.path) }));
  const out = join(WORK, `initrd-${sha(Buffer.concat([Buffer.from(sha(base)), ...bins.map((b) => Buffer.concat([Buffer.from(b.name), b.data]))]))}.cpio.gz`);
  if (existsSync(out)) return out;
  mkdirSync(WORK, { recursive: true });
  const extra = gzipSync(writeNewcCpio(bins.map((b) => ({ kind: "file" as const, path: `bin/${b.name}`, data: b.data, mode: 0o755 }))));
  // Linux unpacks concatenated (compressed) cpio archives in order; the base ends with its own trailer.
  writeFileSync(`${out}.tmp${process.pid}`, Buffer.concat([base, extra]));
  renameSync(`${out}.tmp${process.pid}`, out);
  return out;
}

/** The default guest's initramfs with test/guest/tools' named programs as /bin/<name>. */
export async function initrdWithTools(names: readonly string[]): Promise<string> {
  const guest = await prepareDefaultGuest();
  return initrdWith(
    guest.initrd,
    names.map((name) => ({ name, path: buildGuestTool(name) })),
  );
}
