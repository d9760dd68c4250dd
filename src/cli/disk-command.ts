/**
 * `partis disk`: virtual disk administration with PowerShell Hyper-V verb
 * parity (New-VHD, Get-VHD, Test-VHD, Convert-VHD, Merge-VHD, Resize-VHD,
 * Optimize-VHD, Set-VHD -ParentPath).
 *
 * Every failure prints one line, `partis disk <verb>: <message>`, never a
 * stack trace. Exit status: 0 success; 1 `check` found problems (or an
 * unexpected failure); 2 bad input (missing file, wrong format, bad size,
 * bad flags); 130 cancelled by Ctrl-C (nothing changed).
 */
import { existsSync } from "node:fs";
import { extname } from "node:path";
import type { Command } from "commander";
import { PartisError, UsageError } from "../errors.js";
import { DiskError, type DiskFormat } from "../storage/block-device.js";
import type { DiskDescription } from "../storage/format-driver.js";
import {
  checkDisk,
  compactDisk,
  convertDisk,
  infoDisk,
  mergeDisk,
  resizeDisk,
  setParentDisk,
  DiskOperationCancelled,
  type DiskOperationOptions,
} from "../storage/tools/index.js";
import { createImage, describeImage, requireImage } from "../storage/tools/formats.js";

const UNITS: Record<string, number> = { "": 1, B: 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

/** "10G", "512M", "1.5G", "2T", "64MiB", "1048576" (bytes): binary units. */
export function parseDiskSize(text: string, what = "size"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B)?\s*$/i.exec(text);
  if (m === null) throw new UsageError(`${what} "${text}" is not a size (examples: 512M, 10G, 1.5G, 2T)`);
  const value = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(Math.round(value))) throw new UsageError(`${what} "${text}" is too large`);
  if (!Number.isInteger(value)) throw new UsageError(`${what} "${text}" is not a whole number of bytes`);
  if (value <= 0) throw new UsageError(`${what} "${text}" must be greater than zero`);
  return value;
}

