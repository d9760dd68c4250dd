/**
 * The Realtek RTL8029(AS) "NE2000 PCI" Ethernet controller (PCI 10ec:8029,
 * class 0x020000, INTA), as the stock Linux ne2k-pci driver (with lib8390)
 * drives it. Modelled from the National Semiconductor DP8390D/NS32490D
 * datasheet (register pages 0-2, remote DMA, receive ring, transmit) and the
 * RTL8029AS datasheet (the PCI face, ID registers 0x0a/0x0b, page 3).
 *
 * BAR0 is 32 bytes of I/O space:
 *   0x00-0x0f  the 8390 registers, in the page the command register selects
 *   0x10-0x17  the remote-DMA data port (8, 16 or 32-bit accesses)
 *   0x18-0x1f  the reset port (a read resets the NIC)
 *
 * The card's local memory, reached only through remote DMA: the station
 * address PROM at 0x0000-0x001f (each byte doubled, as on a word-wide card:
 * read with word transfers it yields the MAC bytes in order) and 16 KiB of
 * packet RAM at 0x4000-0x7fff (pages 0x40-0x7f). Other addresses read 0xff.
 *
 * Transmit: the command register's TXP sends TBCR bytes from page TPSR to the
 * port; completion is immediate (TSR.PTX, ISR.PTX), unless a rate limit
 * (`rateBytesPerSecond`) holds it: then TXP reads back set, as while a frame
 * is on the wire, until the limit's alarm sends it. Receive: frames the port
 * delivers are filtered (physical address, broadcast, multicast hash,
 * promiscuous), padded to 60 bytes and written to the ring between PSTART and
 * PSTOP at CURR with the 4-byte header (status, next page, length), then
 * ISR.PRX. The interrupt line is level: (ISR & IMR) != 0.
 *
 * DEVNOTE: a frame is given pages for its data, header and a 4-byte CRC that
 * the model does not store (the header's length excludes it): the next-page
 * pointer then agrees with lib8390's consistency check for every length.
 *
 * DEVNOTE: when the ring has no room, the default policy ("hold") keeps the
 * frame, stops reading the port (the host queue buffers, then drops) and
 * retries when the guest moves BNRY. A real 8390 would instead drop it and
 * raise ISR.OVW, after which Linux spends ~10 ms in ei_rx_overrun: "drop"
 * selects that behaviour (missed-packet tally CNTR2, OVW).
 *
 * DEVNOTE: PRX is left set through an acknowledgement while a frame came
 * after the driver last read ISR or CURR (see `rxUnseen`).
 *
 * Posted writes (`services.postedWrites`): the remote-DMA data port
 * (0x10-0x17) takes them, wherever the guest maps BAR0: a transmitted frame,
 * which the guest copies in one OUT per 16-bit word (one exit each where KVM
 * does not batch `rep outsw`), no longer waits for the device thread per
 * word. A data-port write raises no interrupt the guest has enabled (RDC is
 * not in lib8390's mask: it polls ISR for it, and that read is answered after
 * every queued write). The registers stay non-posted, as x86 I/O writes are:
 * with all of BAR0 posted (tried in the twenty-sixth session) a 30 KB ping
 * between two 2-vCPU guests lost fragments at the sender twice in two runs,
 * with no reset or error counted, while the build before passed: lib8390's
 * transmit path and interrupt handler evidently rely on an IMR, ISR or
 * command write having taken effect when `outb` returns (the interleaving
 * was not pinned down).
 */
import type { SavedDeviceState } from "../dependencies.js";
import { PostedPortWindow, type FdWatch, type PciDeviceServices } from "../pci/device-thread-services.js";
import { PciConfig, PciDeviceError, type PciDevice } from "../pci/pci-config.js";
import { SavedStateReader } from "../emulated/saved-state.js";
import { FrameBuffer, MAX_PORT_FRAME_BYTES, type NetworkPort } from "./network-port.js";
import { DeviceAlarm, TokenBucket, monotonicClock, type Clock } from "../io-limits.js";

// Command register bits.
const CR_STP = 0x01;
const CR_STA = 0x02;
const CR_TXP = 0x04;
const CR_RD_MASK = 0x38;
const CR_RD_READ = 0x08;
const CR_RD_WRITE = 0x10;
const CR_PAGE_SHIFT = 6;

// Interrupt status bits.
const ISR_PRX = 0x01;
const ISR_PTX = 0x02;
const ISR_TXE = 0x08;
const ISR_OVW = 0x10;
const ISR_CNT = 0x20;
const ISR_RDC = 0x40;
const ISR_RST = 0x80;

// Receive configuration bits.
const RCR_AB = 0x04;
const RCR_AM = 0x08;
const RCR_PRO = 0x10;
const RCR_MON = 0x20;
// Transmit configuration: loopback mode bits.
const TCR_LB = 0x06;
// Data configuration: word transfer select.
const DCR_WTS = 0x01;

