/**
 * Pass-through host block devices (/dev/sdX, /dev/nvme0n1p2, /dev/loopN,
 * /dev/mapper/...) as a BlockDevice of type "passthrough".
 *
 * fstat reports size 0 for block devices, and BLKGETSIZE64 needs an ioctl
 * (FFI), so the size and sector sizes come from sysfs:
 * /sys/class/block/<name>/size (always in 512-byte units),
 * queue/logical_block_size and queue/physical_block_size (a partition has no
 * queue/ of its own: its parent disk's is used), and ro.
 *
 * O_DIRECT is used when asked (aligned to the logical block size), with the
 * fallbacks of raw.ts. A regular file given here is handled the same way,
 * with its size from fstat (useful for tests and for image files that should
 * be treated as opaque devices).
 */
import * as fs from "node:fs";
import * as nodePath from "node:path";
import { DiskError, type OpenOptions } from "./block-device.js";
import type { DiskDescription } from "./format-driver.js";
import { openFileForDisk, RawDisk } from "./raw.js";

export interface HostBlockDeviceInfo {
  /** Kernel name (loop0, sda1, dm-3). */
  readonly name: string;
  readonly size: number;
  readonly logicalSectorSize: number;
  readonly physicalSectorSize: number;
  readonly readOnly: boolean;
}

function readSysNumber(file: string): number | undefined {
  try {
    const n = Number(fs.readFileSync(file, "utf8").trim());
    return Number.isSafeInteger(n) ? n : undefined;
  } catch {
    return undefined;
  }
}

/** Size and sector sizes of a host block device, from sysfs. */
export function hostBlockDeviceInfo(path: string): HostBlockDeviceInfo {
  const real = fs.realpathSync(path);
  const name = nodePath.basename(real);
  let sysDir: string;
  try {
    sysDir = fs.realpathSync(`/sys/class/block/${name}`);
  } catch {
    throw new DiskError("PASSTHROUGH_NO_SYSFS", `no /sys/class/block/${name} for this block device`, path);
  }
  const sectors = readSysNumber(`${sysDir}/size`);
  if (sectors === undefined) throw new DiskError("PASSTHROUGH_NO_SYSFS", `cannot read ${sysDir}/size`, path);
  // A partition's directory sits inside its disk's, which holds queue/.
  const queue = fs.existsSync(`${sysDir}/queue`) ? `${sysDir}/queue` : `${nodePath.dirname(sysDir)}/queue`;
  const logical = readSysNumber(`${queue}/logical_block_size`) ?? 512;
  const physical = readSysNumber(`${queue}/physical_block_size`) ?? logical;
  const ro = readSysNumber(`${sysDir}/ro`) === 1;
  return { name, size: sectors * 512, logicalSectorSize: logical, physicalSectorSize: Math.max(physical, logical), readOnly: ro };
}

export function isHostBlockDevice(path: string): boolean {
  try {
    return fs.statSync(path).isBlockDevice();
  } catch {
    return false;
  }
}

export function openPassthrough(path: string, options: OpenOptions = {}): RawDisk {
  const block = isHostBlockDevice(path);
  const info = block ? hostBlockDeviceInfo(path) : undefined;
  const readOnly = options.readOnly === true || info?.readOnly === true;
  const logical = info?.logicalSectorSize ?? 512;
  const { fd, direct, reopenBuffered, notes } = openFileForDisk(path, readOnly, options.direct === true, logical, options.writeThrough === true);
  if (info?.readOnly === true && options.readOnly !== true) notes.push("the host marks this device read-only; opened read-only");
  let size: number;
  if (info !== undefined) {
    size = info.size;
  } else {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) {
      fs.closeSync(fd);
      throw new DiskError("PASSTHROUGH_NOT_A_DEVICE", "neither a block device nor a regular file", path);
    }
    size = Math.floor(st.size / logical) * logical;
  }
  return new RawDisk({
    path,
    fd,
    size,
    type: "passthrough",
    readOnly,
    logicalSectorSize: logical,
    physicalSectorSize: info?.physicalSectorSize ?? 4096,
    direct,
    reopenBuffered,
    notes,
    ignoreFlush: options.ignoreFlush === true,
  });
}

export function describePassthrough(path: string): DiskDescription {
  const info = isHostBlockDevice(path) ? hostBlockDeviceInfo(path) : undefined;
  const size = info?.size ?? fs.statSync(path).size;
  return {
    path,
    format: "raw",
    type: "passthrough",
    virtualSize: size,
    fileSize: size,
    logicalSectorSize: info?.logicalSectorSize ?? 512,
    physicalSectorSize: info?.physicalSectorSize ?? 4096,
    allocatedBytes: size,
  };
}
