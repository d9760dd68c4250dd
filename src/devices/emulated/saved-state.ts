/**
 * Validation shared by the emulated devices' `restore()`: a saved-state object
 * comes from a file and is never trusted. Each reader throws
 * `DeviceRestoreError` (a `PartisError`) naming the device and the field.
 */
import { PartisError } from "../../errors.js";
import type { Bound, FieldType } from "../../machine/shared-state.js";

/**
 * A device's bound shared state, writable. `structLayout`'s `const` type
 * parameter makes the field map readonly and `Bound` keeps that modifier, so
 * devices name their state through this alias. An `arena.allocate(layout)`
 * result is assignable to it.
 */
export type DeviceState<F extends Record<string, FieldType>> = { -readonly [K in keyof Bound<F>]: Bound<F>[K] };

/** A saved device state that cannot be loaded: wrong kind or version, a field out of range, an impossible combination. */
export class DeviceRestoreError extends PartisError {
  constructor(device: string, message: string, context: Record<string, string | number | boolean | undefined> = {}) {
    super("DEVICE_BAD_SAVED_STATE", `${device}: saved state rejected: ${message}`, { device, ...context });
  }
}

/** Reads fields of an untrusted saved-state object for one device. */
export class SavedStateReader {
  private readonly obj: Record<string, unknown>;

  constructor(private readonly device: string, saved: unknown, kind: string, version: number) {
    if (typeof saved !== "object" || saved === null || Array.isArray(saved))
      throw new DeviceRestoreError(device, "not an object");
    this.obj = saved as Record<string, unknown>;
    if (this.obj["kind"] !== kind) throw new DeviceRestoreError(device, `kind is not "${kind}"`, { kind: String(this.obj["kind"]) });
    if (this.obj["version"] !== version)
      throw new DeviceRestoreError(device, `unsupported version`, { version: String(this.obj["version"]) });
  }

  /** An integer in [min, max]. */
  int(field: string, min: number, max: number): number {
    const v = this.obj[field];
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max)
      throw new DeviceRestoreError(this.device, `field ${field} is not an integer in [${min}, ${max}]`, { field });
    return v;
  }

  bool(field: string): boolean {
    const v = this.obj[field];
    if (typeof v !== "boolean") throw new DeviceRestoreError(this.device, `field ${field} is not a boolean`, { field });
    return v;
  }

  /** A finite number (any sign). */
  number(field: string): number {
    const v = this.obj[field];
    if (typeof v !== "number" || !Number.isFinite(v))
      throw new DeviceRestoreError(this.device, `field ${field} is not a finite number`, { field });
    return v;
  }

  /** An array of bytes whose length is in [minLength, maxLength]. */
  bytes(field: string, minLength: number, maxLength: number): Uint8Array {
    const v = this.obj[field];
    if (!Array.isArray(v) || v.length < minLength || v.length > maxLength)
      throw new DeviceRestoreError(this.device, `field ${field} is not a byte array of length [${minLength}, ${maxLength}]`, { field });
    const out = new Uint8Array(v.length);
    for (let i = 0; i < v.length; i++) {
      const b: unknown = v[i];
      if (typeof b !== "number" || !Number.isInteger(b) || b < 0 || b > 255)
        throw new DeviceRestoreError(this.device, `field ${field}[${i}] is not a byte`, { field, index: i });
      out[i] = b;
    }
    return out;
  }

  fail(message: string): never {
    throw new DeviceRestoreError(this.device, message);
  }
}

/**
 * ISA devices with byte-wide registers: a 2- or 4-byte port access is split
 * into consecutive byte accesses, as the bus splits them on a PC. Bytes past
 * the end of the region read as 0xff and are dropped on write.
 */
export function readBytewise(offset: number, size: number, length: number, readByte: (offset: number) => number): number {
  if (size === 1) return readByte(offset);
  let value = 0;
  for (let i = 0; i < Math.min(size, 4); i++) {
    const b = offset + i < length ? readByte(offset + i) & 0xff : 0xff;
    value |= b << (8 * i);
  }
  return value >>> 0;
}

export function writeBytewise(offset: number, size: number, length: number, value: number, writeByte: (offset: number, value: number) => void): void {
  if (size === 1) return writeByte(offset, value & 0xff);
  for (let i = 0; i < Math.min(size, 4); i++) if (offset + i < length) writeByte(offset + i, (value >>> (8 * i)) & 0xff);
}