const RSR_PRX = 0x01;
const RSR_PHY = 0x20;
const TSR_PTX = 0x01;
const TSR_ABT = 0x08;

const PROM_BYTES = 32;
/** BAR0 offset and size of the remote-DMA data port (the only ports that take posted writes). */
const DATA_PORT = 0x10;
const DATA_PORT_BYTES = 8;
const RAM_START = 0x4000;
const RAM_BYTES = 0x4000;
const RAM_END = RAM_START + RAM_BYTES;
/** Longest frame the receiver takes (lib8390 rejects longer), without FCS. */
const MAX_RX_FRAME = 1518;
const MIN_FRAME = 60;
/** Longest transmit the model sends (the whole packet RAM). */
const MAX_TX_FRAME = RAM_BYTES;
/** Frames taken from the port per readable event before yielding to the loop. */
const RX_BATCH = 64;
const COUNTER_MAX = 192;

export const NE2K_PCI_IDENTITY = {
  vendorId: 0x10ec,
  deviceId: 0x8029,
  classCode: 0x020000,
  revision: 0,
  subsystemVendorId: 0x10ec,
  subsystemId: 0x8029,
  interruptPin: 1,
} as const;

export interface Ne2kPciOptions {
  readonly mac: Uint8Array;
  /** What to do with a frame when the ring is full: "hold" (default, no loss) or "drop" (ISR.OVW, as the chip does). */
  readonly rxFullPolicy?: "hold" | "drop";
  /**
   * Most bytes per second each way (undefined: no limit). A transmit over it
   * keeps TXP set until the alarm (the driver sees a busy wire); receiving
   * stops reading the port (the host's queue buffers, then drops, as a
   * saturated link would) until the alarm.
   */
  readonly rateBytesPerSecond?: number;
  /** The rate limit's millisecond clock (tests give their own). */
  readonly clock?: Clock;
}

/**
 * The least rate a NE2000 takes: a held transmit must end well inside
 * lib8390's transmit watchdog (TX_TIMEOUT, 200 ms), or the driver resets the
 * chip: 0.1 MiB/s, at which a full-size frame waits about 14 ms.
 */
export const NE2K_MIN_RATE_BYTES_PER_SECOND = 0.1 * 1024 * 1024;

/** Host-side counters (not guest-visible). */
export class Ne2kStats {
  txFrames = 0;
  txDroppedByPort = 0;
  txLoopback = 0;
  txErrors = 0;
  rxFrames = 0;
  /** Frames the address filter rejected. */
  rxFiltered = 0;
  /** Frames dropped: receiver stopped / monitor / loopback, bad length, invalid ring, ring full under "drop". */
  rxDropped = 0;
  /** Times the receive path paused because the ring was full ("hold"). */
  rxHeld = 0;
  /** Times the rate limit held a transmit or stopped receiving. */
  throttled = 0;
  /** Times the driver stopped a running NIC (STP): lib8390 does at open, on a transmit timeout and on an overrun. */
  stops = 0;
  /** Acknowledgements of PRX that left it set: a frame came after the driver last read ISR and CURR. */
  rxAckRaces = 0;
}

export interface Ne2kPciSaved extends SavedDeviceState {
  readonly kind: "ne2k-pci";
  readonly version: 1;
  readonly cr: number;
  readonly pstart: number;
  readonly pstop: number;
  readonly bnry: number;
  readonly tpsr: number;
  readonly tbcr: number;
  readonly isr: number;
  readonly rsar: number;
  readonly rbcr: number;
  readonly rcr: number;
  readonly tcr: number;
  readonly dcr: number;
  readonly imr: number;
  readonly tsr: number;
  readonly rsr: number;
  readonly curr: number;
  readonly par: number[];
  readonly mar: number[];
  readonly counters: number[];
  readonly page3: number[];
  readonly ram: number[];
  /** Configuration space as saved by PciConfig (restored by its owner, not by restore()). */
  readonly pci: { bytes: number[]; barAddress: number[] };
}

export class Ne2kPci implements PciDevice {
  readonly pci: PciConfig;
  readonly stats = new Ne2kStats();
  private readonly mac: Uint8Array;
  private readonly prom = new Uint8Array(PROM_BYTES);
  private readonly ram = new Uint8Array(RAM_BYTES);
  private readonly rxFrame = new Uint8Array(MAX_PORT_FRAME_BYTES);
  private readonly tx = new FrameBuffer(MAX_TX_FRAME);
  private readonly rxFullPolicy: "hold" | "drop";

