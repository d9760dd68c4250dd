/**
 * Kernel module resolution against an unpacked kernel package: which of the
 * requested modules are built in (modules.builtin), which are loadable, and the
 * full set of loadable modules in dependency order (modules.dep, written by
 * `depmod -b`; `pre:` soft dependencies from modules.softdep are honoured).
 */
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { KernelModuleError } from "./image-errors.js";

/** Module names compare with `-` and `_` as the same character, as the kernel does. */
export function normaliseModuleName(name: string): string {
  return name.replace(/-/g, "_");
}

function nameOfPath(relPath: string): string {
  const base = relPath.slice(relPath.lastIndexOf("/") + 1);
  return normaliseModuleName(base.replace(/\.ko(\.(xz|zst|gz))?$/, ""));
}

export interface ModuleIndex {
  kernelVersion: string;
  /** `<root>/lib/modules/<kernelVersion>` */
  modulesDir: string;
  /** normalised name → path relative to modulesDir */
  paths: ReadonlyMap<string, string>;
  /** normalised name → its direct dependencies (normalised names) */
  deps: ReadonlyMap<string, readonly string[]>;
  /** normalised name → `pre:` soft dependencies */
  softPre: ReadonlyMap<string, readonly string[]>;
  builtin: ReadonlySet<string>;
}

/** Reads modules.dep, modules.softdep and modules.builtin of one kernel. */
export async function loadModuleIndex(modulesDir: string, kernelVersion: string): Promise<ModuleIndex> {
  const depFile = join(modulesDir, "modules.dep");
  if (!existsSync(depFile)) throw new KernelModuleError(`${depFile} is missing (run depmod -b)`, { modulesDir });
  const paths = new Map<string, string>();
  const deps = new Map<string, string[]>();
  for (const line of (await readFile(depFile, "utf8")).split("\n")) {
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const rel = line.slice(0, colon);
    const name = nameOfPath(rel);
    paths.set(name, rel);
    deps.set(name, line.slice(colon + 1).trim().split(/\s+/).filter(Boolean).map(nameOfPath));
  }
  const softPre = new Map<string, string[]>();
  const softFile = join(modulesDir, "modules.softdep");
  if (existsSync(softFile)) {
    for (const line of (await readFile(softFile, "utf8")).split("\n")) {
      const m = /^softdep\s+(\S+)\s+(.*)$/.exec(line.trim());
      if (!m) continue;
      const words = m[2]!.split(/\s+/);
      const pre: string[] = [];
      let inPre = false;
      for (const w of words) {
        if (w === "pre:") inPre = true;
        else if (w === "post:") inPre = false;
        else if (inPre) pre.push(normaliseModuleName(w));
      }
      if (pre.length > 0) softPre.set(normaliseModuleName(m[1]!), pre);
    }
  }
  const builtin = new Set<string>();
  const builtinFile = join(modulesDir, "modules.builtin");
  if (existsSync(builtinFile)) {
    for (const line of (await readFile(builtinFile, "utf8")).split("\n")) if (line.trim()) builtin.add(nameOfPath(line.trim()));
  }
  return { kernelVersion, modulesDir, paths, deps, softPre, builtin };
}

export interface ModuleLoadPlan {
  /** Loadable modules, every dependency before its users: `{name, path relative to modulesDir}`. */
  load: { name: string; path: string }[];
  /** Requested modules that are compiled into the kernel (nothing to load). */
  builtin: string[];
}

/**
 * Resolves `requested` to a load order. Unknown names throw a
 * {@link KernelModuleError}; built-in names are reported, not loaded.
 */
export function planModuleLoad(index: ModuleIndex, requested: readonly string[]): ModuleLoadPlan {
  const load: { name: string; path: string }[] = [];
  const builtin: string[] = [];
  const done = new Set<string>();
  const visiting = new Set<string>();
  const visit = (name: string, soft: boolean): void => {
    if (done.has(name)) return;
    const path = index.paths.get(name);
    if (path === undefined) {
      if (index.builtin.has(name) || soft) return;
      throw new KernelModuleError(`kernel module ${name} not found in ${index.modulesDir}`, { module: name, kernelVersion: index.kernelVersion });
    }
    if (visiting.has(name)) return; // dependency cycle: depmod never writes one, be safe anyway
    visiting.add(name);
    for (const pre of index.softPre.get(name) ?? []) visit(pre, true);
    for (const dep of index.deps.get(name) ?? []) visit(dep, false);
    visiting.delete(name);
    done.add(name);
    load.push({ name, path });
  };
  for (const raw of requested) {
    const name = normaliseModuleName(raw);
    if (!index.paths.has(name) && index.builtin.has(name)) {
      if (!builtin.includes(name)) builtin.push(name);
      continue;
    }
    visit(name, false);
  }
  return { load, builtin };
}
