/**
 * Structural check of a VHDX file: file identifier, both headers, log state,
 * both region table copies, metadata and every BAT entry (state valid, inside
 * the file, clear of the header section, log and regions, no overlaps).
 *
 * With repair: an unusable log (LogGuid set, no valid sequence) is cleared;
 * a pending log is replayed; a corrupt or stale header copy is rewritten by
 * two header updates; a corrupt region table copy is rewritten from the
 * good one through the log. BAT and metadata damage is reported, not
 * "repaired" (that would mean guessing at data).
 */
import { DiskError } from "../block-device.js";
import type { CheckFinding } from "../format-driver.js";
import { guidIsZero, newGuid, ZERO_GUID } from "./guid.js";
import { decodeHeader, encodeHeader, HEADER_OFFSETS, HEADER_SIZE, isFileIdentifier, type VhdxHeader } from "./header.js";
import { HostFile, MiB } from "./host-file.js";
import { VhdxImage } from "./image.js";
import { LOG_SECTOR, readPendingLog } from "./log.js";
import { decodeRegionTable, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE } from "./region-table.js";
import { VhdxDisk } from "./vhdx-disk.js";

/**
 * Stale: the non-current copy would locate a different log if it became
 * current. (Differing GUIDs alone are normal after a single header update.)
 */
function sameLogPlacement(a: VhdxHeader, b: VhdxHeader): boolean {
  return a.logOffset === b.logOffset && a.logLength === b.logLength && a.logVersion === b.logVersion;
}

export function checkVhdx(path: string, options: { repair?: boolean } = {}): CheckFinding[] {
  const repair = options.repair === true;
  const findings: CheckFinding[] = [];
  const fixable: { finding: CheckFinding; kind: "header" | "log" | "badlog" | "region"; slot?: number }[] = [];
  const file = HostFile.open(path, true);
  let current: VhdxHeader | undefined;
  let goodRegion = -1;
  try {
    const size = file.statSize();
    if (size < MiB || !isFileIdentifier(file.readBuffer(0, 8))) {
      return [{ severity: "error", offset: 0, message: size < MiB ? `file is ${size} bytes, smaller than the 1 MiB VHDX header section` : "not a VHDX file (no \"vhdxfile\" identifier)" }];
    }
    const h = HEADER_OFFSETS.map((o) => decodeHeader(file.readBuffer(o, HEADER_SIZE)));
    const valid = h.map((x) => typeof x !== "string");
    if (!valid[0] && !valid[1]) return [{ severity: "error", offset: HEADER_OFFSETS[0], message: `no valid header: header 1 has ${h[0] as string}; header 2 has ${h[1] as string}` }];
    const cur = !valid[0] ? 1 : !valid[1] ? 0 : (h[1] as VhdxHeader).sequenceNumber > (h[0] as VhdxHeader).sequenceNumber ? 1 : 0;
    current = h[cur] as VhdxHeader;
    const other = h[1 - cur]!;
    if (typeof other === "string") {
      fixable.push({ kind: "header", finding: { severity: "error", offset: HEADER_OFFSETS[1 - cur], message: `header ${2 - cur} (non-current) is invalid: ${other}` } });
    } else if (!sameLogPlacement(current, other)) {
      fixable.push({ kind: "header", finding: { severity: "warning", offset: HEADER_OFFSETS[1 - cur], message: `header ${2 - cur} (non-current) is stale: it places the log differently` } });
    }
    if (!guidIsZero(current.logGuid)) {
      try {
        const active = readPendingLog(path, file, current);
        if (active === undefined) fixable.push({ kind: "badlog", finding: { severity: "warning", offset: current.logOffset, message: "the header names a log (LogGuid set) that no entry was written to: nothing to replay" } });
        else fixable.push({ kind: "log", finding: { severity: "error", offset: current.logOffset, message: `the log needs replay (${active.entries.length} entr${active.entries.length === 1 ? "y" : "ies"}, sequence ${active.head.sequence})` } });
      } catch (e) {
        if (!(e instanceof DiskError)) throw e;
        fixable.push({ kind: "badlog", finding: { severity: "error", offset: current.logOffset, message: e.message.replace(`${path}: `, "") } });
      }
    }
    const tables = REGION_TABLE_OFFSETS.map((o, i) => {
      try {
        decodeRegionTable(path, file.readBuffer(o, REGION_TABLE_SIZE), `region table ${i + 1}`);
        return undefined;
      } catch (e) {
        if (!(e instanceof DiskError)) throw e;
        return e.message.replace(`${path}: `, "");
      }
    });
    goodRegion = tables[0] === undefined ? 0 : tables[1] === undefined ? 1 : -1;
    tables.forEach((t, i) => {
      if (t === undefined) return;
      const f: CheckFinding = { severity: "error", offset: REGION_TABLE_OFFSETS[i], message: t };
      if (goodRegion >= 0) fixable.push({ kind: "region", slot: i, finding: f });
      else findings.push(f);
    });
  } finally {
    file.close();
  }
  if (goodRegion < 0) return [...findings, ...fixable.map((f) => f.finding)];

  if (repair && fixable.length > 0) {
    try {
      repairFile(path, current!, fixable);
      for (const f of fixable) findings.push({ ...f.finding, severity: "repaired" });
    } catch (e) {
      if (!(e instanceof DiskError)) throw e;
      for (const f of fixable) findings.push(f.finding);
      findings.push({ severity: "error", message: `repair failed: ${e.message}` });
    }
  } else findings.push(...fixable.map((f) => f.finding));

  // Metadata and BAT (read-only; a pending log is applied in memory).
  try {
    const img = VhdxImage.open(path, true, true);
    try {
      for (const p of img.batIssues) findings.push({ severity: "error", offset: img.regions.bat.fileOffset + p.index * 8, message: p.message });
    } finally {
      img.close();
    }
  } catch (e) {
    if (!(e instanceof DiskError)) throw e;
    findings.push({ severity: "error", message: e.message.replace(`${path}: `, "") });
  }
  return findings;
}

