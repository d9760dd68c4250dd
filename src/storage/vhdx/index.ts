/**
 * Placeholder until the VHDX driver lands: probes nothing, refuses the rest.
 * (Created by the VHD/raw side so that src/storage/open.ts compiles; the VHDX
 * implementation replaces this file.)
 */
import { DiskError } from "../block-device.js";
import type { DiskFormatDriver } from "../format-driver.js";

function unavailable(path: string): never {
  throw new DiskError("VHDX_UNAVAILABLE", "VHDX support is not built yet", path);
}

export const vhdxDriver: DiskFormatDriver = {
  format: "vhdx",
  maxSize: 64 * 1024 ** 4,
  probe: () => false,
  open: (path) => unavailable(path),
  create: (path) => unavailable(path),
  describe: (path) => unavailable(path),
  check: (path) => unavailable(path),
  resize: (path) => unavailable(path),
  setParent: (path) => unavailable(path),
};
