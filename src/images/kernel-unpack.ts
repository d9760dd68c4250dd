/**
 * Unpacked kernels: a bzImage's compressed kernel, decompressed once on the
 * host and kept in the image cache, so a boot copies the kernel's bytes into
 * guest RAM and starts it in startup_64 instead of running the decompressor in
 * the guest (seconds under nested emulation; see docs/benchmarks.md).
 *
 * The cache entry (`<cache>/unpacked-kernel/<key>/`) holds `kernel.bin`, the
 * kernel's non-zero pages back to back, and `layout.json`, where each run
 * goes. The key is the bzImage's real path, size and modification time, so a
 * replaced file is unpacked again; the layout records the bzImage's size and
 * mtime too and is checked on every use.
 *
 * Decompression uses zlib for gzip and Debian's `xz` and `zstd` tools for
 * those formats (Debian's kernels are xz); other formats, or a missing tool,
 * leave the kernel to decompress itself in the guest (`why` says so).
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync, realpathSync, statSync } from "node:fs";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import { compressedPayload, parseBzImage, type KernelCompression } from "../machine/linux-boot.js";
import { packKernelSegments, parseKernelElf, type KernelExtent } from "../machine/kernel-elf.js";
import { defaultCacheDir, ensureCacheEntry } from "./image-cache.js";
import { ImageCacheError } from "./image-errors.js";

/** Bump when the entry layout changes. */
const LAYOUT_VERSION = 1;
const IMAGE_FILE = "kernel.bin";
const LAYOUT_FILE = "layout.json";

/** Where a prepared unpacked kernel is and how to load it (plain data: it travels in VmConfig). */
export interface UnpackedKernel {
  /** The flat file of non-zero runs. */
  readonly imagePath: string;
  readonly imageBytes: number;
  readonly entry: number;
  readonly loadStart: number;
  readonly loadEnd: number;
  readonly extents: readonly KernelExtent[];
  readonly compression: KernelCompression;
}

interface Layout extends Omit<UnpackedKernel, "imagePath"> {
  readonly version: number;
  readonly source: { readonly path: string; readonly size: number; readonly mtimeMs: number };
}

/** Either the unpacked kernel, or why the guest must decompress it itself. */
export type UnpackResult = { readonly ok: true; readonly kernel: UnpackedKernel } | { readonly ok: false; readonly why: string };

function sourceIdentity(bzImagePath: string): Layout["source"] {
  const path = realpathSync(bzImagePath);
  const st = statSync(path);
  return { path, size: st.size, mtimeMs: Math.floor(st.mtimeMs) };
}

function entryDir(cacheDir: string, source: Layout["source"]): string {
  const key = createHash("sha256").update(JSON.stringify({ v: LAYOUT_VERSION, ...source })).digest("hex").slice(0, 24);
  return join(cacheDir, "unpacked-kernel", key);
}

function readLayout(dir: string, source: Layout["source"]): UnpackedKernel | undefined {
  const layoutPath = join(dir, LAYOUT_FILE);
  if (!existsSync(layoutPath)) return undefined;
  let layout: Layout;
  try {
    layout = JSON.parse(readFileSync(layoutPath, "utf8")) as Layout;
  } catch (e) {
    throw new ImageCacheError(`unreadable unpacked-kernel layout ${layoutPath}: ${(e as Error).message}`, { path: layoutPath }, { cause: e });
  }
  if (layout.version !== LAYOUT_VERSION || layout.source.size !== source.size || layout.source.mtimeMs !== source.mtimeMs || layout.source.path !== source.path) return undefined;
  const imagePath = join(dir, IMAGE_FILE);
  if (!existsSync(imagePath) || statSync(imagePath).size !== layout.imageBytes)
    throw new ImageCacheError(`unpacked kernel ${imagePath} is missing or truncated; delete ${dir}`, { path: imagePath });
  const { version: _v, source: _s, ...rest } = layout;
  return { ...rest, imagePath };
}

