/**
 * VHD (Virtual PC / Hyper-V "Virtual Hard Disk", spec v1.0): fixed, dynamic
 * and differencing disks up to 2040 GiB.
 */
export { vhdDriver } from "./driver.js";
export { VhdDisk, type VhdOpenOptions } from "./disk.js";
export { MAX_VHD_SIZE, CREATOR_APP, chsGeometry } from "./spec.js";
