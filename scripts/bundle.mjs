#!/usr/bin/env node
/**
 * The programs users run, bundled: `dist/partis/` holds `partis.js` (the
 * CLI), `partis-worker.js` (a VM's process under the service), and the two
 * thread entries a VM's process starts (`vcpu-thread.js`, `device-thread.js`;
 * thread-prestart.ts finds them next to itself), plus chunks they share and
 * the modules loaded on demand (one chunk per dynamic import).
 *
 * Why: a Node process or thread pays for every module file it loads (resolve,
 * stat, read, compile). tsc's output is ~100 files on `partis run`'s path,
 * loaded again by each thread; the bundle is under 40 files for every command,
 * fewer on any one path. Measured in the nested test host, where files come
 * over 9p and every instruction is emulated: loading running-vm.js's graph
 * took 2.7-3.0 s from tsc's output and 0.5 s bundled; the start gate opened
 * ~1.7 s sooner (docs/benchmarks.md, "Boot"). On a fast host it saves tens
 * of ms per start and ~1.5 MiB of the main thread's memory.
 *
 * Input is tsc's output (dist/src), so the bundle is the type-checked code;
 * koffi stays external (a native module, loaded from node_modules). CommonJS
 * dependencies (commander) get a `require` through createRequire.
 *
 * Run by `npm run build` after tsc; `node scripts/bundle.mjs` alone rebuilds it.
 */
import { build } from "esbuild";
import { rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const outdir = join(root, "dist/partis");
rmSync(outdir, { recursive: true, force: true });
await build({
  absWorkingDir: root,
  entryPoints: {
    partis: "dist/src/cli/main.js",
    "partis-worker": "dist/src/worker/main.js",
    "vcpu-thread": "dist/src/worker/vcpu-thread.js",
    "device-thread": "dist/src/worker/device-thread.js",
  },
  outdir,
  bundle: true,
  splitting: true,
  format: "esm",
  platform: "node",
  target: "node20",
  external: ["koffi"],
  // Flat: chunks sit beside the entries, so `new URL("./vcpu-thread.js", import.meta.url)` resolves from any of them.
  chunkNames: "chunk-[hash]",
  banner: { js: 'import { createRequire as __partisCreateRequire } from "node:module";\nconst require = __partisCreateRequire(import.meta.url);' },
  sourcemap: "linked",
  logLevel: "warning",
});