/** The cached unpacked kernel for this bzImage, if one exists; never decompresses (cheap: a stat and a small JSON file). */
export function findUnpackedKernel(bzImagePath: string, cacheDir = defaultCacheDir()): UnpackedKernel | undefined {
  const source = sourceIdentity(bzImagePath);
  return readLayout(entryDir(cacheDir, source), source);
}

/** Decompress through a Debian tool (`xz -dc`, `zstd -dc`) fed on standard input. */
function decompressWith(tool: string, args: readonly string[], data: Uint8Array): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { stdio: ["pipe", "pipe", "pipe"] });
    const out: Buffer[] = [];
    let err = "";
    child.stdout.on("data", (b: Buffer) => out.push(b));
    child.stderr.on("data", (b: Buffer) => (err = (err + b.toString()).slice(-500)));
    child.stdin.on("error", () => {});
    child.on("error", (e: NodeJS.ErrnoException) => reject(new Error(e.code === "ENOENT" ? `${tool} is not installed` : `${tool}: ${e.message}`)));
    child.on("close", (status) => (status === 0 ? resolve(Buffer.concat(out)) : reject(new Error(`${tool} failed (exit ${status}): ${err.trim()}`))));
    child.stdin.end(data);
  });
}

async function decompress(compression: KernelCompression, data: Uint8Array): Promise<Uint8Array> {
  switch (compression) {
    case "gzip":
      return gunzipSync(data);
    case "xz":
      return decompressWith("xz", ["-dc", "--single-stream"], data);
    case "zstd":
      return decompressWith("zstd", ["-dc", "-q"], data);
    default:
      throw new Error(`${compression}-compressed kernels are decompressed by the guest`);
  }
}

/**
 * The unpacked kernel for this bzImage: from the cache, or decompressed now
 * (once; `log` says so) and cached. A kernel that cannot be unpacked here gives
 * `{ ok: false, why }`: it still boots, decompressing itself in the guest.
 * Throws only for a cache that cannot be used.
 */
export async function unpackKernel(bzImagePath: string, opts: { cacheDir?: string; log?: (line: string) => void } = {}): Promise<UnpackResult> {
  const cacheDir = opts.cacheDir ?? defaultCacheDir();
  const source = sourceIdentity(bzImagePath);
  const dir = entryDir(cacheDir, source);
  const cached = readLayout(dir, source);
  if (cached !== undefined) return { ok: true, kernel: cached };

  const bz = readFileSync(source.path);
  // Anything the kernel itself gets wrong (no payload description, a format without a tool, a bad ELF) means "boot it compressed".
  let layout: Layout;
  let flat: Uint8Array;
  try {
    const payload = compressedPayload(bz, parseBzImage(bz));
    opts.log?.(`unpacking the ${payload.compression} kernel ${source.path} (once; cached in ${cacheDir})`);
    const elfBytes = await decompress(payload.compression, payload.data);
    if (payload.decompressedSize !== undefined && payload.decompressedSize !== elfBytes.length)
      return { ok: false, why: `decompressed ${elfBytes.length} bytes where the bzImage says ${payload.decompressedSize}` };
    const elf = parseKernelElf(elfBytes);
    const packed = packKernelSegments(elfBytes, elf);
    flat = packed.flat;
    layout = {
      version: LAYOUT_VERSION,
      source,
      imageBytes: flat.length,
      entry: elf.entry,
      loadStart: elf.loadStart,
      loadEnd: elf.loadEnd,
      extents: packed.extents,
      compression: payload.compression,
    };
  } catch (e) {
    return { ok: false, why: (e as Error).message };
  }
  await ensureCacheEntry(dir, async (tmp) => {
    await writeFile(join(tmp, IMAGE_FILE), flat);
    await writeFile(join(tmp, LAYOUT_FILE), JSON.stringify(layout));
  });
  const kernel = readLayout(dir, source);
  if (kernel === undefined) throw new ImageCacheError(`unpacked kernel cache entry ${dir} does not match ${source.path}`, { path: dir });
  return { ok: true, kernel };
}
