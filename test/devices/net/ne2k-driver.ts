/**
 * A test driver for the NE2000 model that makes the register accesses the
 * Linux ne2k-pci driver and lib8390 make (probe, NS8390_init, block
 * input/output through the data port with 32-bit accesses, the interrupt
 * handler, receive, overrun recovery), through barRead/barWrite only.
 */
import type { Ne2kPci } from "../../../src/devices/net/ne2k-pci.js";

export const CMD = 0x00;
export const PSTART = 0x01;
export const PSTOP = 0x02;
export const BNRY = 0x03;
export const TPSR = 0x04;
export const TSR = 0x04;
export const TBCR0 = 0x05;
export const TBCR1 = 0x06;
export const ISR = 0x07;
export const RSAR0 = 0x08;
export const RSAR1 = 0x09;
export const RBCR0 = 0x0a;
export const RBCR1 = 0x0b;
export const RCR = 0x0c;
export const TCR = 0x0d;
export const CNTR0 = 0x0d;
export const DCR = 0x0e;
export const IMR = 0x0f;
export const CNTR2 = 0x0f;
export const CURR = 0x07;
export const DATA = 0x10;
export const RESET = 0x1f;

export const STOP = 0x01;
export const START = 0x02;
export const TRANS = 0x04;
export const RREAD = 0x08;
export const RWRITE = 0x10;
export const NODMA = 0x20;
export const PAGE1 = 0x40;
export const PAGE2 = 0x80;

export const ISR_RX = 0x01;
export const ISR_TX = 0x02;
export const ISR_RX_ERR = 0x04;
export const ISR_TX_ERR = 0x08;
export const ISR_OVER = 0x10;
export const ISR_COUNTERS = 0x20;
export const ISR_RDC = 0x40;
export const ISR_RESET = 0x80;
export const ISR_ALL = 0x3f;

export const TX_START = 0x40;
export const TX_PAGES = 12;
export const RX_START = TX_START + TX_PAGES;
export const RX_STOP = 0x80;

export interface DriverStats {
  rxPackets: number;
  rxErrors: number;
  rxLengthErrors: number;
  rxOverErrors: number;
  rxMissed: number;
  txPackets: number;
  txErrors: number;
  mismatches: number;
}

export class Ne2kDriver {
  mac = new Uint8Array(6);
  prom = new Uint8Array(32);
  currentPage = RX_START;
  mcfilter = new Uint8Array(8);
  rxConfig = 0x04;
  /** Frames handed to the "stack". */
  readonly received: Uint8Array[] = [];
  /** Called in ei_receive after its last read of CURR, before it acknowledges PRX (a test's frame can arrive there). */
  beforeReceiveAck: (() => void) | undefined;
  readonly stats: DriverStats = { rxPackets: 0, rxErrors: 0, rxLengthErrors: 0, rxOverErrors: 0, rxMissed: 0, txPackets: 0, txErrors: 0, mismatches: 0 };
  private tx1 = 0;
  private tx2 = 0;
  private txing = false;

  constructor(readonly nic: Ne2kPci) {}

  outb(value: number, reg: number): void {
    this.nic.barWrite(0, reg, 1, value & 0xff);
  }
  inb(reg: number): number {
    return this.nic.barRead(0, reg, 1);
  }
  outw(value: number, reg: number): void {
    this.nic.barWrite(0, reg, 2, value & 0xffff);
  }
  inw(reg: number): number {
    return this.nic.barRead(0, reg, 2);
  }
  outl(value: number, reg: number): void {
    this.nic.barWrite(0, reg, 4, value >>> 0);
  }
  inl(reg: number): number {
    return this.nic.barRead(0, reg, 4);
  }

  /** ne2k_pci_init_one: detect, reset, read the station address PROM, NS8390_init(0). Returns false when no card answers. */
  probe(): boolean {
    const reg0 = this.inb(CMD);
    if (reg0 === 0xff) return false;
    this.outb(NODMA + PAGE1 + STOP, CMD);
    const regd = this.inb(0x0d);
    this.outb(0xff, 0x0d);
    this.outb(NODMA, CMD);
    this.inb(CNTR0);
    if (this.inb(CNTR0) !== 0) {
      this.outb(reg0, CMD);
      this.outb(regd, 0x0d);
      return false;
    }
    if (!this.resetCard()) return false;
    this.outb(0xff, ISR);
    const seq: [number, number][] = [
      [NODMA + STOP, CMD],
      [0x49, DCR],
      [0x00, RBCR0],
      [0x00, RBCR1],
      [0x00, IMR],
      [0xff, ISR],
      [0x20, RCR],
      [0x02, TCR],
      [32, RBCR0],
      [0x00, RBCR1],
      [0x00, RSAR0],
      [0x00, RSAR1],
      [RREAD + START, CMD],
    ];
    for (const [v, r] of seq) this.outb(v, r);
    for (let i = 0; i < 32; i++) this.prom[i] = this.inb(DATA);
    this.outb(0x49, DCR);
    this.mac = this.prom.slice(0, 6);
    this.init(false);
    return true;
  }

