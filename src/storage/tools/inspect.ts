/**
 * infoDisk and checkDisk: what a disk and its chain are (Get-VHD), and
 * whether their structures are sound (Test-VHD).
 */
import { DiskError, type DiskFormat } from "../block-device.js";
import type { CheckFinding, DiskDescription } from "../format-driver.js";
import { describeImage, describeImageChain, driverFor, formatOf } from "./formats.js";

/** The disk first, then each parent down to the base. */
export function infoDisk(path: string): DiskDescription[] {
  return describeImageChain(path);
}

export interface LayerCheck {
  readonly path: string;
  readonly format: DiskFormat | undefined;
  readonly findings: readonly CheckFinding[];
}

export interface CheckResult {
  /** No error or warning left in any layer ("repaired" findings are fine). */
  readonly clean: boolean;
  readonly layers: readonly LayerCheck[];
}

/**
 * Check the disk and every parent in its chain. With repair, the driver
 * fixes what is safe in the disk itself; parents are checked, never changed
 * (they may be shared by other children).
 */
export function checkDisk(path: string, options: { repair?: boolean } = {}): CheckResult {
  const format = formatOf(path);
  const layers: LayerCheck[] = [];
  const top = driverFor(format).check(path, { repair: options.repair === true });
  layers.push({ path, format, findings: top });
  if (!top.some((f) => f.severity === "error")) {
    let desc: DiskDescription | undefined;
    try {
      desc = describeImage(path);
    } catch (e) {
      layers[0] = { path, format, findings: [...top, findingFrom(e)] };
    }
    const seen = new Set<string>([path]);
    let parentPath: string | undefined = desc?.parentPath;
    while (parentPath !== undefined) {
      if (seen.has(parentPath)) {
        layers.push({ path: parentPath, format: undefined, findings: [{ severity: "error", message: "differencing chain loops back on itself" }] });
        break;
      }
      seen.add(parentPath);
      const layerPath = parentPath;
      try {
        const pf = formatOf(layerPath);
        const findings = driverFor(pf).check(layerPath, { repair: false });
        layers.push({ path: layerPath, format: pf, findings });
        if (findings.some((f) => f.severity === "error")) break;
        parentPath = describeImage(layerPath).parentPath;
      } catch (e) {
        layers.push({ path: layerPath, format: undefined, findings: [findingFrom(e)] });
        break;
      }
    }
  }
  const clean = layers.every((l) => l.findings.every((f) => f.severity === "repaired"));
  return { clean, layers };
}

function findingFrom(e: unknown): CheckFinding {
  if (e instanceof DiskError) return { severity: "error", message: e.message };
  throw e;
}
