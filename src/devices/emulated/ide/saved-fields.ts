/**
 * Reads nested plain-data saved state of the IDE model (channels, devices,
 * bus-master engines) from an untrusted object, field by field; any field out
 * of range throws `DeviceRestoreError` naming the device and the field path.
 */
import { DeviceRestoreError } from "../saved-state.js";

export class FieldReader {
  private readonly obj: Record<string, unknown>;

  constructor(
    readonly device: string,
    readonly path: string,
    value: unknown,
  ) {
    if (typeof value !== "object" || value === null || Array.isArray(value)) throw new DeviceRestoreError(device, `${path} is not an object`);
    this.obj = value as Record<string, unknown>;
  }

  private name(field: string): string {
    return this.path === "" ? field : `${this.path}.${field}`;
  }

  fail(message: string): never {
    throw new DeviceRestoreError(this.device, `${this.path}: ${message}`, { field: this.path });
  }

  int(field: string, min: number, max: number): number {
    const v = this.obj[field];
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min || v > max)
      throw new DeviceRestoreError(this.device, `field ${this.name(field)} is not an integer in [${min}, ${max}]`, { field: this.name(field) });
    return v;
  }

  bool(field: string): boolean {
    const v = this.obj[field];
    if (typeof v !== "boolean") throw new DeviceRestoreError(this.device, `field ${this.name(field)} is not a boolean`, { field: this.name(field) });
    return v;
  }

  /** A string among `allowed`. */
  oneOf<T extends string>(field: string, allowed: readonly T[]): T {
    const v = this.obj[field];
    if (typeof v !== "string" || !(allowed as readonly string[]).includes(v))
      throw new DeviceRestoreError(this.device, `field ${this.name(field)} is not one of ${allowed.join(", ")}`, { field: this.name(field) });
    return v as T;
  }

  /** An array of integers in [min, max] with a length in [minLength, maxLength]. */
  ints(field: string, minLength: number, maxLength: number, min: number, max: number): number[] {
    const v = this.obj[field];
    if (!Array.isArray(v) || v.length < minLength || v.length > maxLength)
      throw new DeviceRestoreError(this.device, `field ${this.name(field)} is not an array of length [${minLength}, ${maxLength}]`, { field: this.name(field) });
    return v.map((x: unknown, i) => {
      if (typeof x !== "number" || !Number.isSafeInteger(x) || x < min || x > max)
        throw new DeviceRestoreError(this.device, `field ${this.name(field)}[${i}] is not an integer in [${min}, ${max}]`, { field: this.name(field) });
      return x;
    });
  }

  child(field: string): FieldReader {
    return new FieldReader(this.device, this.name(field), this.obj[field]);
  }

  /** An array of exactly `length` entries, each an object or null. */
  children(field: string, length: number): (FieldReader | null)[] {
    const v = this.obj[field];
    if (!Array.isArray(v) || v.length !== length)
      throw new DeviceRestoreError(this.device, `field ${this.name(field)} is not an array of ${length}`, { field: this.name(field) });
    return v.map((x: unknown, i) => (x === null ? null : new FieldReader(this.device, `${this.name(field)}[${i}]`, x)));
  }
}
