/**
 * Debian packages as the source of guest artifacts: resolve a package name to a
 * concrete version with apt-cache, download the .deb with `apt-get download`
 * (never installs anything on the host) and unpack it with `dpkg-deb -x`.
 */
import { spawn } from "node:child_process";
import { PackageToolError } from "./image-errors.js";

export interface ToolResult {
  stdout: string;
  stderr: string;
}

/** Runs a tool, collects its output, and maps failures to a typed {@link PackageToolError}. */
export function runTool(
  code: string,
  file: string,
  args: readonly string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {},
): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ["ignore", "pipe", "pipe"] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on("data", (b: Buffer) => out.push(b));
    child.stderr.on("data", (b: Buffer) => err.push(b));
    child.on("error", (e: NodeJS.ErrnoException) => {
      const missing = e.code === "ENOENT";
      reject(
        new PackageToolError(
          missing ? "TOOL_MISSING" : code,
          missing ? `${file} is not installed (run scripts/setup.sh)` : `${file} could not be started: ${e.message}`,
          { tool: file, args: args.join(" ") },
          { cause: e },
        ),
      );
    });
    child.on("close", (status, signal) => {
      const stdout = Buffer.concat(out).toString("utf8");
      const stderr = Buffer.concat(err).toString("utf8");
      if (status === 0) resolve({ stdout, stderr });
      else {
        const tail = stderr.trim().split("\n").slice(-3).join(" | ");
        reject(
          new PackageToolError(code, `${file} ${args.join(" ")} failed (${signal ?? `exit ${status}`}): ${tail}`, {
            tool: file,
            status: status ?? -1,
            signal: signal ?? undefined,
          }),
        );
      }
    });
  });
}

export interface ResolvedPackage {
  name: string;
  version: string;
}

/** The candidate version apt would install for `name` (`apt-cache policy`). */
export async function candidateVersion(name: string): Promise<string> {
  const { stdout } = await runTool("APT_RESOLVE_FAILED", "apt-cache", ["policy", name]);
  const m = /^\s*Candidate:\s*(\S+)/m.exec(stdout);
  if (!m || m[1] === "(none)") {
    throw new PackageToolError("APT_RESOLVE_FAILED", `apt has no candidate for ${name} (run apt-get update?)`, { package: name });
  }
  return m[1]!;
}

/**
 * Resolves a metapackage such as `linux-image-amd64` to the concrete package it
 * depends on whose name matches `pattern` (e.g. `linux-image-6.1.0-56-amd64`).
 */
export async function resolveDependency(metapackage: string, pattern: RegExp): Promise<ResolvedPackage> {
  const { stdout } = await runTool("APT_RESOLVE_FAILED", "apt-cache", ["depends", "--no-recommends", "--no-suggests", metapackage]);
  for (const line of stdout.split("\n")) {
    const m = /^\s*\|?Depends:\s*(\S+)/.exec(line);
    if (m && pattern.test(m[1]!)) {
      const name = m[1]!;
      return { name, version: await candidateVersion(name) };
    }
  }
  throw new PackageToolError("APT_RESOLVE_FAILED", `${metapackage} has no dependency matching ${pattern}`, { package: metapackage });
}

/** Downloads `name=version` into `dir` and returns the .deb path. */
export async function downloadDeb(pkg: ResolvedPackage, dir: string): Promise<string> {
  const { readdir } = await import("node:fs/promises");
  await runTool("APT_DOWNLOAD_FAILED", "apt-get", ["download", "-q", `${pkg.name}=${pkg.version}`], { cwd: dir });
  const debs = (await readdir(dir)).filter((f) => f.startsWith(`${pkg.name}_`) && f.endsWith(".deb"));
  if (debs.length !== 1) {
    throw new PackageToolError("APT_DOWNLOAD_FAILED", `apt-get download left ${debs.length} .deb files for ${pkg.name}`, { dir });
  }
  return `${dir}/${debs[0]}`;
}

/** Unpacks a .deb's data into `root` (`dpkg-deb -x`). */
export async function extractDeb(deb: string, root: string): Promise<void> {
  await runTool("DPKG_EXTRACT_FAILED", "dpkg-deb", ["-x", deb, root]);
}

/**
 * Remembers apt answers in `<cacheDir>/apt-resolved.json`, valid while
 * /var/lib/apt/lists is unchanged (apt-cache rebuilds its cache in memory on
 * every call here, ~0.5 s each). Write failures (read-only cache) are ignored.
 */
export async function memoisedAptAnswer<T>(cacheDir: string, key: string, answer: () => Promise<T>): Promise<T> {
  const { readFile, writeFile, rename, mkdir, stat } = await import("node:fs/promises");
  const file = `${cacheDir}/apt-resolved.json`;
  let stamp = "none";
  try {
    stamp = String((await stat("/var/lib/apt/lists")).mtimeMs);
  } catch {
    /* no lists: the answer call decides */
  }
  let memo: { stamp: string; answers: Record<string, T> } = { stamp, answers: {} };
  try {
    const parsed = JSON.parse(await readFile(file, "utf8")) as { stamp?: unknown; answers?: unknown };
    if (parsed.stamp === stamp && parsed.answers && typeof parsed.answers === "object") {
      memo = { stamp, answers: parsed.answers as Record<string, T> };
      if (Object.prototype.hasOwnProperty.call(memo.answers, key)) return memo.answers[key]!;
    }
  } catch {
    /* absent or corrupt: recompute */
  }
  const value = await answer();
  memo.answers[key] = value;
  try {
    await mkdir(cacheDir, { recursive: true });
    const tmp = `${file}.${process.pid}.tmp`;
    await writeFile(tmp, JSON.stringify(memo));
    await rename(tmp, file);
  } catch {
    /* read-only cache */
  }
  return value;
}