  resetCard(): boolean {
    this.outb(this.inb(RESET), RESET);
    this.txing = false;
    for (let i = 0; i < 100; i++) if ((this.inb(ISR) & ISR_RESET) !== 0) return true;
    return false;
  }

  /** NS8390_init. */
  init(start: boolean): void {
    this.outb(NODMA + STOP, CMD);
    this.outb(0x49, DCR);
    this.outb(0, RBCR0);
    this.outb(0, RBCR1);
    this.outb(0x20, RCR);
    this.outb(0x02, TCR);
    this.outb(TX_START, TPSR);
    this.tx1 = this.tx2 = 0;
    this.outb(RX_START, PSTART);
    this.outb(RX_STOP - 1, BNRY);
    this.currentPage = RX_START;
    this.outb(RX_STOP, PSTOP);
    this.outb(0xff, ISR);
    this.outb(0, IMR);
    this.outb(NODMA + PAGE1 + STOP, CMD);
    for (let i = 0; i < 6; i++) this.outb(this.mac[i]!, 1 + i);
    this.outb(RX_START, CURR);
    this.outb(NODMA + STOP, CMD);
    this.txing = false;
    if (start) {
      this.outb(0xff, ISR);
      this.outb(ISR_ALL, IMR);
      this.outb(NODMA + START, CMD);
      this.outb(0x00, TCR);
      this.outb(this.rxConfig, RCR);
      this.setMulticast();
    }
  }

  /** ei_open. */
  open(): void {
    this.init(true);
  }

  setMulticast(): void {
    this.outb(this.rxConfig, RCR);
    this.outb(NODMA + PAGE1, CMD);
    for (let i = 0; i < 8; i++) this.outb(this.mcfilter[i]!, 8 + i);
    this.outb(NODMA, CMD);
    this.outb(this.rxConfig, RCR);
  }

  /** ne2k_pci_block_output: returns false on an RDC timeout. */
  blockOutput(data: Uint8Array, startPage: number): boolean {
    let count = data.length;
    if (count & 1) count++;
    const buf = new Uint8Array(count + 4);
    buf.set(data);
    this.outb(NODMA + START, CMD);
    this.outb(ISR_RDC, ISR);
    this.outb(count & 0xff, RBCR0);
    this.outb(count >> 8, RBCR1);
    this.outb(0, RSAR0);
    this.outb(startPage, RSAR1);
    this.outb(RWRITE + START, CMD);
    const dv = new DataView(buf.buffer);
    let i = 0;
    for (; i + 4 <= count; i += 4) this.outl(dv.getUint32(i, true), DATA);
    if (count & 2) this.outw(dv.getUint16(i, true), DATA);
    let ok = false;
    for (let t = 0; t < 10; t++) if ((this.inb(ISR) & ISR_RDC) !== 0) ok = true;
    this.outb(ISR_RDC, ISR);
    return ok;
  }

  triggerSend(length: number, startPage: number): void {
    this.outb(NODMA, CMD);
    if ((this.inb(CMD) & TRANS) !== 0) throw new Error("transmitter busy");
    this.outb(length & 0xff, TBCR0);
    this.outb(length >> 8, TBCR1);
    this.outb(startPage, TPSR);
    this.outb(NODMA + TRANS + START, CMD);
  }

  /** ei_start_xmit (two ping-pong buffers). Returns false when both are busy. */
  transmit(frame: Uint8Array): boolean {
    let data = frame;
    if (data.length < 60) {
      data = new Uint8Array(60);
      data.set(frame);
    }
    this.outb(0, IMR);
    let page: number;
    if (this.tx1 === 0) {
      page = TX_START;
      this.tx1 = data.length;
    } else if (this.tx2 === 0) {
      page = TX_START + TX_PAGES / 2;
      this.tx2 = data.length;
    } else {
      this.outb(ISR_ALL, IMR);
      return false;
    }
    if (!this.blockOutput(data, page)) throw new Error("timeout waiting for Tx RDC");
    if (!this.txing) {
      this.txing = true;
      this.triggerSend(data.length, page);
      if (page === TX_START) this.tx1 = -1;
      else this.tx2 = -1;
    }
    this.outb(ISR_ALL, IMR);
    return true;
  }

  private txIntr(): void {
    const status = this.inb(TSR);
    this.outb(ISR_TX, ISR);
    if (this.tx1 < 0) {
      this.tx1 = 0;
      if (this.tx2 > 0) {
        this.txing = true;
        this.triggerSend(this.tx2, TX_START + 6);
        this.tx2 = -1;
      } else this.txing = false;
    } else if (this.tx2 < 0) {
      this.tx2 = 0;
      if (this.tx1 > 0) {
        this.txing = true;
        this.triggerSend(this.tx1, TX_START);
        this.tx1 = -1;
      } else this.txing = false;
    }
    if (status & 0x01) this.stats.txPackets++;
    else this.stats.txErrors++;
  }

