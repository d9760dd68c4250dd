/**
 * The stock Debian kernel, unpacked into the image cache: `linux-image-amd64`
 * resolved to its concrete `linux-image-<abi>-amd64` package, downloaded with
 * `apt-get download`, unpacked with `dpkg-deb -x`, and indexed with
 * `depmod -b`. Nothing is installed on the host. Also busybox-static, the
 * same way.
 */
import { existsSync, readdirSync } from "node:fs";
import { chmod, copyFile, readdir, rm, stat } from "node:fs/promises";
import { join } from "node:path";
import { candidateVersion, downloadDeb, extractDeb, memoisedAptAnswer, resolveDependency, runTool, type ResolvedPackage } from "./debian-package.js";
import { ensureCacheEntry } from "./image-cache.js";
import { PackageToolError } from "./image-errors.js";

export interface DebianKernel {
  package: ResolvedPackage;
  kernelVersion: string;
  /** vmlinuz (bzImage) from the package's /boot */
  kernel: string;
  /** `<root>/lib/modules/<kernelVersion>`, with modules.dep */
  modulesDir: string;
}

/** Cache-safe spelling of a Debian version (epochs have a colon). */
function versionTag(v: string): string {
  return v.replace(/[^A-Za-z0-9.+~-]/g, "_");
}

async function newestCached(dir: string, prefix: string): Promise<string | undefined> {
  if (!existsSync(dir)) return undefined;
  let best: { path: string; mtime: number } | undefined;
  for (const name of await readdir(dir)) {
    if (!name.startsWith(prefix) || name.includes(".tmp-") || name.endsWith(".lock")) continue;
    const s = await stat(join(dir, name));
    if (!best || s.mtimeMs > best.mtime) best = { path: join(dir, name), mtime: s.mtimeMs };
  }
  return best?.path;
}

function kernelFromEntry(entry: string): DebianKernel {
  const base = entry.slice(entry.lastIndexOf("/") + 1);
  const us = base.lastIndexOf("_");
  const name = base.slice(0, us);
  const kernelVersion = name.replace(/^linux-image-/, "");
  return {
    package: { name, version: base.slice(us + 1) },
    kernelVersion,
    kernel: join(entry, "root", "boot", `vmlinuz-${kernelVersion}`),
    modulesDir: join(entry, "root", "lib", "modules", kernelVersion),
  };
}

/**
 * Unpacks the Debian kernel `metapackage` (default `linux-image-amd64`) into
 * `<cacheDir>/kernel/<package>_<version>/root`. When apt cannot answer (no
 * package lists, offline) an already cached kernel is used.
 */
export async function prepareDebianKernel(
  cacheDir: string,
  log: (l: string) => void,
  metapackage = "linux-image-amd64",
): Promise<DebianKernel> {
  const kernelsDir = join(cacheDir, "kernel");
  let pkg: ResolvedPackage;
  try {
    pkg = await memoisedAptAnswer(cacheDir, `kernel:${metapackage}`, async () =>
      /^linux-image-\d/.test(metapackage)
        ? { name: metapackage, version: await candidateVersion(metapackage) }
        : await resolveDependency(metapackage, /^linux-image-\d[^ ]*$/),
    );
  } catch (e) {
    const cached = aptUnavailable(e) ? await newestCached(kernelsDir, "linux-image-") : undefined;
    if (cached) {
      log(`apt could not resolve ${metapackage} (${(e as Error).message}); using cached ${cached}`);
      return kernelFromEntry(cached);
    }
    throw e;
  }
  const entry = join(kernelsDir, `${pkg.name}_${versionTag(pkg.version)}`);
  await ensureCacheEntry(entry, async (tmp) => {
    log(`downloading ${pkg.name} ${pkg.version}`);
    const deb = await downloadDeb(pkg, tmp);
    log(`unpacking ${deb}`);
    await extractDeb(deb, join(tmp, "root"));
    await rm(deb, { force: true });
    const k = kernelFromEntry(entry);
    if (!existsSync(join(tmp, "root", "boot", `vmlinuz-${k.kernelVersion}`))) {
      throw new PackageToolError("DPKG_EXTRACT_FAILED", `${pkg.name} has no /boot/vmlinuz-${k.kernelVersion}`, { package: pkg.name });
    }
    log(`depmod ${k.kernelVersion}`);
    await runTool("DEPMOD_FAILED", depmodPath(), ["-b", join(tmp, "root"), k.kernelVersion]);
  });
  return kernelFromEntry(entry);
}

/** apt itself cannot answer (not installed, no package lists): a cached entry may stand in. */
function aptUnavailable(e: unknown): boolean {
  if (e instanceof PackageToolError && e.code === "TOOL_MISSING") return true;
  try {
    return !readdirSync("/var/lib/apt/lists").some((f) => f.endsWith("_Packages") || f.includes("_Packages."));
  } catch {
    return true;
  }
}

function depmodPath(): string {
  for (const p of ["/usr/sbin/depmod", "/sbin/depmod"]) if (existsSync(p)) return p;
  return "depmod";
}

/** busybox-static's binary, unpacked into `<cacheDir>/busybox/<version>/busybox`. */
export async function prepareBusybox(cacheDir: string, log: (l: string) => void): Promise<{ path: string; version: string }> {
  const dir = join(cacheDir, "busybox");
  let version: string;
  try {
    version = await memoisedAptAnswer(cacheDir, "busybox-static", () => candidateVersion("busybox-static"));
  } catch (e) {
    const cached = aptUnavailable(e) ? await newestCached(dir, "busybox-static_") : undefined;
    if (cached) return { path: join(cached, "busybox"), version: cached.slice(cached.lastIndexOf("_") + 1) };
    throw e;
  }
  const entry = join(dir, `busybox-static_${versionTag(version)}`);
  await ensureCacheEntry(entry, async (tmp) => {
    log(`downloading busybox-static ${version}`);
    const deb = await downloadDeb({ name: "busybox-static", version }, tmp);
    await extractDeb(deb, join(tmp, "x"));
    await copyFile(join(tmp, "x", "bin", "busybox"), join(tmp, "busybox"));
    await rm(join(tmp, "x"), { recursive: true, force: true });
    await chmod(join(tmp, "busybox"), 0o755);
    await rm(deb, { force: true });
  });
  return { path: join(entry, "busybox"), version };
}
