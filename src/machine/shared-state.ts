/**
 * Device state that every thread of a worker sees: the vCPU threads (which
 * service exits) and the worker's main thread (which injects console input,
 * power-button presses and timer events). Each thread builds its own device
 * objects over the same SharedArrayBuffer; the machine lock (one per board,
 * like QEMU's big lock) serialises device access. Hot synthetic devices keep
 * their own state and back-end threads and do not take this lock per I/O.
 *
 * A layout is declared once per device type:
 *   const Layout = structLayout({ ier: "u8", lcr: "u8", rx: { bytes: 16 } });
 * and bound to a region of the board's shared state:
 *   const s = Layout.bind(sab, offset); s.ier = 1; s.rx[0] = 0x41;
 * `snapshot()` copies a bound struct into plain, structured-clone-safe data
 * for saved state; `load()` writes it back after validation by the device.
 */

export type ScalarType = "u8" | "u16" | "u32" | "i32" | "f64";
export type FieldType = ScalarType | { readonly bytes: number };

type FieldValue<T> = T extends ScalarType ? number : Uint8Array;
export type Bound<F extends Record<string, FieldType>> = { -readonly [K in keyof F]: FieldValue<F[K]> };
export type Snapshot<F extends Record<string, FieldType>> = { [K in keyof F]: F[K] extends ScalarType ? number : number[] };

const SCALAR_SIZE: Record<ScalarType, number> = { u8: 1, u16: 2, u32: 4, i32: 4, f64: 8 };

export interface StructLayout<F extends Record<string, FieldType>> {
  readonly fields: F;
  /** Size in bytes, a multiple of 8. */
  readonly size: number;
  bind(buffer: SharedArrayBuffer | ArrayBuffer, offset: number): Bound<F>;
  snapshot(bound: Bound<F>): Snapshot<F>;
  load(bound: Bound<F>, snap: Snapshot<F>): void;
}

export function structLayout<const F extends Record<string, FieldType>>(fields: F): StructLayout<F> {
  const offsets = new Map<string, number>();
  let size = 0;
  // Scalars first, largest alignment first, then byte arrays.
  const names = Object.keys(fields);
  const scalars = names.filter((n) => typeof fields[n] === "string");
  scalars.sort((a, b) => SCALAR_SIZE[fields[b] as ScalarType] - SCALAR_SIZE[fields[a] as ScalarType]);
  for (const n of scalars) {
    const s = SCALAR_SIZE[fields[n] as ScalarType];
    size = Math.ceil(size / s) * s;
    offsets.set(n, size);
    size += s;
  }
  for (const n of names) {
    const f = fields[n]!;
    if (typeof f === "string") continue;
    offsets.set(n, size);
    size += f.bytes;
  }
  size = Math.ceil(size / 8) * 8;

  return {
    fields,
    size,
    bind(buffer, base) {
      if (base % 8 !== 0 || base + size > buffer.byteLength) throw new RangeError("structLayout.bind: bad offset");
      const dv = new DataView(buffer, base, size);
      const obj: Record<string, unknown> = {};
      for (const n of names) {
        const f = fields[n]!;
        const off = offsets.get(n)!;
        if (typeof f !== "string") {
          Object.defineProperty(obj, n, { value: new Uint8Array(buffer, base + off, f.bytes), enumerable: true });
          continue;
        }
        let get: () => number;
        let set: (v: number) => void;
        switch (f) {
          case "u8": get = () => dv.getUint8(off); set = (v) => dv.setUint8(off, v); break;
          case "u16": get = () => dv.getUint16(off, true); set = (v) => dv.setUint16(off, v, true); break;
          case "u32": get = () => dv.getUint32(off, true); set = (v) => dv.setUint32(off, v >>> 0, true); break;
          case "i32": get = () => dv.getInt32(off, true); set = (v) => dv.setInt32(off, v | 0, true); break;
          case "f64": get = () => dv.getFloat64(off, true); set = (v) => dv.setFloat64(off, v, true); break;
        }
        Object.defineProperty(obj, n, { get, set, enumerable: true });
      }
      return obj as Bound<F>;
    },
    snapshot(bound) {
      const out: Record<string, unknown> = {};
      for (const n of names) {
        const v = (bound as Record<string, unknown>)[n];
        out[n] = v instanceof Uint8Array ? Array.from(v) : v;
      }
      return out as Snapshot<F>;
    },
    load(bound, snap) {
      for (const n of names) {
        const f = fields[n]!;
        const v = (snap as Record<string, unknown>)[n];
        if (typeof f === "string") {
          if (typeof v !== "number" || !Number.isFinite(v)) throw new RangeError(`saved state: field ${n} is not a number`);
          (bound as Record<string, unknown>)[n] = v;
        } else {
          if (!Array.isArray(v) || v.length !== f.bytes) throw new RangeError(`saved state: field ${n} has the wrong length`);
          (bound as Record<string, Uint8Array>)[n]!.set(v as number[]);
        }
      }
    },
  };
}

/**
 * Allocates consecutive, 8-byte aligned regions of one SharedArrayBuffer.
 * Every thread must allocate in the same order (the board builder does), so
 * the same device lands on the same bytes everywhere.
 */
export class SharedStateArena {
  private next = 8; // first 8 bytes: the machine lock
  constructor(readonly buffer: SharedArrayBuffer) {}

  static create(bytes = 64 * 1024): SharedStateArena {
    return new SharedStateArena(new SharedArrayBuffer(bytes));
  }

  allocate<F extends Record<string, FieldType>>(layout: StructLayout<F>): Bound<F> {
    const at = this.next;
    if (at + layout.size > this.buffer.byteLength) throw new RangeError("shared device state arena is full");
    this.next += layout.size;
    return layout.bind(this.buffer, at);
  }

  /** The board-wide lock lives in the arena's first word. */
  lock(): MachineLock {
    return new MachineLock(new Int32Array(this.buffer, 0, 2));
  }
}

/**
 * The board lock: a futex-style mutex over an Int32Array word. Held only for
 * the duration of one device access or one injected event.
 * word[0]: 0 free, 1 held, 2 held with waiters.
 */
export class MachineLock {
  constructor(private readonly word: Int32Array) {}

  acquire(): void {
    let c = Atomics.compareExchange(this.word, 0, 0, 1);
    if (c === 0) return;
    for (let spin = 0; spin < 100; spin++) {
      c = Atomics.compareExchange(this.word, 0, 0, 1);
      if (c === 0) return;
    }
    if (c !== 2) c = Atomics.exchange(this.word, 0, 2);
    while (c !== 0) {
      Atomics.wait(this.word, 0, 2);
      c = Atomics.exchange(this.word, 0, 2);
    }
  }

  release(): void {
    if (Atomics.sub(this.word, 0, 1) !== 1) {
      Atomics.store(this.word, 0, 0);
      Atomics.notify(this.word, 0, 1);
    }
  }

  /** Run `fn` with the lock held. Not re-entrant. */
  with<T>(fn: () => T): T {
    this.acquire();
    try {
      return fn();
    } finally {
      this.release();
    }
  }
}
