/**
 * resizeDisk and setParentDisk (Resize-VHD, Set-VHD -ParentPath): thin,
 * checked delegations to the format drivers, which own the on-disk change.
 */
import { DiskError } from "../block-device.js";
import { describeImage, driverFor, requireImage } from "./formats.js";

export interface ResizeResult {
  readonly path: string;
  readonly oldSize: number;
  readonly newSize: number;
}

/** Grow, or shrink when the tail is unallocated (the driver refuses otherwise). */
export function resizeDisk(path: string, newSize: number): ResizeResult {
  const desc = describeImage(path);
  const driver = driverFor(desc.format);
  if (!Number.isSafeInteger(newSize) || newSize <= 0) throw new DiskError("DISK_BAD_SIZE", `invalid size ${newSize}`, path);
  if (newSize > driver.maxSize) throw new DiskError("DISK_BAD_SIZE", `${newSize} bytes is larger than ${desc.format} allows (${driver.maxSize})`, path);
  if (newSize % desc.logicalSectorSize !== 0)
    throw new DiskError("DISK_BAD_SIZE", `size must be a multiple of the ${desc.logicalSectorSize}-byte sector`, path);
  if (newSize !== desc.virtualSize) driver.resize(path, newSize);
  return { path, oldSize: desc.virtualSize, newSize: describeImage(path).virtualSize };
}

/** Point a differencing disk at a new parent; its identity must match unless force. */
export function setParentDisk(path: string, parentPath: string, options: { force?: boolean } = {}): void {
  const desc = describeImage(path);
  requireImage(parentPath);
  if (desc.type !== "differencing") throw new DiskError("DISK_NOT_DIFFERENCING", `only a differencing disk has a parent, this is ${desc.type}`, path);
  driverFor(desc.format).setParent(path, parentPath, { force: options.force === true });
}
