/**
 * Differencing chains, shared by VHD and VHDX: finding a parent file from the
 * locators a child records, checking that the file found is the parent the
 * child was made from, and describing a whole chain (child first).
 *
 * Locator paths may have been written on Windows ("..\base.vhd",
 * "C:\VMs\base.vhd") or here ("./base.vhd", "/srv/vm/base.vhd"); both are
 * understood. Resolution order: relative locators (relative to the child's
 * directory), then absolute ones, then (DEVNOTE) the bare file name of any
 * locator in the child's directory, so that a chain copied from a Windows
 * host as a folder still opens. The identity check (verifyParent) is what
 * makes the last fallback safe.
 */
import * as fs from "node:fs";
import * as nodePath from "node:path";
import { DiskError } from "./block-device.js";
import type { DiskDescription } from "./format-driver.js";
import { describeDisk } from "./open.js";

export type ParentLocatorKind = "relative" | "absolute" | "volume" | "name";

export interface ParentLocator {
  /** "relative" (to the child's directory), "absolute", "volume" (VHDX volume path), "name", or a format's own code. */
  readonly kind: ParentLocatorKind | (string & {});
  readonly path: string;
}

/** Longest chain any open or walk follows (a guard against locator loops). */
export const MAX_CHAIN_DEPTH = 256;

function toPosix(p: string): string {
  return p.replace(/\\/g, "/");
}

function isWindowsAbsolute(p: string): boolean {
  return /^[A-Za-z]:[\\/]/.test(p) || p.startsWith("\\\\") || p.startsWith("//");
}

function isRegularFileOrDevice(p: string): boolean {
  try {
    const st = fs.statSync(p);
    return st.isFile() || st.isBlockDevice();
  } catch {
    return false;
  }
}

/** Candidate files for a parent, in the order they are tried. */
export function parentCandidates(childPath: string, locators: readonly ParentLocator[]): string[] {
  const dir = nodePath.dirname(nodePath.resolve(childPath));
  const out: string[] = [];
  const add = (p: string): void => {
    if (!out.includes(p)) out.push(p);
  };
  for (const l of locators) {
    if (l.kind !== "relative" || l.path === "") continue;
    if (isWindowsAbsolute(l.path) || nodePath.isAbsolute(l.path)) continue;
    add(nodePath.resolve(dir, toPosix(l.path)));
  }
  for (const l of locators) {
    if (l.kind !== "absolute" || l.path === "") continue;
    if (nodePath.isAbsolute(l.path) && !isWindowsAbsolute(l.path)) add(nodePath.normalize(l.path));
  }
  for (const l of locators) {
    if (l.path === "") continue;
    const base = nodePath.posix.basename(toPosix(l.path));
    if (base !== "" && base !== "." && base !== "..") add(nodePath.join(dir, base));
  }
  return out;
}

/**
 * The absolute path of the parent of `childPath`, from its locators.
 * Throws DiskError PARENT_NOT_FOUND listing every path tried.
 */
export function resolveParentPath(childPath: string, locators: readonly ParentLocator[]): string {
  const candidates = parentCandidates(childPath, locators);
  for (const c of candidates) {
    if (nodePath.resolve(c) === nodePath.resolve(childPath)) continue;
    if (isRegularFileOrDevice(c)) return c;
  }
  const recorded = locators.map((l) => `${l.kind}=${l.path}`).join(", ") || "none";
  throw new DiskError(
    "PARENT_NOT_FOUND",
    `parent disk not found (locators: ${recorded}; tried: ${candidates.join(", ") || "nothing"})`,
    childPath,
  );
}

export interface ParentIdentityCheck {
  /** Identity the child recorded for its parent (VHD: parent unique ID; VHDX: parent linkage). */
  readonly expectedId: string;
  /** Identity of the file found (undefined when the file has none: refused). */
  readonly actualId: string | undefined;
  /** Time stamp the child recorded (VHD: seconds since 2000), if any. */
  readonly expectedTimestamp?: number;
  /** Time stamps the parent may legitimately have (its footer time, its file mtime). */
  readonly actualTimestamps?: readonly number[];
}

function normalizeId(id: string): string {
  return id.replace(/[-{}\s]/g, "").toLowerCase();
}

/**
 * Refuse a parent whose identity differs from what the child recorded
 * (DiskError PARENT_MISMATCH naming both files). Returns warnings (time stamp
 * differences), which never refuse.
 */
export function verifyParent(childPath: string, parentPath: string, check: ParentIdentityCheck): string[] {
  if (check.actualId === undefined || normalizeId(check.actualId) !== normalizeId(check.expectedId)) {
    throw new DiskError(
      "PARENT_MISMATCH",
      `parent ${parentPath} has identity ${check.actualId ?? "(none)"} but ${childPath} was made from a parent with identity ${check.expectedId}; ` +
        `refusing to use it (re-point the child with setParent --force only if you know the content is the same)`,
      childPath,
      { parentPath, expectedId: check.expectedId, actualId: check.actualId },
    );
  }
  const warnings: string[] = [];
  if (check.expectedTimestamp !== undefined && check.actualTimestamps !== undefined && check.actualTimestamps.length > 0) {
    if (!check.actualTimestamps.includes(check.expectedTimestamp)) {
      warnings.push(
        `${childPath}: parent ${parentPath} time stamp differs from the one recorded (recorded ${check.expectedTimestamp}, ` +
          `found ${check.actualTimestamps.join("/")}); the parent may have been modified since the child was created`,
      );
    }
  }
  return warnings;
}

/** Descriptions of a disk and all its ancestors, child first. */
export function describeChain(path: string): DiskDescription[] {
  const out: DiskDescription[] = [];
  const seen = new Set<string>();
  let current: string | undefined = nodePath.resolve(path);
  while (current !== undefined) {
    if (seen.has(current) || out.length >= MAX_CHAIN_DEPTH) {
      throw new DiskError("CHAIN_LOOP", `differencing chain loops back to ${current} or is deeper than ${MAX_CHAIN_DEPTH}`, path);
    }
    seen.add(current);
    const d = describeDisk(current);
    out.push(d);
    if (d.type !== "differencing") break;
    if (d.parentPath === undefined) {
      throw new DiskError("PARENT_NOT_FOUND", `parent of ${current} not found`, current);
    }
    current = nodePath.resolve(d.parentPath);
  }
  return out;
}