  // --- registers (DP8390 names) ---
  private cr = CR_STP | 0x20;
  private pstart = 0;
  private pstop = 0;
  private bnry = 0;
  private tpsr = 0;
  private tbcr = 0;
  private isr = ISR_RST;
  /** Remote DMA current address (RSAR as written, then advancing) and remaining count. */
  private rsar = 0;
  private rbcr = 0;
  private rcr = 0;
  private tcr = 0;
  private dcr = 0;
  private imr = 0;
  private tsr = 0;
  private rsr = 0;
  private curr = 0;
  private readonly par = new Uint8Array(6);
  private readonly mar = new Uint8Array(8);
  /** CNTR0 (frame alignment), CNTR1 (CRC), CNTR2 (missed packets). */
  private readonly counters = new Uint8Array(3);
  /** RTL8029 page 3 (9346CR, CONFIG0-3...): stored, no effect. */
  private readonly page3 = new Uint8Array(16);

  // --- receive plumbing ---
  private watch: FdWatch | undefined;
  /** Length of a frame held in `rxFrame` waiting for ring space (0: none). */
  private heldLength = 0;
  /**
   * A frame reached the ring after the guest last read ISR or CURR: it does
   * not know of it yet. lib8390's ei_receive reads CURR, takes the frames up
   * to it, and only then acknowledges PRX; a frame arriving between the two
   * (the vCPU exits and the port's fd are served in turn) would lose its
   * interrupt to that acknowledgement and sit in the ring until the next
   * frame came (the last reply of a ping never did). While this is set, an
   * acknowledgement leaves PRX standing, so the guest looks again. A driver
   * that acknowledges first (FreeBSD's ed) has read ISR since the frame came,
   * and gets no extra interrupt.
   */
  private rxUnseen = false;
  private irqLevel = false;
  private readonly onReadable = (): void => this.pumpReceive();
  /** The data port, posted wherever BAR0 decodes. */
  private readonly postedDataPort: PostedPortWindow;

  // --- rate limit ---
  private readonly txLimit: TokenBucket | undefined;
  private readonly rxLimit: TokenBucket | undefined;
  private readonly alarm: DeviceAlarm | undefined;
  /** A transmit the rate limit holds: TXP stays set until the alarm sends it. */
  private txPending = false;
  /** The rate limit stopped reading the port (until the alarm). */
  private rxLimited = false;

  constructor(
    readonly name: string,
    private readonly services: PciDeviceServices,
    private readonly port: NetworkPort | undefined,
    opts: Ne2kPciOptions,
  ) {
    if (opts.mac.length !== 6) throw new PciDeviceError("NE2K_BAD_MAC", `${name}: a MAC address has 6 bytes, not ${opts.mac.length}`, { device: name });
    this.mac = Uint8Array.from(opts.mac);
    this.rxFullPolicy = opts.rxFullPolicy ?? "hold";
    this.pci = new PciConfig(NE2K_PCI_IDENTITY, [{ index: 0, kind: "io", size: 32 }]);
    this.pci.onCommandWrite = () => this.updateIrq();
    this.postedDataPort = new PostedPortWindow(services.postedWrites, DATA_PORT, DATA_PORT_BYTES);
    const clock = opts.clock ?? monotonicClock;
    const rate = opts.rateBytesPerSecond;
    if (rate !== undefined && !(rate >= NE2K_MIN_RATE_BYTES_PER_SECOND))
      throw new PciDeviceError("NE2K_BAD_RATE", `${name}: a NE2000's rate limit is at least ${NE2K_MIN_RATE_BYTES_PER_SECOND} bytes per second (a held transmit must end inside the driver's 200 ms watchdog), not ${rate}`, { device: name });
    // A full-size frame's worth at least.
    this.txLimit = rate === undefined ? undefined : new TokenBucket(rate, MAX_RX_FRAME + 4, clock());
    this.rxLimit = rate === undefined ? undefined : new TokenBucket(rate, MAX_RX_FRAME + 4, clock());
    this.buildProm();
    this.resetChip();
    this.alarm = rate === undefined ? undefined : new DeviceAlarm(services.loop, () => this.resumeLimited(), clock);
    try {
      if (port !== undefined) this.watch = services.loop.watch(port.fd, this.onReadable);
    } catch (e) {
      this.alarm?.close();
      throw e;
    }
  }

  private buildProm(): void {
    const p = this.prom;
    p.fill(0);
    for (let i = 0; i < 6; i++) {
      p[2 * i] = this.mac[i]!;
      p[2 * i + 1] = this.mac[i]!;
    }
    // Bytes 14/15 of the (undoubled) PROM are 0x57 on a by-the-spec NE2000.
    p[28] = p[29] = p[30] = p[31] = 0x57;
  }

  /** The bus calls this after each request it routed here (a config write may have moved or disabled BAR0). */
  afterAccess(): void {
    this.postedDataPort.moveTo(this.pci.mappedAddress(0));
  }