export function formatDiskSize(bytes: number): string {
  for (const [u, n] of [["PiB", 2 ** 50], ["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]] as const) {
    if (bytes >= n) {
      const v = bytes / n;
      return `${Number.isInteger(v) ? v : v.toFixed(2)} ${u}`;
    }
  }
  return `${bytes} B`;
}

function formatFromPath(path: string, given: string | undefined): DiskFormat {
  if (given !== undefined) {
    if (given === "vhd" || given === "vhdx" || given === "raw") return given;
    throw new UsageError(`--format must be vhd, vhdx or raw, not "${given}"`);
  }
  const ext = extname(path).toLowerCase();
  if (ext === ".vhd") return "vhd";
  if (ext === ".vhdx") return "vhdx";
  return "raw";
}

function fixedOrDynamic(given: string | undefined, fallback: "fixed" | "dynamic"): "fixed" | "dynamic" {
  if (given === undefined) return fallback;
  if (given === "fixed" || given === "dynamic") return given;
  throw new UsageError(`--type must be fixed or dynamic, not "${given}"`);
}

function sectorSize(given: string | undefined, what: string): 512 | 4096 | undefined {
  if (given === undefined) return undefined;
  if (given === "512") return 512;
  if (given === "4096" || given.toUpperCase() === "4K") return 4096;
  throw new UsageError(`${what} must be 512 or 4096, not "${given}"`);
}

/** Exit status for an error: 2 for bad input, 1 otherwise. */
function exitStatusFor(e: unknown): number {
  if (e instanceof UsageError || e instanceof DiskError) return 2;
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code === "ENOENT" || code === "EEXIST" || code === "EISDIR" || code === "ENOTDIR" || code === "EACCES" || code === "EPERM") return 2;
  if (e instanceof PartisError) return 2;
  return 1;
}

function oneLine(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  return msg.split("\n")[0]!.trim() || "failed";
}

/** A progress bar on stderr when it is a terminal; silence otherwise. */
function progressReporter(): { progress?: (done: number, total: number) => void; finish: () => void } {
  if (process.stderr.isTTY !== true) return { finish: () => {} };
  let lastDraw = 0;
  let drawn = false;
  return {
    progress: (done, total) => {
      const now = Date.now();
      if (now - lastDraw < 100 && done < total) return;
      lastDraw = now;
      drawn = true;
      const frac = total > 0 ? Math.min(1, done / total) : 1;
      const width = 30;
      const fill = Math.round(frac * width);
      process.stderr.write(`\r[${"#".repeat(fill)}${" ".repeat(width - fill)}] ${(frac * 100).toFixed(0).padStart(3)}% ${formatDiskSize(done)} / ${formatDiskSize(total)}   `);
    },
    finish: () => {
      if (drawn) process.stderr.write("\n");
    },
  };
}

/**
 * Run a verb's action: one line on failure, exit statuses as documented,
 * Ctrl-C turned into a clean cancel for long operations.
 */
async function runVerb(verb: string, action: (op: DiskOperationOptions) => Promise<number | void> | number | void): Promise<void> {
  // Only the long, chunked verbs can honour a cancel; the others keep the default Ctrl-C.
  const cancellable = verb === "convert" || verb === "merge" || verb === "compact";
  const controller = new AbortController();
  const onInterrupt = (): void => controller.abort();
  if (cancellable) {
    process.on("SIGINT", onInterrupt);
    process.on("SIGTERM", onInterrupt);
  }
  const bar = cancellable ? progressReporter() : { finish: () => {} };
  try {
    const status = await action({ signal: controller.signal, ...(bar.progress ? { progress: bar.progress } : {}) });
    bar.finish();
    process.exitCode = typeof status === "number" ? status : 0;
  } catch (e) {
    bar.finish();
    if (e instanceof DiskOperationCancelled) {
      process.stderr.write(`partis disk ${verb}: cancelled, nothing changed\n`);
      process.exitCode = 130;
    } else {
      process.stderr.write(`partis disk ${verb}: ${oneLine(e)}\n`);
      process.exitCode = exitStatusFor(e);
    }
  } finally {
    process.off("SIGINT", onInterrupt);
    process.off("SIGTERM", onInterrupt);
  }
}

/** Commander's own parse errors (unknown option, missing argument) in our one-line form, exit 2. */
function oneLineErrors(cmd: Command, verb: string): Command {
  return cmd
    .configureOutput({
      outputError: (str, write) => write(`partis disk ${verb}: ${str.replace(/^error:\s*/i, "").split("\n")[0]}\n`),
    })
    .exitOverride((err) => {
      process.exit(err.exitCode === 0 ? 0 : 2);
    });
}

function describeLines(d: DiskDescription): string[] {
  const lines: [string, string][] = [
    ["path", d.path],
    ["format", d.format],
    ["type", d.type],
    ["virtual size", `${formatDiskSize(d.virtualSize)} (${d.virtualSize} bytes)`],
    ["file size", `${formatDiskSize(d.fileSize)} (${d.fileSize} bytes)`],
    ["allocated", `${formatDiskSize(d.allocatedBytes)} (${d.virtualSize > 0 ? ((100 * d.allocatedBytes) / d.virtualSize).toFixed(1) : "0"}%)`],
  ];
  if (d.blockSize !== undefined) lines.push(["block size", formatDiskSize(d.blockSize)]);
  lines.push(["sector size", `${d.logicalSectorSize} logical, ${d.physicalSectorSize} physical`]);
  if (d.uniqueId !== undefined) lines.push(["unique id", d.uniqueId]);
  if (d.parentId !== undefined) lines.push(["parent id", d.parentId]);
  if (d.parentPath !== undefined) lines.push(["parent", d.parentPath]);
  for (const l of d.parentLocators ?? []) lines.push([`locator ${l.kind}`, l.path]);
  if (d.logReplayNeeded === true) lines.push(["log", "replay needed (will be replayed on next open for write)"]);
  return lines.map(([k, v]) => `${(k + ":").padEnd(16)}${v}`);
}

/** Add `partis disk` and its verbs to the program. */
export function registerDiskCommands(program: Command): Command {
  const disk = oneLineErrors(program.command("disk").description("create, inspect, check, convert, merge, resize and compact virtual disks (raw, VHD, VHDX)"), "");
  disk.configureOutput({ outputError: (str, write) => write(`partis disk: ${str.replace(/^error:\s*/i, "").split("\n")[0]}\n`) });

  oneLineErrors(disk.command("new"), "new")
    .description("create a disk (New-VHD)")
    .argument("<path>", "file to create")
    .requiredOption("--type <type>", "fixed | dynamic | differencing")
    .option("--size <size>", "virtual size: 10G, 512M, 1.5G, 2T (differencing: defaults to the parent's)")
    .option("--block-size <size>", "block size (VHD default 2M, VHDX 32M)")
    .option("--parent <path>", "parent image (differencing)")
    .option("--format <format>", "vhd | vhdx | raw (default from the extension)")
    .option("--logical-sector-size <bytes>", "512 | 4096")
    .option("--physical-sector-size <bytes>", "512 | 4096")
    .action((path: string, o: { type: string; size?: string; blockSize?: string; parent?: string; format?: string; logicalSectorSize?: string; physicalSectorSize?: string }) =>
      runVerb("new", () => {
        const format = formatFromPath(path, o.format);
        if (o.type !== "fixed" && o.type !== "dynamic" && o.type !== "differencing") throw new UsageError(`--type must be fixed, dynamic or differencing, not "${o.type}"`);
        if (existsSync(path)) throw new UsageError(`${path} already exists`);
        if (o.type === "differencing") {
          if (o.parent === undefined) throw new UsageError("a differencing disk needs --parent");
          if (format === "raw") throw new UsageError("raw disks cannot be differencing; use vhd or vhdx");
          requireImage(o.parent);
        } else {
          if (o.parent !== undefined) throw new UsageError("--parent is only for --type differencing");
          if (o.size === undefined) throw new UsageError("--size is required");
        }
        const lss = sectorSize(o.logicalSectorSize, "--logical-sector-size");
        const pss = sectorSize(o.physicalSectorSize, "--physical-sector-size");
        createImage(path, format, {
          type: o.type,
          ...(o.size !== undefined ? { size: parseDiskSize(o.size, "--size") } : {}),
          ...(o.blockSize !== undefined ? { blockSize: parseDiskSize(o.blockSize, "--block-size") } : {}),
          ...(o.parent !== undefined ? { parentPath: o.parent } : {}),
          ...(lss !== undefined ? { logicalSectorSize: lss } : {}),
          ...(pss !== undefined ? { physicalSectorSize: pss } : {}),
        });
        const d = describeImage(path);
        process.stdout.write(`created ${path}: ${d.format} ${d.type}, ${formatDiskSize(d.virtualSize)}\n`);
      }),
    );

  oneLineErrors(disk.command("info"), "info")
    .description("describe a disk and its chain (Get-VHD)")
    .argument("<path>")
    .option("--json", "machine-readable output")
    .action((path: string, o: { json?: boolean }) =>
      runVerb("info", () => {
        const chain = infoDisk(path);
        if (o.json === true) {
          process.stdout.write(JSON.stringify({ ...chain[0], chain }, null, 2) + "\n");
          return;
        }
        const out = describeLines(chain[0]!);
        if (chain.length > 1) out.push(`${"chain:".padEnd(16)}${chain.map((c) => `${c.path} (${c.format} ${c.type})`).join("\n" + " ".repeat(13) + "-> ")}`);
        process.stdout.write(out.join("\n") + "\n");
      }),
    );

  oneLineErrors(disk.command("check"), "check")
    .description("check a disk and its chain (Test-VHD); exit 0 clean, 1 findings, 2 bad input")
    .argument("<path>")
    .option("--repair", "fix what is safe to fix in this disk (never its parents)")
    .option("--json", "machine-readable output")
    .action((path: string, o: { repair?: boolean; json?: boolean }) =>
      runVerb("check", () => {
        const result = checkDisk(path, { repair: o.repair === true });
        if (o.json === true) process.stdout.write(JSON.stringify(result, null, 2) + "\n");
        else {
          for (const layer of result.layers) {
            if (layer.findings.length === 0) process.stdout.write(`${layer.path}: no problems found\n`);
            for (const f of layer.findings)
              process.stdout.write(`${layer.path}: ${f.severity}${f.offset !== undefined ? ` at 0x${f.offset.toString(16)}` : ""}: ${f.message}\n`);
          }
        }
        return result.clean ? 0 : 1;
      }),
    );

  oneLineErrors(disk.command("convert"), "convert")
    .description("copy a disk (flattening its chain) into a new image (Convert-VHD)")
    .argument("<src>")
    .argument("<dst>")
    .option("--format <format>", "vhd | vhdx | raw (default from the extension)")
    .option("--type <type>", "fixed | dynamic (default: fixed if the source is fixed, else dynamic)")
    .option("--block-size <size>", "block size of the new image")
    .action((src: string, dst: string, o: { format?: string; type?: string; blockSize?: string }) =>
      runVerb("convert", async (op) => {
        const format = formatFromPath(dst, o.format);
        const srcDesc = describeImage(src);
        const type = fixedOrDynamic(o.type, srcDesc.type === "fixed" ? "fixed" : "dynamic");
        if (existsSync(dst)) throw new UsageError(`${dst} already exists`);
        const r = await convertDisk(src, dst, { ...op, format, type, ...(o.blockSize !== undefined ? { blockSize: parseDiskSize(o.blockSize, "--block-size") } : {}) });
        process.stdout.write(`converted ${src} -> ${dst}: ${format} ${type}, ${formatDiskSize(r.virtualSize)}, file ${formatDiskSize(r.fileSize)}\n`);
      }),
    );

  oneLineErrors(disk.command("merge"), "merge")
    .description("merge a differencing disk into its parent, or flatten its chain into a new disk (Merge-VHD)")
    .argument("<child>")
    .option("--into-new <path>", "write the flattened chain to a new image instead of the parent")
    .option("--format <format>", "format of --into-new (default from its extension)")
    .option("--type <type>", "fixed | dynamic for --into-new (default dynamic)")
    .action((child: string, o: { intoNew?: string; format?: string; type?: string }) =>
      runVerb("merge", async (op) => {
        if (o.intoNew === undefined && (o.format !== undefined || o.type !== undefined)) throw new UsageError("--format and --type go with --into-new");
        if (o.intoNew !== undefined && existsSync(o.intoNew)) throw new UsageError(`${o.intoNew} already exists`);
        const r = await mergeDisk(
          child,
          o.intoNew === undefined ? { into: "parent" } : { into: "new", path: o.intoNew, format: formatFromPath(o.intoNew, o.format), type: fixedOrDynamic(o.type, "dynamic") },
          op,
        );
        process.stdout.write(`merged ${child} into ${r.path} (${formatDiskSize(r.mergedBytes)})${r.childRemoved ? `; removed ${child}` : ""}\n`);
      }),
    );

  oneLineErrors(disk.command("resize"), "resize")
    .description("grow, or shrink when the tail is unallocated (Resize-VHD)")
    .argument("<path>")
    .requiredOption("--size <size>", "new virtual size")
    .action((path: string, o: { size: string }) =>
      runVerb("resize", () => {
        const size = parseDiskSize(o.size, "--size");
        const r = resizeDisk(path, size);
        process.stdout.write(`resized ${path}: ${formatDiskSize(r.oldSize)} -> ${formatDiskSize(r.newSize)}\n`);
      }),
    );

  oneLineErrors(disk.command("compact"), "compact")
    .description("drop all-zero blocks (dynamic) or blocks equal to the parent (differencing) (Optimize-VHD)")
    .argument("<path>")
    .action((path: string) =>
      runVerb("compact", async (op) => {
        const r = await compactDisk(path, op);
        process.stdout.write(`compacted ${path}: reclaimed ${formatDiskSize(r.reclaimedBytes)} (${r.blocksDropped} of ${r.blocksBefore} blocks dropped), file ${formatDiskSize(r.fileSizeAfter)}\n`);
      }),
    );

  oneLineErrors(disk.command("set-parent"), "set-parent")
    .description("point a differencing disk at a (moved) parent (Set-VHD -ParentPath)")
    .argument("<path>")
    .requiredOption("--parent <path>", "the new parent path")
    .option("--force", "skip the parent identity check")
    .action((path: string, o: { parent: string; force?: boolean }) =>
      runVerb("set-parent", () => {
        setParentDisk(path, o.parent, { force: o.force === true });
        process.stdout.write(`${path}: parent is now ${o.parent}\n`);
      }),
    );

  return disk;
}
