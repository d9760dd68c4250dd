/**
 * The bundle users run (dist/partis/, scripts/bundle.mjs): current with the
 * compiled tree, and every module it loads at run time resolvable from where
 * it sits. A specifier the bundler could not follow (a computed import()) or
 * a thread entry that is not beside the code naming it would only fail at
 * run time, in a catch block or a thread start: these tests fail instead.
 * What the bundled programs do is tested by every CLI test (they run it).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const DIST = fileURLToPath(new URL("../../", import.meta.url));
const BUNDLE = join(DIST, "partis");
/** The only package the bundle leaves to node_modules (a native module). */
const EXTERNAL_PACKAGES = new Set(["koffi"]);
const ENTRIES = ["partis.js", "partis-worker.js", "vcpu-thread.js", "device-thread.js"];

function bundleFiles(): string[] {
  return readdirSync(BUNDLE).filter((f) => f.endsWith(".js"));
}

function newestMtime(dir: string): { path: string; mtimeMs: number } {
  let newest = { path: dir, mtimeMs: 0 };
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    const st = statSync(p);
    const n = st.isDirectory() ? newestMtime(p) : name.endsWith(".js") ? { path: p, mtimeMs: st.mtimeMs } : newest;
    if (n.mtimeMs > newest.mtimeMs) newest = n;
  }
  return newest;
}

test("bundle: built, and not older than the compiled tree it was made from", () => {
  for (const e of ENTRIES) assert.ok(existsSync(join(BUNDLE, e)), `dist/partis/${e} is missing: run node scripts/bundle.mjs (npm run build)`);
  const compiled = newestMtime(join(DIST, "src"));
  const bundled = Math.min(...ENTRIES.map((e) => statSync(join(BUNDLE, e)).mtimeMs));
  assert.ok(bundled >= compiled.mtimeMs, `${compiled.path} is newer than the bundle: run node scripts/bundle.mjs (npm run build)`);
});

test("bundle: every import resolves to a file beside it, a Node built-in or koffi; no computed specifier", () => {
  const files = new Set(bundleFiles());
  const problems: string[] = [];
  for (const f of files) {
    const code = readFileSync(join(BUNDLE, f), "utf8");
    // Static imports and re-exports: `from "x"` and side-effect `import "x"`.
    for (const m of code.matchAll(/(?:\bfrom|^import)\s*"([^"]+)"/gm)) check(f, m[1]!);
    // Dynamic imports: the argument must be a string literal.
    for (const m of code.matchAll(/\bimport\(\s*([^)]*?)\s*\)/g)) {
      const lit = /^"([^"]+)"$/.exec(m[1]!);
      if (lit === null) problems.push(`${f}: import(${m[1]}) is computed: it would resolve against dist/partis/ at run time`);
      else check(f, lit[1]!);
    }
    // Files found relative to the module (thread entries).
    for (const m of code.matchAll(/new URL\(\s*"([^"]+)"\s*,\s*import\.meta\.url\s*\)/g)) check(f, m[1]!);
  }
  function check(file: string, spec: string): void {
    if (spec.startsWith("node:")) return;
    if (spec.startsWith("./")) {
      if (!files.has(spec.slice(2))) problems.push(`${file}: "${spec}" is not in dist/partis/`);
      return;
    }
    if (!EXTERNAL_PACKAGES.has(spec)) problems.push(`${file}: "${spec}" is neither bundled nor an allowed external`);
  }
  assert.deepEqual(problems, []);
  // The thread entries are named from the code that starts them (thread-prestart.ts).
  const named = bundleFiles().some((f) => readFileSync(join(BUNDLE, f), "utf8").includes('new URL("./vcpu-thread.js", import.meta.url)'));
  assert.ok(named, "no bundled module names ./vcpu-thread.js: thread-prestart.ts's URL changed or was rewritten");
});

test("bundle: the CLI runs from it (version, and a usage error as one line with status 2)", () => {
  const cli = join(BUNDLE, "partis.js");
  assert.equal(execFileSync(process.execPath, [cli, "--version"], { encoding: "utf8" }).trim(), "0.1.0");
  let status: number | null = null;
  let stderr = "";
  try {
    execFileSync(process.execPath, [cli, "run", "--kernel", "/dev/null", "--cpus", "zero"], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    const err = e as { status: number | null; stderr: string };
    status = err.status;
    stderr = err.stderr;
  }
  assert.equal(status, 2);
  assert.match(stderr, /^partis run: --cpus: "zero" is not a whole number\n$/);
});
