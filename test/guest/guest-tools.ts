/**
 * Guest programs busybox lacks (test/guest/tools/*.c), built with
 * `gcc -static` (scripts/setup.sh installs gcc and libc6-dev) and appended to
 * a copy of the default guest's initramfs as /bin/<name>. Both are cached
 * under .cache/guest-tools by content, so a rerun builds nothing.
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

/** gcc -static -O2 test/guest/tools/<name>.c: the binary's path. */
export function buildGuestTool(name: string): string {
  const source = join(REPO, "test", "guest", "tools", `${name}.c`);
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

/** The default guest's initramfs with the named tools appended as /bin/<name> (a second gzip'ed cpio member). */
export async function initrdWithTools(names: readonly string[]): Promise<string> {
  const guest = await prepareDefaultGuest();
  const base = readFileSync(guest.initrd);
  const tools = names.map((n) => ({ name: n, data: readFileSync(buildGuestTool(n)) }));
  const out = join(WORK, `initrd-${sha(Buffer.concat([Buffer.from(sha(base)), ...tools.map((t) => t.data)]))}.cpio.gz`);
  if (existsSync(out)) return out;
  mkdirSync(WORK, { recursive: true });
  const extra = gzipSync(writeNewcCpio(tools.map((t) => ({ kind: "file" as const, path: `bin/${t.name}`, data: t.data, mode: 0o755 }))));
  // Linux unpacks concatenated (compressed) cpio archives in order; the base ends with its own trailer.
  writeFileSync(`${out}.tmp${process.pid}`, Buffer.concat([base, extra]));
  renameSync(`${out}.tmp${process.pid}`, out);
  return out;
}
