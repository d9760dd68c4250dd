/**
 * The on-disk cache of prepared images. Every entry is a directory whose name
 * carries its version or content hash; it is built in a private temporary
 * directory and published with one atomic rename, under a lock file, so two
 * concurrent callers never see a half-built entry and never build it twice.
 */
import { existsSync } from "node:fs";
import { mkdir, open, readFile, rename, rm } from "node:fs/promises";
import { homedir } from "node:os";
import { join } from "node:path";
import { ImageCacheError } from "./image-errors.js";

/** `$PARTIS_CACHE`, else `~/.cache/partis`. */
export function defaultCacheDir(): string {
  const env = process.env["PARTIS_CACHE"];
  return env && env.length > 0 ? env : join(homedir(), ".cache", "partis");
}

function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Holds `<path>.lock` (O_EXCL create holding our pid) while `fn` runs; breaks locks of dead processes. */
export async function withLock<T>(path: string, fn: () => Promise<T>, timeoutMs = 15 * 60_000): Promise<T> {
  const lock = `${path}.lock`;
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const fh = await open(lock, "wx");
      await fh.writeFile(`${process.pid}\n`);
      await fh.close();
      break;
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      if (err.code !== "EEXIST") throw new ImageCacheError(`cannot create lock ${lock}: ${err.message}`, { path: lock }, { cause: e });
      const owner = Number.parseInt(await readFile(lock, "utf8").catch(() => ""), 10);
      if (!Number.isNaN(owner) && !pidAlive(owner)) {
        await rm(lock, { force: true });
        continue;
      }
      if (Date.now() > deadline) throw new ImageCacheError(`timed out waiting for ${lock} (held by pid ${owner})`, { path: lock });
      await sleep(250);
    }
  }
  try {
    return await fn();
  } finally {
    await rm(lock, { force: true });
  }
}

/**
 * Returns `dir`, building it first if absent: `build(tmp)` fills a temporary
 * sibling directory, which is then renamed to `dir`. An existing `dir` is
 * returned immediately without taking the lock (read-only caches work).
 */
export async function ensureCacheEntry(dir: string, build: (tmp: string) => Promise<void>): Promise<string> {
  if (existsSync(dir)) return dir;
  const parent = join(dir, "..");
  try {
    await mkdir(parent, { recursive: true });
  } catch (e) {
    throw new ImageCacheError(`cannot create cache directory ${parent}: ${(e as Error).message}`, { path: parent }, { cause: e });
  }
  return withLock(dir, async () => {
    if (existsSync(dir)) return dir;
    const tmp = `${dir}.tmp-${process.pid}-${Date.now().toString(36)}`;
    await rm(tmp, { recursive: true, force: true });
    await mkdir(tmp, { recursive: true });
    try {
      await build(tmp);
      await rename(tmp, dir);
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
    return dir;
  });
}