  /** ne2k_pci_get_8390_hdr: one 32-bit read of the 4-byte header. */
  getHeader(page: number): { status: number; next: number; count: number } {
    this.outb(NODMA + START, CMD);
    this.outb(4, RBCR0);
    this.outb(0, RBCR1);
    this.outb(0, RSAR0);
    this.outb(page, RSAR1);
    this.outb(RREAD + START, CMD);
    const v = this.inl(DATA);
    this.outb(ISR_RDC, ISR);
    return { status: v & 0xff, next: (v >>> 8) & 0xff, count: v >>> 16 };
  }

  /** ne2k_pci_block_input: insl, then inw/inb for the tail. */
  blockInput(count: number, offset: number): Uint8Array {
    const out = new Uint8Array(count + 4);
    const dv = new DataView(out.buffer);
    this.outb(NODMA + START, CMD);
    this.outb(count & 0xff, RBCR0);
    this.outb(count >> 8, RBCR1);
    this.outb(offset & 0xff, RSAR0);
    this.outb(offset >> 8, RSAR1);
    this.outb(RREAD + START, CMD);
    let i = 0;
    for (; i + 4 <= count; i += 4) dv.setUint32(i, this.inl(DATA), true);
    if (count & 3) {
      if (count & 2) {
        dv.setUint16(i, this.inw(DATA), true);
        i += 2;
      }
      if (count & 1) out[i] = this.inb(DATA);
    }
    this.outb(ISR_RDC, ISR);
    return out.subarray(0, count);
  }

  /** ei_receive. */
  receive(): void {
    const ringPages = RX_STOP - RX_START;
    for (let n = 1; n < 10; n++) {
      this.outb(NODMA + PAGE1, CMD);
      const rxing = this.inb(CURR);
      this.outb(NODMA, CMD);
      let thisFrame = this.inb(BNRY) + 1;
      if (thisFrame >= RX_STOP) thisFrame = RX_START;
      if (thisFrame !== this.currentPage) this.stats.mismatches++;
      if (thisFrame === rxing) break;
      const hdr = this.getHeader(thisFrame);
      const len = hdr.count - 4;
      let next = thisFrame + 1 + ((len + 4) >> 8);
      if (hdr.next !== next && hdr.next !== next + 1 && hdr.next !== next - ringPages && hdr.next !== next + 1 - ringPages) {
        this.currentPage = rxing;
        this.outb(this.currentPage - 1, BNRY);
        this.stats.rxErrors++;
        continue;
      }
      if (len < 60 || len > 1518) {
        this.stats.rxErrors++;
        this.stats.rxLengthErrors++;
      } else if ((hdr.status & 0x0f) === 0x01) {
        this.received.push(this.blockInput(len, (thisFrame << 8) + 4).slice());
        this.stats.rxPackets++;
      } else this.stats.rxErrors++;
      next = hdr.next;
      if (next >= RX_STOP) next = RX_START;
      this.currentPage = next;
      this.outb(next - 1, BNRY);
    }
    this.beforeReceiveAck?.();
    this.outb(ISR_RX + ISR_RX_ERR, ISR);
  }

  /** ei_rx_overrun (without the 10 ms wait). */
  rxOverrun(): void {
    const wasTxing = this.inb(CMD) & TRANS;
    this.outb(NODMA + STOP, CMD);
    this.stats.rxOverErrors++;
    this.outb(0, RBCR0);
    this.outb(0, RBCR1);
    let mustResend = false;
    if (wasTxing && (this.inb(ISR) & (ISR_TX + ISR_TX_ERR)) === 0) mustResend = true;
    this.outb(0x02, TCR);
    this.outb(NODMA + START, CMD);
    this.receive();
    this.outb(ISR_OVER, ISR);
    this.outb(0x00, TCR);
    if (mustResend) this.outb(NODMA + START + TRANS, CMD);
  }

  /** ei_interrupt. Returns the number of rounds serviced. */
  interrupt(): number {
    this.outb(NODMA, CMD);
    let rounds = 0;
    let isr: number;
    while ((isr = this.inb(ISR)) !== 0 && ++rounds < 12) {
      if (isr & ISR_OVER) this.rxOverrun();
      else if (isr & (ISR_RX + ISR_RX_ERR)) this.receive();
      if (isr & ISR_TX) this.txIntr();
      else if (isr & ISR_TX_ERR) {
        this.outb(ISR_TX_ERR, ISR);
        this.txIntr();
      }
      if (isr & ISR_COUNTERS) {
        this.inb(0x0d);
        this.inb(0x0e);
        this.stats.rxMissed += this.inb(0x0f);
        this.outb(ISR_COUNTERS, ISR);
      }
      if (isr & ISR_RDC) this.outb(ISR_RDC, ISR);
      this.outb(NODMA + START, CMD);
    }
    return rounds;
  }
}