  /** Board / power-on reset. */
  reset(): void {
    this.pci.resetRegisters();
    this.postedDataPort.moveTo(undefined);
    this.ram.fill(0);
    this.par.fill(0);
    this.mar.fill(0);
    this.page3.fill(0);
    this.pstart = this.pstop = this.bnry = this.tpsr = this.tbcr = 0;
    this.rsar = this.rbcr = this.rcr = this.tcr = this.curr = 0;
    this.resetChip();
    this.releaseHeld();
  }

  /** What the reset port does: the NIC stops, ISR shows RST, interrupts are masked. */
  private resetChip(): void {
    this.txPending = false; // a held transmit is abandoned, as a stop abandons one on the wire
    this.cr = CR_STP | 0x20;
    this.isr = ISR_RST;
    this.rxUnseen = false;
    this.imr = 0;
    this.dcr = 0;
    this.tsr = 0;
    this.rsr = 0;
    this.counters.fill(0);
    this.updateIrq();
  }

  close(): void {
    this.stopWatch();
    this.alarm?.close();
  }

  /** Stop reading the port (closed, a frame held for ring space, over the rate limit). */
  private stopWatch(): void {
    this.watch?.close();
    this.watch = undefined;
  }

  // --- BAR access -------------------------------------------------------------------------------

  barRead(bar: number, offset: number, size: 1 | 2 | 4): number {
    if (bar !== 0 || offset < 0 || offset >= 0x20) return size === 4 ? 0xffff_ffff : size === 2 ? 0xffff : 0xff;
    if (offset >= 0x18) {
      this.resetChip();
      this.releaseHeld();
      return 0;
    }
    if (offset >= 0x10) return this.dataRead(size);
    if (size === 1) return this.regRead(offset);
    let v = 0;
    for (let i = 0; i < size; i++) v |= (offset + i < 0x10 ? this.regRead(offset + i) : 0xff) << (8 * i);
    return v >>> 0;
  }

  barWrite(bar: number, offset: number, size: 1 | 2 | 4, value: number): void {
    if (bar !== 0 || offset < 0 || offset >= 0x20) return;
    if (offset >= 0x18) return; // writing the reset port ends the reset pulse: nothing to do
    if (offset >= 0x10) {
      this.dataWrite(size, value);
      return;
    }
    if (size === 1) {
      this.regWrite(offset, value & 0xff);
      return;
    }
    for (let i = 0; i < size && offset + i < 0x10; i++) this.regWrite(offset + i, (value >>> (8 * i)) & 0xff);
  }

  // --- registers --------------------------------------------------------------------------------

  private regRead(reg: number): number {
    if (reg === 0) return this.cr;
    const page = this.cr >> CR_PAGE_SHIFT;
    if (page === 0) {
      switch (reg) {
        case 0x01:
          return 0; // CLDA0: local DMA low byte (receives start on a page boundary)
        case 0x02:
          this.rxUnseen = false;
          return this.curr; // CLDA1
        case 0x03:
          return this.bnry;
        case 0x04:
          return this.tsr;
        case 0x05:
          return 0; // NCR: no collisions
        case 0x06:
          return 0; // FIFO
        case 0x07:
          this.rxUnseen = false;
          return this.isr;
        case 0x08:
          return this.rsar & 0xff;
        case 0x09:
          return this.rsar >> 8;
        case 0x0a:
          return 0x50; // RTL8029 ID0 'P'
        case 0x0b:
          return 0x43; // RTL8029 ID1 'C'
        case 0x0c:
          return this.rsr;
        default: {
          // 0x0d-0x0f: tally counters, cleared by reading.
          const i = reg - 0x0d;
          const v = this.counters[i]!;
          this.counters[i] = 0;
          if ((this.counters[0]! | this.counters[1]! | this.counters[2]!) < 0x80) this.isr &= ~ISR_CNT;
          this.updateIrq();
          return v;
        }
      }
    }
    if (page === 1) {
      if (reg <= 6) return this.par[reg - 1]!;
      if (reg === 7) {
        this.rxUnseen = false;
        return this.curr;
      }
      return this.mar[reg - 8]!;
    }
    if (page === 2) {
      switch (reg) {
        case 0x01:
          return this.pstart;
        case 0x02:
          return this.pstop;
        case 0x03:
          return 0; // remote next packet pointer (send-packet command not modelled)
        case 0x04:
          return this.tpsr;
        case 0x05:
          this.rxUnseen = false;
          return this.curr; // local next packet pointer
        case 0x06:
          return this.rsar >> 8; // address counter (upper)
        case 0x07:
          return this.rsar & 0xff;
        case 0x0c:
          return this.rcr;
        case 0x0d:
          return this.tcr;
        case 0x0e:
          return this.dcr;
        case 0x0f:
          return this.imr;
        default:
          return 0xff;
      }
    }
    return this.page3[reg]!;
  }