function repairFile(path: string, current: VhdxHeader, fixable: readonly { kind: string; slot?: number }[]): void {
  if (fixable.some((f) => f.kind === "badlog")) {
    // No valid sequence to replay: forget the log (header update, both copies).
    const file = HostFile.open(path, false);
    try {
      const next = { ...current, fileWriteGuid: newGuid(), logGuid: ZERO_GUID };
      const slot = HEADER_OFFSETS.findIndex((o) => { const x = decodeHeader(file.readBuffer(o, HEADER_SIZE)); return typeof x !== "string" && x.sequenceNumber === current.sequenceNumber; });
      file.write(HEADER_OFFSETS[1 - slot]!, encodeHeader({ ...next, sequenceNumber: current.sequenceNumber + 1n }));
      file.sync();
      file.write(HEADER_OFFSETS[slot]!, encodeHeader({ ...next, sequenceNumber: current.sequenceNumber + 2n }));
      file.sync();
    } finally {
      file.close();
    }
  }
  // Opening read-write replays a pending log (header update, replay, LogGuid cleared).
  const disk = VhdxDisk.open(path, { noParent: true, lenient: true });
  try {
    disk.beginChange(false);
    // Both header copies now carry the same fields (beginChange writes both); make sure of it.
    disk.image.updateHeader({});
    const img = disk.image;
    for (const f of fixable) {
      if (f.kind !== "region" || f.slot === undefined) continue;
      const good = img.file.readBuffer(REGION_TABLE_OFFSETS[1 - f.slot]!, REGION_TABLE_SIZE);
      const updates = [];
      for (let o = 0; o < REGION_TABLE_SIZE; o += LOG_SECTOR) updates.push({ offset: REGION_TABLE_OFFSETS[f.slot]! + o, data: Buffer.from(good.subarray(o, o + LOG_SECTOR)) });
      disk.logAndApply(updates);
    }
  } finally {
    disk.close();
  }
}
