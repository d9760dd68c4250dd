/**
 * VHDX parent locators (MS-VHDX 2.6.2.6.3) on a Linux host: translating the
 * recorded Windows-style paths into candidates for src/storage/chain.ts, and
 * building the locator a new differencing disk records.
 *
 * DEVNOTE: absolute_win32_path written here is "\\?\" followed by the Linux
 * absolute path with "\" separators and no leading separator
 * ("\\?\srv\vm\base.vhdx" for /srv/vm/base.vhdx). Reading, "\\?\X:\a\b"
 * (drive letter) and "\\?\Volume{…}\a\b" both become "/a/b" to try, and the
 * chain resolver's bare-name fallback covers a folder copied from Windows;
 * the linkage check (parent DataWriteGuid) keeps a wrong match from opening.
 */
import * as nodePath from "node:path";
import type { ParentLocator as ChainLocator } from "../chain.js";
import { guidToString, type Guid } from "./guid.js";
import { locatorValue, VHDX_PARENT_LOCATOR_TYPE, type ParentLocator } from "./metadata.js";

function win32ToPosix(value: string): string | undefined {
  let p = value;
  if (p.startsWith("\\\\?\\")) p = p.slice(4);
  if (/^UNC\\/i.test(p) || p.startsWith("\\\\")) return undefined;
  const vol = /^Volume\{[0-9a-fA-F-]+\}(\\.*)$/i.exec(p);
  if (vol) p = vol[1]!;
  const drive = /^[A-Za-z]:(\\.*)$/.exec(p);
  if (drive) p = drive[1]!;
  p = p.replace(/\\/g, "/");
  if (!p.startsWith("/")) p = "/" + p;
  return nodePath.posix.normalize(p);
}

/** Locators in the order to try: relative_path, absolute_win32_path, volume_path. */
export function chainLocators(loc: ParentLocator | undefined): ChainLocator[] {
  const out: ChainLocator[] = [];
  const rel = locatorValue(loc, "relative_path");
  if (rel) out.push({ kind: "relative", path: rel.replace(/^\.\\/, "") });
  for (const key of ["absolute_win32_path", "volume_path"]) {
    const v = locatorValue(loc, key);
    const p = v === undefined ? undefined : win32ToPosix(v);
    if (p) out.push({ kind: "absolute", path: p });
  }
  return out;
}

/** Every path entry, as recorded (for describe()). */
export function recordedLocators(loc: ParentLocator | undefined): { kind: string; path: string }[] {
  return (loc?.entries ?? []).filter(([k]) => k.endsWith("path")).map(([kind, path]) => ({ kind, path }));
}

export function linkageString(g: Guid): string {
  return `{${guidToString(g)}}`;
}

/** The locator a child at childPath records for parentPath. */
export function buildParentLocator(childPath: string, parentPath: string, linkage: string): ParentLocator {
  const childDir = nodePath.dirname(nodePath.resolve(childPath));
  const absParent = nodePath.resolve(parentPath);
  const rel = nodePath.relative(childDir, absParent).split(nodePath.sep).join("\\");
  const entries: [string, string][] = [
    ["parent_linkage", linkage],
    ["relative_path", rel.startsWith("..") ? rel : `.\\${rel}`],
    ["absolute_win32_path", "\\\\?\\" + absParent.slice(1).split("/").join("\\")],
  ];
  return { type: VHDX_PARENT_LOCATOR_TYPE, entries };
}