  private regWrite(reg: number, v: number): void {
    if (reg === 0) {
      this.writeCommand(v);
      return;
    }
    const page = this.cr >> CR_PAGE_SHIFT;
    if (page === 0) {
      switch (reg) {
        case 0x01:
          this.pstart = v;
          this.retryHeld();
          return;
        case 0x02:
          this.pstop = v;
          this.retryHeld();
          return;
        case 0x03:
          this.bnry = v;
          this.retryHeld();
          return;
        case 0x04:
          this.tpsr = v;
          return;
        case 0x05:
          this.tbcr = (this.tbcr & 0xff00) | v;
          return;
        case 0x06:
          this.tbcr = (this.tbcr & 0x00ff) | (v << 8);
          return;
        case 0x07:
          // Write one to clear; RST is status only. PRX stays for a frame the guest has not seen (rxUnseen), and
          // while a frame waits for ring space: the ring is full of frames the guest has yet to take (lib8390 takes
          // nine per call), and with the port unread no new frame would raise PRX again.
          if ((v & ISR_PRX) !== 0 && (this.rxUnseen || this.heldLength > 0)) {
            v &= ~ISR_PRX;
            if (this.rxUnseen) this.stats.rxAckRaces++;
          }
          this.isr &= ~(v & 0x7f);
          this.updateIrq();
          return;
        case 0x08:
          this.rsar = (this.rsar & 0xff00) | v;
          return;
        case 0x09:
          this.rsar = (this.rsar & 0x00ff) | (v << 8);
          return;
        case 0x0a:
          this.rbcr = (this.rbcr & 0xff00) | v;
          return;
        case 0x0b:
          this.rbcr = (this.rbcr & 0x00ff) | (v << 8);
          return;
        case 0x0c:
          this.rcr = v & 0x3f;
          this.retryHeld();
          return;
        case 0x0d:
          this.tcr = v & 0x1f;
          this.retryHeld();
          return;
        case 0x0e:
          this.dcr = v & 0x7f;
          return;
        default:
          this.imr = v & 0x7f;
          this.updateIrq();
          return;
      }
    }
    if (page === 1) {
      if (reg <= 6) this.par[reg - 1] = v;
      else if (reg === 7) {
        this.curr = v;
        this.retryHeld();
      } else this.mar[reg - 8] = v;
      return;
    }
    if (page === 3) this.page3[reg] = v;
    // Page 2 is read-only (diagnostics).
  }

  private writeCommand(v: number): void {
    // Neither STA nor STP: the run state is unchanged (lib8390 writes 0x20 to select page 0).
    let run = this.cr & (CR_STP | CR_STA);
    if ((v & CR_STP) !== 0) run = CR_STP;
    else if ((v & CR_STA) !== 0) run = CR_STA;
    const wasStopped = (this.cr & CR_STP) !== 0;
    // A stop abandons a transmit the rate limit holds (lib8390's overrun recovery sees TXP gone without PTX and
    // sends it again); else TXP reads back set until it goes.
    if (run === CR_STP) this.txPending = false;
    this.cr = (v & ~(CR_STP | CR_STA | CR_TXP)) | run | (this.txPending ? CR_TXP : 0);
    if (run === CR_STP) {
      this.isr |= ISR_RST;
      if (!wasStopped) {
        this.stats.stops++;
        this.releaseHeld();
      }
    } else if (run === CR_STA) this.isr &= ~ISR_RST;
    const rd = v & CR_RD_MASK;
    if ((rd === CR_RD_READ || rd === CR_RD_WRITE) && this.rbcr === 0) this.isr |= ISR_RDC;
    if ((v & CR_TXP) !== 0 && run === CR_STA && !this.txPending) this.startTransmit();
    this.updateIrq();
    if (wasStopped && run === CR_STA) this.retryHeld();
  }

  // --- remote DMA -------------------------------------------------------------------------------

  private cardRead(addr: number): number {
    if (addr >= RAM_START && addr < RAM_END) return this.ram[addr - RAM_START]!;
    if (addr < PROM_BYTES) return this.prom[addr]!;
    return 0xff;
  }

  private cardWrite(addr: number, v: number): void {
    if (addr >= RAM_START && addr < RAM_END) this.ram[addr - RAM_START] = v;
  }

  /** Move the remote DMA address and count on by `n` bytes (the address wraps from PSTOP to PSTART). */
  private dmaAdvance(n: number): void {
    let a = (this.rsar + n) & 0xffff;
    if (this.pstop > this.pstart && a === this.pstop << 8) a = this.pstart << 8;
    this.rsar = a;
    if (this.rbcr > 0) {
      this.rbcr = this.rbcr > n ? this.rbcr - n : 0;
      if (this.rbcr === 0) {
        this.isr |= ISR_RDC;
        this.updateIrq();
      }
    }
  }

