/**
 * A minimal AML decoder for tests: enough of ACPI 6 chapter 20 to read back what
 * src/machine/acpi/aml.ts emits (Name, Scope, Device, Method, Return, Package,
 * Buffer, integers, strings), independent of the encoder's code.
 */
export type AmlNode =
  | { kind: "name"; path: string; value: AmlNode }
  | { kind: "scope"; path: string; children: AmlNode[] }
  | { kind: "device"; path: string; children: AmlNode[] }
  | { kind: "method"; path: string; flags: number; children: AmlNode[] }
  | { kind: "return"; value: AmlNode }
  | { kind: "package"; elements: AmlNode[] }
  | { kind: "buffer"; bytes: Uint8Array }
  | { kind: "integer"; value: bigint }
  | { kind: "string"; value: string };

export class AmlReader {
  private pos = 0;
  constructor(private readonly b: Uint8Array) {}

  static parse(aml: Uint8Array): AmlNode[] {
    const r = new AmlReader(aml);
    return r.termList(aml.length);
  }

  private u8(): number {
    if (this.pos >= this.b.length) throw new Error(`AML truncated at ${this.pos}`);
    return this.b[this.pos++]!;
  }

  private pkgEnd(): number {
    const start = this.pos;
    const lead = this.u8();
    const n = lead >> 6;
    let len = n === 0 ? lead & 0x3f : lead & 0x0f;
    for (let i = 0; i < n; i++) len |= this.u8() << (4 + 8 * i);
    const end = start + len;
    if (end > this.b.length) throw new Error(`PkgLength past the end at ${start}`);
    return end;
  }

  private nameSeg(): string {
    let s = "";
    for (let i = 0; i < 4; i++) s += String.fromCharCode(this.u8());
    if (!/^[A-Z_][A-Z0-9_]{3}$/.test(s)) throw new Error(`bad NameSeg "${s}" at ${this.pos - 4}`);
    return s;
  }

  private nameString(): string {
    let prefix = "";
    while (this.b[this.pos] === 0x5c || this.b[this.pos] === 0x5e) prefix += String.fromCharCode(this.u8());
    const c = this.b[this.pos];
    let segs: string[];
    if (c === 0x00) {
      this.pos++;
      segs = [];
    } else if (c === 0x2e) {
      this.pos++;
      segs = [this.nameSeg(), this.nameSeg()];
    } else if (c === 0x2f) {
      this.pos++;
      const n = this.u8();
      segs = Array.from({ length: n }, () => this.nameSeg());
    } else segs = [this.nameSeg()];
    return prefix + segs.join(".");
  }

  private termList(end: number): AmlNode[] {
    const out: AmlNode[] = [];
    while (this.pos < end) out.push(this.term());
    if (this.pos !== end) throw new Error(`term list overran its package at ${this.pos}`);
    return out;
  }

  private term(): AmlNode {
    const op = this.u8();
    switch (op) {
      case 0x08: {
        const path = this.nameString();
        return { kind: "name", path, value: this.term() };
      }
      case 0x10: {
        const end = this.pkgEnd();
        const path = this.nameString();
        return { kind: "scope", path, children: this.termList(end) };
      }
      case 0x14: {
        const end = this.pkgEnd();
        const path = this.nameString();
        const flags = this.u8();
        return { kind: "method", path, flags, children: this.termList(end) };
      }
      case 0x5b: {
        const ext = this.u8();
        if (ext !== 0x82) throw new Error(`unsupported ext opcode 0x${ext.toString(16)}`);
        const end = this.pkgEnd();
        const path = this.nameString();
        return { kind: "device", path, children: this.termList(end) };
      }
      case 0xa4:
        return { kind: "return", value: this.term() };
      case 0x12: {
        const end = this.pkgEnd();
        const n = this.u8();
        const elements = this.termList(end);
        if (elements.length !== n) throw new Error(`package says ${n} elements, has ${elements.length}`);
        return { kind: "package", elements };
      }
      case 0x11: {
        const end = this.pkgEnd();
        const size = this.term();
        if (size.kind !== "integer") throw new Error("buffer size is not an integer");
        const bytes = this.b.slice(this.pos, end);
        if (BigInt(bytes.length) !== size.value) throw new Error("buffer size mismatch");
        this.pos = end;
        return { kind: "buffer", bytes };
      }
      case 0x00:
        return { kind: "integer", value: 0n };
      case 0x01:
        return { kind: "integer", value: 1n };
      case 0xff:
        return { kind: "integer", value: 0xffff_ffff_ffff_ffffn };
      case 0x0a:
      case 0x0b:
      case 0x0c:
      case 0x0e: {
        const n = op === 0x0a ? 1 : op === 0x0b ? 2 : op === 0x0c ? 4 : 8;
        let v = 0n;
        for (let i = 0; i < n; i++) v |= BigInt(this.u8()) << BigInt(8 * i);
        return { kind: "integer", value: v };
      }
      case 0x0d: {
        let s = "";
        for (let c = this.u8(); c !== 0; c = this.u8()) s += String.fromCharCode(c);
        return { kind: "string", value: s };
      }
      default:
        throw new Error(`unsupported AML opcode 0x${op.toString(16)} at ${this.pos - 1}`);
    }
  }
}

/** Find a node by absolute-ish path through scopes/devices ("\\_SB.PCI0._CRS"). */
export function findName(nodes: readonly AmlNode[], path: string): AmlNode | undefined {
  const want = path.replace(/^\\/, "").split(".").map((s) => s.padEnd(4, "_"));
  const walk = (list: readonly AmlNode[], segs: string[]): AmlNode | undefined => {
    for (const n of list) {
      if (n.kind === "return" || n.kind === "package" || n.kind === "buffer" || n.kind === "integer" || n.kind === "string") continue;
      const own = n.path.replace(/^\\/, "").split(".").filter((s) => s !== "");
      if (own.length > segs.length || own.some((s, i) => s !== segs[i])) continue;
      const rest = segs.slice(own.length);
      if (rest.length === 0) return n;
      if (n.kind !== "name") {
        const hit = walk(n.children, rest);
        if (hit !== undefined) return hit;
      }
    }
    return undefined;
  };
  return walk(nodes, want);
}

/** Decode an EISA id DWORD back to "AAA####". */
export function decodeEisaId(v: number): string {
  const b0 = v & 0xff, b1 = (v >>> 8) & 0xff, b2 = (v >>> 16) & 0xff, b3 = (v >>> 24) & 0xff;
  const mfg = (b0 << 8) | b1;
  const ch = (x: number) => String.fromCharCode(0x40 + (x & 0x1f));
  return ch(mfg >> 10) + ch(mfg >> 5) + ch(mfg) + ((b2 << 8) | b3).toString(16).toUpperCase().padStart(4, "0");
}