  private dmaReadWord(): number {
    const a = this.rsar & 0xfffe;
    const v = this.cardRead(a) | (this.cardRead(a + 1) << 8);
    this.rsar = a;
    this.dmaAdvance(2);
    return v;
  }

  private dmaReadByte(): number {
    const v = this.cardRead(this.rsar);
    this.dmaAdvance(1);
    return v;
  }

  private dmaWriteWord(v: number): void {
    const a = this.rsar & 0xfffe;
    this.cardWrite(a, v & 0xff);
    this.cardWrite(a + 1, (v >> 8) & 0xff);
    this.rsar = a;
    this.dmaAdvance(2);
  }

  private dmaWriteByte(v: number): void {
    this.cardWrite(this.rsar, v & 0xff);
    this.dmaAdvance(1);
  }

  private dataRead(size: 1 | 2 | 4): number {
    if ((this.dcr & DCR_WTS) !== 0) {
      // Word mode: every access moves whole words; a byte read sees the low byte.
      if (size === 4) return (this.dmaReadWord() | (this.dmaReadWord() << 16)) >>> 0;
      const w = this.dmaReadWord();
      return size === 1 ? w & 0xff : w;
    }
    if (size === 1) return this.dmaReadByte();
    let v = 0;
    for (let i = 0; i < size; i++) v |= this.dmaReadByte() << (8 * i);
    return v >>> 0;
  }

  private dataWrite(size: 1 | 2 | 4, value: number): void {
    if ((this.dcr & DCR_WTS) !== 0) {
      this.dmaWriteWord(value & 0xffff);
      if (size === 4) this.dmaWriteWord(value >>> 16);
      return;
    }
    for (let i = 0; i < size; i++) this.dmaWriteByte((value >>> (8 * i)) & 0xff);
  }

  // --- transmit ---------------------------------------------------------------------------------

  /** Whether a transmit now would put TBCR bytes on the wire (what the rate limit counts). */
  private get transmitGoesOut(): boolean {
    return (this.tcr & TCR_LB) === 0 && this.tbcr !== 0 && this.tbcr <= MAX_TX_FRAME;
  }

  /** TXP: the frame goes now, or, over the rate limit, stays with TXP set until the alarm. */
  private startTransmit(): void {
    const limit = this.txLimit;
    if (limit !== undefined && this.transmitGoesOut) {
      if (this.alarm!.waitFor(limit)) {
        this.txPending = true;
        this.cr |= CR_TXP;
        this.stats.throttled++;
        return;
      }
      limit.charge(this.tbcr);
    }
    this.transmit();
  }

  /**
   * The alarm: a held transmit goes if the limit allows it now (else the
   * alarm is set again), and receiving resumes.
   */
  private resumeLimited(): void {
    if (this.txPending && !this.alarm!.waitFor(this.txLimit!)) this.sendPending();
    if (this.rxLimited) {
      this.rxLimited = false;
      this.resumeWatch();
    }
  }

  /** Send the held transmit (charged if it still goes out: the guest may have changed TBCR or TCR meanwhile). */
  private sendPending(): void {
    this.txPending = false;
    this.cr &= ~CR_TXP;
    if (this.transmitGoesOut) this.txLimit!.charge(this.tbcr);
    this.transmit();
    this.updateIrq();
  }

  private transmit(): void {
    const len = this.tbcr;
    if (len === 0 || len > MAX_TX_FRAME) {
      this.stats.txErrors++;
      this.tsr = TSR_ABT;
      this.isr |= ISR_TXE;
      return;
    }
    const out = this.tx.bytes;
    const base = this.tpsr << 8;
    for (let i = 0; i < len; i++) out[i] = this.cardRead((base + i) & 0xffff);
    if ((this.tcr & TCR_LB) !== 0) this.stats.txLoopback++;
    else if (this.port === undefined || !this.port.send(this.tx.view(len))) this.stats.txDroppedByPort++;
    else this.stats.txFrames++;
    // The wire is always free: the frame is on it (or lost there) at once.
    this.tsr = TSR_PTX;
    this.isr |= ISR_PTX;
  }

  // --- receive ----------------------------------------------------------------------------------

  private receiverRunning(): boolean {
    return (this.cr & CR_STP) === 0 && (this.cr & CR_STA) !== 0 && (this.rcr & RCR_MON) === 0 && (this.tcr & TCR_LB) === 0;
  }

  /** Called when the port's fd is readable. */
  private pumpReceive(): void {
    const port = this.port;
    if (port === undefined) return;
    const limit = this.rxLimit;
    for (let i = 0; i < RX_BATCH; i++) {
      if (this.heldLength > 0) return; // paused (should not be watching)
      if (limit !== undefined && this.alarm!.waitFor(limit)) {
        // Over the rate: stop reading the port until the alarm.
        this.rxLimited = true;
        this.stats.throttled++;
        this.stopWatch();
        return;
      }
      const n = port.receive(this.rxFrame);
      if (n === 0) return;
      limit?.charge(n);
      if (this.deliver(n) === "full") {
        this.heldLength = n;
        this.stats.rxHeld++;
        this.stopWatch();
        return;
      }
    }
  }

  /** Try the held frame again after the guest changed the ring or the receiver state. */
  private retryHeld(): void {
    if (this.heldLength === 0) return;
    if (this.deliver(this.heldLength) === "full") return;
    this.heldLength = 0;
    this.resumeWatch();
  }

  /** Forget a held frame (receiver stopped, reset) and read the port again. */
  private releaseHeld(): void {
    if (this.heldLength === 0) return;
    this.heldLength = 0;
    this.stats.rxDropped++;
    this.resumeWatch();
  }

  private resumeWatch(): void {
    if (this.watch === undefined && this.port !== undefined && !this.rxLimited) this.watch = this.services.loop.watch(this.port.fd, this.onReadable);
  }

  /** Put `rxFrame[0..len)` into the ring. */
  private deliver(len: number): "ok" | "dropped" | "full" {
    const f = this.rxFrame;
    if (!this.receiverRunning() || len < 6 || len > MAX_RX_FRAME) {
      this.stats.rxDropped++;
      return "dropped";
    }
    const group = (f[0]! & 1) !== 0;
    if (!this.accepts(f, group)) {
      this.stats.rxFiltered++;
      return "dropped";
    }
    const ring = this.pstop - this.pstart;
    if (ring <= 0 || this.curr < this.pstart || this.curr >= this.pstop) {
      this.stats.rxDropped++;
      this.missed();
      return "dropped";
    }
    // BNRY may lie outside the ring: lib8390 writes next_frame - 1, which is PSTART - 1 when the next frame starts
    // at PSTART; the chip only compares it with the page it is about to write, so that means PSTOP - 1. (Until the
    // twenty-fifth session such a BNRY dropped every frame, with an overrun each, once 52 pages had come in.)
    const bnry = this.pstart + ((((this.bnry - this.pstart) % ring) + ring) % ring);
    if (len < MIN_FRAME) {
      f.fill(0, len, MIN_FRAME);
      len = MIN_FRAME;
    }
    const pages = (len + 4 + 4 + 255) >> 8;
    let distance = (bnry - this.curr + ring) % ring;
    if (distance === 0) distance = ring;
    if (pages > distance - 1) {
      if (this.rxFullPolicy === "hold" && pages <= ring - 2) return "full";
      this.stats.rxDropped++;
      this.missed();
      return "dropped";
    }
    let next = this.curr + pages;
    if (next >= this.pstop) next -= ring;
    const status = RSR_PRX | (group ? RSR_PHY : 0);
    const count = len + 4;
    // Header, then data, wrapping from PSTOP to PSTART.
    const stopAddr = this.pstop << 8;
    const wrap = ring << 8;
    let a = this.curr << 8;
    this.cardWrite(a, status);
    this.cardWrite(a + 1, next);
    this.cardWrite(a + 2, count & 0xff);
    this.cardWrite(a + 3, count >> 8);
    a += 4;
    for (let i = 0; i < len; i++) {
      if (a >= stopAddr) a -= wrap;
      this.cardWrite(a, f[i]!);
      a++;
    }
    this.curr = next;
    this.rsr = status;
    this.isr |= ISR_PRX;
    this.rxUnseen = true;
    this.stats.rxFrames++;
    this.updateIrq();
    return "ok";
  }

  private missed(): void {
    const c = this.counters;
    if (c[2]! < COUNTER_MAX) c[2] = c[2]! + 1;
    this.rsr = 0x10; // MPA
    this.isr |= ISR_OVW | (c[2]! >= 0x80 ? ISR_CNT : 0);
    this.updateIrq();
  }

  private accepts(f: Uint8Array, group: boolean): boolean {
    if (!group) {
      if ((this.rcr & RCR_PRO) !== 0) return true;
      const p = this.par;
      return f[0] === p[0] && f[1] === p[1] && f[2] === p[2] && f[3] === p[3] && f[4] === p[4] && f[5] === p[5];
    }
    if (f[0] === 0xff && f[1] === 0xff && f[2] === 0xff && f[3] === 0xff && f[4] === 0xff && f[5] === 0xff) return (this.rcr & RCR_AB) !== 0;
    if ((this.rcr & RCR_AM) === 0) return false;
    const index = ethernetCrc(f) >>> 26;
    return (this.mar[index >> 3]! & (1 << (index & 7))) !== 0;
  }

  // --- interrupt --------------------------------------------------------------------------------

  private updateIrq(): void {
    const pending = (this.isr & this.imr & 0x7f) !== 0;
    this.pci.setInterruptStatus(pending);
    const level = pending && !this.pci.intxDisabled;
    if (level !== this.irqLevel) {
      this.irqLevel = level;
      this.services.intx.setLevel(level);
    }
  }

  // --- saved state ------------------------------------------------------------------------------

  /** The state; a transmit the rate limit holds is sent first (charged, not waited for): a saved state has no TXP. */
  save(): Ne2kPciSaved {
    if (this.txPending) this.sendPending();
    return {
      kind: "ne2k-pci",
      version: 1,
      cr: this.cr,
      pstart: this.pstart,
      pstop: this.pstop,
      bnry: this.bnry,
      tpsr: this.tpsr,
      tbcr: this.tbcr,
      isr: this.isr,
      rsar: this.rsar,
      rbcr: this.rbcr,
      rcr: this.rcr,
      tcr: this.tcr,
      dcr: this.dcr,
      imr: this.imr,
      tsr: this.tsr,
      rsr: this.rsr,
      curr: this.curr,
      par: Array.from(this.par),
      mar: Array.from(this.mar),
      counters: Array.from(this.counters),
      page3: Array.from(this.page3),
      ram: Array.from(this.ram),
      pci: this.pci.saveRegisters(),
    };
  }

  /**
   * Load a saved state (untrusted: every field is checked). Config space is
   * restored by its owner; a frame held for ring space at save time is not
   * part of the state (it counts as lost on the wire).
   */
  restore(saved: unknown): void {
    const r = new SavedStateReader(this.name, saved, "ne2k-pci", 1);
    const byte = (f: string): number => r.int(f, 0, 255);
    const cr = byte("cr");
    if ((cr & (CR_STP | CR_STA)) === 0 || (cr & CR_TXP) !== 0) r.fail("impossible command register");
    const pstart = byte("pstart");
    const pstop = byte("pstop");
    const bnry = byte("bnry");
    const tpsr = byte("tpsr");
    const tbcr = r.int("tbcr", 0, 0xffff);
    const isr = byte("isr");
    const rsar = r.int("rsar", 0, 0xffff);
    const rbcr = r.int("rbcr", 0, 0xffff);
    const rcr = r.int("rcr", 0, 0x3f);
    const tcr = r.int("tcr", 0, 0x1f);
    const dcr = r.int("dcr", 0, 0x7f);
    const imr = r.int("imr", 0, 0x7f);
    const tsr = byte("tsr");
    const rsr = byte("rsr");
    const curr = byte("curr");
    const par = r.bytes("par", 6, 6);
    const mar = r.bytes("mar", 8, 8);
    const counters = r.bytes("counters", 3, 3);
    const page3 = r.bytes("page3", 16, 16);
    const ram = r.bytes("ram", RAM_BYTES, RAM_BYTES);
    this.heldLength = 0;
    this.txPending = false;
    this.rxLimited = false;
    this.cr = cr;
    this.pstart = pstart;
    this.pstop = pstop;
    this.bnry = bnry;
    this.tpsr = tpsr;
    this.tbcr = tbcr;
    this.isr = isr;
    // Not in the state: a pending PRX may be one the guest has not seen (one extra interrupt at worst).
    this.rxUnseen = (isr & ISR_PRX) !== 0;
    this.rsar = rsar;
    this.rbcr = rbcr;
    this.rcr = rcr;
    this.tcr = tcr;
    this.dcr = dcr;
    this.imr = imr;
    this.tsr = tsr;
    this.rsr = rsr;
    this.curr = curr;
    this.par.set(par);
    this.mar.set(mar);
    this.counters.set(counters);
    this.page3.set(page3);
    this.ram.set(ram);
    this.resumeWatch();
    this.irqLevel = false;
    this.services.intx.setLevel(false);
    this.updateIrq();
    this.afterAccess();
  }
}

/** The Ethernet CRC-32 of a destination address (6 bytes) as the 8390 hashes it: MSB-first, bits fed LSB-first, no final inversion. */
export function ethernetCrc(addr: Uint8Array): number {
  let crc = 0xffff_ffff;
  for (let i = 0; i < 6; i++) {
    let b = addr[i]!;
    for (let bit = 0; bit < 8; bit++) {
      const carry = (crc >>> 31) ^ (b & 1);
      crc = (crc << 1) >>> 0;
      if (carry !== 0) crc = (crc ^ 0x04c1_1db7) >>> 0;
      b >>= 1;
    }
  }
  return crc >>> 0;
}
