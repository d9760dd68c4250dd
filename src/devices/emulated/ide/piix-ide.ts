/**
 * The Intel PIIX3 IDE function (82371SB, PCI 8086:7010; datasheet section 2.4
 * and 2.7): two IDE channels in compatibility mode (class 01h/01h, prog-if
 * 80h: legacy ports and ISA IRQ 14/15, bus-master capable, mode not
 * switchable) and an SFF-8038i bus-master engine in BAR4 (16 I/O ports:
 * command, status and descriptor table pointer of the primary channel at 0-7,
 * of the secondary at 8-15).
 *
 * Config space beyond the header: IDETIM (40h primary, 42h secondary) with
 * the IDE decode enable bit 15 set at reset (ata_piix checks 41h/43h bit 7
 * before it uses a channel), and SIDETIM (44h); the timings themselves have
 * no effect here. There is no INTx pin: compatibility mode interrupts are the
 * ISA lines passed in as `primaryIrq` and `secondaryIrq`.
 *
 * The fixed ports are exposed as `isaRegions` for the integrator's port bus:
 * "primary" 1F0h-1F7h, "primary-control" 3F6h, "secondary" 170h-177h,
 * "secondary-control" 376h. A channel decodes them while PCI I/O space is
 * enabled and its IDETIM decode bit is set (otherwise reads float to ones).
 *
 * Devices: an ATA disk (`ata-disk.ts`) or an ATAPI CD/DVD-ROM
 * (`atapi-cdrom.ts`) at each of the four positions, or nothing.
 *
 * Port read shadow (`services.portShadow`): the registers a driver polls
 * between the accesses that do something, which read without side effects
 * (Alternate Status, Status while no interrupt is pending, bus-master command
 * and status of both channels: 45% of the register accesses of Linux's
 * ata_piix doing DMA, measured), are published after every bus request
 * (`afterAccess`: once per string access, not per word) and every deferred
 * transfer, and before an interrupt is raised, so the vCPU answers
 * them without a round trip to the device thread. Status with an interrupt
 * pending is withdrawn: that read acknowledges it, so it must come here.
 *
 * Posted writes (`services.postedWrites`): every register write of the
 * controller needs no answer and shows only through later reads and
 * interrupts, so all its ports take posted writes: the vCPU queues the
 * taskfile, command, control and bus-master writes of a command and goes on.
 *
 * Rate limits (`IdeDriveConfig.limits`): a disk with limits holds a read or
 * write command whose limits are in debt (BSY) until its channel's alarm, a
 * timerfd on the device loop (io-limits.ts's DeviceAlarm, made only when a
 * drive has limits); what reads see is published after it fires.
 */
import { PartisError } from "../../../errors.js";
import type { BlockDevice, BlockRequestRing } from "../../../storage/block-device.js";
import type { IrqLine, SavedDeviceState } from "../../dependencies.js";
import { PostedPortWindow, type PciDeviceServices, type PortReadShadow } from "../../pci/device-thread-services.js";
import { PciConfig, type PciDevice } from "../../pci/pci-config.js";
import { AtaDisk, type SavedAtaDisk } from "./ata-disk.js";
import { AtapiCdrom, type SavedAtapiCdrom } from "./atapi-cdrom.js";
import { BusMasterChannel, type DmaQueue, type DmaScheduler, type SavedBusMaster } from "./bus-master.js";
import { IdeChannel, type SavedIdeChannel } from "./ide-channel.js";
import { DeviceAlarm, DiskThrottle, hasDiskIoLimits, type Clock, type DiskIoLimits } from "../../io-limits.js";
import { AbsentDevice, type DeviceHost, type IdeDevice } from "./ide-device.js";
import { FieldReader } from "./saved-fields.js";

/** A bad drive list (construction time, not guest input). */
export class IdeConfigError extends PartisError {}

export interface IdeDriveConfig {
  readonly channel: 0 | 1;
  readonly unit: 0 | 1;
  readonly kind: "disk" | "cdrom";
  /** The disk image (required for a disk); a CD-ROM may be empty. */
  readonly device: BlockDevice | undefined;
  /** IDENTIFY model string (40 characters at most). */
  readonly model?: string;
  /** IDENTIFY serial number (20 characters at most). */
  readonly serial?: string;
  /** A disk whose writes are stable when they complete (cache=writethrough, directsync): its write cache starts off. */
  readonly writeThrough?: boolean;
  /** A disk's IOPS and bandwidth limits (Hyper-V's Storage QoS on an IDE disk; Proxmox's iops/mbps). */
  readonly limits?: DiskIoLimits;
}

export interface PiixIdeOptions {
  readonly primaryIrq: IrqLine;
  readonly secondaryIrq: IrqLine;
  readonly drives: readonly IdeDriveConfig[];
  /**
   * Where DMA transfers go when the disk can queue them (an io_uring): the
   * device thread then never waits for the disk. The integrator watches the
   * ring's completions and calls `completeQueued()`.
   */
  readonly ring?: BlockRequestRing;
  /** The rate limits' millisecond clock (tests give their own). */
  readonly clock?: Clock;
}

export interface IsaRegion {
  readonly name: string;
  readonly start: number;
  readonly length: number;
}

export interface SavedPiixIdeChannel extends SavedIdeChannel {
  readonly busMaster: SavedBusMaster;
  readonly disks: readonly (SavedAtaDisk | null)[];
  readonly cdroms: readonly (SavedAtapiCdrom | null)[];
}

export interface SavedPiixIde extends SavedDeviceState {
  readonly kind: "piix-ide";
  readonly version: 1;
  readonly pci: { bytes: number[]; barAddress: number[] };
  readonly channels: readonly SavedPiixIdeChannel[];
}

export const PIIX3_IDE_VENDOR = 0x8086;
export const PIIX3_IDE_DEVICE = 0x7010;
/** Mass storage / IDE / compatibility mode on both channels, bus master. */
export const PIIX3_IDE_CLASS = 0x010180;
export const BUS_MASTER_BAR = 4;

const IDETIM = 0x40;
const SIDETIM = 0x44;
const IDETIM_DECODE = 0x8000;

/** Per channel: Status (command block offset 7) and Alternate Status ports; bus-master registers at BAR4 + 8 * channel + 0 / 2. */
const STATUS_PORT = [0x1f7, 0x177] as const;
const ALT_STATUS_PORT = [0x3f6, 0x376] as const;
const BM_SHADOWED = [0, 2, 8, 10] as const;

const REGIONS: readonly IsaRegion[] = [
  { name: "primary", start: 0x1f0, length: 8 },
  { name: "primary-control", start: 0x3f6, length: 1 },
  { name: "secondary", start: 0x170, length: 8 },
  { name: "secondary-control", start: 0x376, length: 1 },
];

function ones(size: 1 | 2 | 4): number {
  return size === 4 ? 0xffff_ffff : size === 2 ? 0xffff : 0xff;
}

export class PiixIde implements PciDevice {
  readonly pci: PciConfig;
  readonly isaRegions: readonly IsaRegion[] = REGIONS;
  readonly channels: readonly [IdeChannel, IdeChannel];
  private readonly shadow: PortReadShadow | undefined;
  /** BAR4's 16 bus-master ports, posted wherever it decodes. */
  private readonly postedBusMaster: PostedPortWindow;
  /** Where BAR4 decoded at the last publish: its shadow entries and posted-write ports follow it. */
  private barBase: number | undefined;
  private readonly ring: BlockRequestRing | undefined;
  /** Each channel's wake-up for commands a rate limit holds (none when no drive has limits). */
  private readonly alarms: readonly DeviceAlarm[];
  /** A completion from the ring, to its channel (token = channel index). */
  private readonly completion = (token: number, result: number): void => this.channels[token]?.busMaster.complete(result);

  constructor(
    readonly name: string,
    services: PciDeviceServices,
    opts: PiixIdeOptions,
  ) {
    const byPosition = new Map<number, IdeDriveConfig>();
    for (const d of opts.drives) {
      if ((d.channel !== 0 && d.channel !== 1) || (d.unit !== 0 && d.unit !== 1))
        throw new IdeConfigError("IDE_BAD_DRIVE", `${name}: drive position ${d.channel}:${d.unit} does not exist`, { device: name });
      if (d.kind !== "disk" && d.kind !== "cdrom")
        throw new IdeConfigError("IDE_BAD_DRIVE", `${name}: drive kind ${String(d.kind)} is not disk or cdrom`, { device: name });
      if (d.kind === "disk" && d.device === undefined)
        throw new IdeConfigError("IDE_BAD_DRIVE", `${name}: the disk at ${d.channel}:${d.unit} has no image`, { device: name });
      const key = d.channel * 2 + d.unit;
      if (byPosition.has(key))
        throw new IdeConfigError("IDE_BAD_DRIVE", `${name}: two drives at ${d.channel}:${d.unit}`, { device: name });
      byPosition.set(key, d);
    }

    this.pci = new PciConfig(
      { vendorId: PIIX3_IDE_VENDOR, deviceId: PIIX3_IDE_DEVICE, classCode: PIIX3_IDE_CLASS, interruptPin: 0 },
      [{ index: BUS_MASTER_BAR, kind: "io", size: 16 }],
    );
    for (let i = IDETIM; i <= SIDETIM; i++) this.pci.writeMask[i] = 0xff;

    const canMaster = (): boolean => this.pci.busMaster;
    const make = (channel: 0 | 1) => (unit: 0 | 1, host: DeviceHost): IdeDevice => {
      const cfg = byPosition.get(channel * 2 + unit);
      if (cfg === undefined) return new AbsentDevice(unit, host);
      const serial = cfg.serial ?? `PARTIS-IDE-${channel}${unit}`;
      if (cfg.kind === "disk") {
        const identity = { model: cfg.model ?? "PARTIS HARDDISK", serial, firmware: "1.0", unit };
        return new AtaDisk(unit, host, cfg.device!, identity, cfg.writeThrough === true, hasDiskIoLimits(cfg.limits) ? new DiskThrottle(cfg.limits, opts.clock) : undefined);
      }
      const identity = { model: cfg.model ?? "PARTIS DVD-ROM", serial, firmware: "1.0", unit };
      return new AtapiCdrom(unit, host, cfg.device, identity);
    };
    this.shadow = services.portShadow;
    const posted = services.postedWrites;
    if (posted !== undefined) for (const r of REGIONS) for (let p = r.start; p < r.start + r.length; p++) posted.accept(p);
    this.postedBusMaster = new PostedPortWindow(posted, 0, 16);
    // With a shadow, what a read sees must be published before the guest can look: after a deferred
    // transfer, and before an interrupt (its handler reads the registers at once).
    const loop: DmaScheduler =
      this.shadow === undefined
        ? services.loop
        : {
            defer: (task) =>
              services.loop.defer(() => {
                try {
                  task();
                } finally {
                  this.publishShadow();
                }
              }),
          };
    const line = (irq: IrqLine): IrqLine =>
      this.shadow === undefined
        ? irq
        : {
            setLevel: (level) => {
              if (level) this.publishShadow();
              irq.setLevel(level);
            },
          };
    this.ring = opts.ring;
    const ring = this.ring;
    const queue = (token: 0 | 1): DmaQueue | undefined => {
      if (ring === undefined) return undefined;
      // Completions that came while submitting are taken at once: the eventfd wakes the loop for them too, finding nothing.
      const submit = (): void => {
        ring.submit();
        ring.reap(this.completion);
      };
      return { io: ring, token, submit, drain: () => ring.drain(this.completion) };
    };
    const limited = opts.drives.some((d) => d.kind === "disk" && hasDiskIoLimits(d.limits));
    const wake = (channel: 0 | 1) => (): void => {
      this.channels[channel].resumeHeld();
      this.publishShadow();
    };
    const alarms: DeviceAlarm[] = [];
    try {
      if (limited) for (const c of [0, 1] as const) alarms.push(new DeviceAlarm(services.loop, wake(c), opts.clock));
      this.alarms = alarms;
      this.channels = [
        new IdeChannel(0, line(opts.primaryIrq), new BusMasterChannel(services.memory, canMaster, loop, queue(0)), make(0), alarms[0]),
        new IdeChannel(1, line(opts.secondaryIrq), new BusMasterChannel(services.memory, canMaster, loop, queue(1)), make(1), alarms[1]),
      ];
      this.pci.onMappingChanged = () => this.publishShadow();
      this.reset();
    } catch (e) {
      for (const a of alarms) a.close(); // nobody else will: the caller gets no controller to close
      throw e;
    }
  }

  reset(): void {
    this.pci.resetRegisters();
    const b = this.pci.bytes;
    b.fill(0, IDETIM, SIDETIM + 1);
    for (const at of [IDETIM, IDETIM + 2]) {
      b[at] = IDETIM_DECODE & 0xff;
      b[at + 1] = IDETIM_DECODE >>> 8;
    }
    for (const c of this.channels) c.reset();
    this.publishShadow();
  }

  /**
   * The ring's completions have come (its event fired): each ends its
   * channel's transfer (data, status, interrupt), then what reads see is
   * published.
   */
  completeQueued(): void {
    const ring = this.ring;
    if (ring === undefined) return;
    ring.takeEvent();
    if (ring.reap(this.completion) > 0) this.publishShadow();
  }

  /** Wait for every transfer on the ring (before the ring is closed). */
  quiesce(): void {
    for (const c of this.channels) c.busMaster.awaitFlight();
    this.publishShadow();
  }

  /** Teardown: the rate limits' timers are closed (after quiesce). */
  close(): void {
    for (const a of this.alarms) a.close();
  }

  /** Commands a rate limit held, both channels (`PARTIS_STATS`). */
  get throttled(): number {
    let n = 0;
    for (const c of this.channels) for (const d of c.devices) if (d instanceof AtaDisk) n += d.throttled;
    return n;
  }

  /** Both engines' transfer counters (`PARTIS_STATS`). */
  dmaStats(): Readonly<Record<"dmaQueued" | "dmaShortCompletions" | "dmaHost" | "dmaViews", number>> {
    const [a, b] = [this.channels[0].busMaster, this.channels[1].busMaster];
    return {
      dmaQueued: a.queuedTransfers + b.queuedTransfers,
      dmaShortCompletions: a.shortCompletions + b.shortCompletions,
      dmaHost: a.hostTransfers + b.hostTransfers,
      dmaViews: a.viewTransfers + b.viewTransfers,
    };
  }

  /** State report lines (`kill -QUIT` on `partis run`): what each channel's selected drive and engine are doing. */
  describeState(): string[] {
    return this.channels.map((c) => {
      const d = c.devices[c.select];
      const drive = d.present ? `${d.kind} ${c.select} status 0x${d.status.toString(16)}${d.irqPending ? " interrupt pending" : ""}` : "no drive selected";
      return `${this.name} channel ${c.index}: ${drive}, control 0x${c.control.toString(16)}, ${c.busMaster.describe()}`;
    });
  }

  /** The bus calls this once after each request it routed here (port, config): republish. */
  afterAccess(): void {
    this.publishShadow();
  }

  /**
   * Publish the side-effect-free reads as they stand (see the module comment).
   * A few stores: after each bus request (not each element of a string
   * access), each deferred transfer, before each interrupt, after a reset,
   * a restore, a save and a medium change.
   */
  private publishShadow(): void {
    this.followBar(this.pci.mappedAddress(BUS_MASTER_BAR));
    const s = this.shadow;
    if (s === undefined) return;
    for (let i = 0; i < 2; i++) {
      const ch = i as 0 | 1;
      const c = this.channels[ch];
      if (!this.decodes(ch)) {
        s.publish(STATUS_PORT[ch], 0xff);
        s.publish(ALT_STATUS_PORT[ch], 0xff);
        continue;
      }
      const status = c.peekStatus();
      if (status < 0) s.withdraw(STATUS_PORT[ch]);
      else s.publish(STATUS_PORT[ch], status);
      s.publish(ALT_STATUS_PORT[ch], c.readControl());
    }
    const base = this.barBase;
    if (base !== undefined) for (const off of BM_SHADOWED) s.publish(base + off, this.channels[off >> 3]!.busMaster.readByte(off & 7));
  }

  /** BAR4 decodes at `base` now: the old address's shadow entries and posted-write ports go, the new one's posted-write ports come. */
  private followBar(base: number | undefined): void {
    const old = this.barBase;
    if (base === old) return;
    if (old !== undefined && this.shadow !== undefined) for (const off of BM_SHADOWED) this.shadow.withdraw(old + off);
    this.postedBusMaster.moveTo(base);
    this.barBase = base;
  }

  /** The drive at a position (for media changes and diagnostics). */
  drive(channel: 0 | 1, unit: 0 | 1): AtaDisk | AtapiCdrom | undefined {
    const d = this.channels[channel]?.devices[unit];
    return d instanceof AtaDisk || d instanceof AtapiCdrom ? d : undefined;
  }

  /** Insert or remove the disc of the CD-ROM at a position. */
  changeMedium(channel: 0 | 1, unit: 0 | 1, disc: BlockDevice | undefined): void {
    const d = this.drive(channel, unit);
    if (!(d instanceof AtapiCdrom))
      throw new IdeConfigError("IDE_NOT_CDROM", `${this.name}: no CD-ROM at ${channel}:${unit}`, { device: this.name });
    this.channels[channel].busMaster.awaitFlight();
    d.changeMedium(disc);
    this.publishShadow();
  }

  private decodes(channel: 0 | 1): boolean {
    if (!this.pci.ioEnabled) return false;
    const at = IDETIM + channel * 2;
    return ((this.pci.bytes[at]! | (this.pci.bytes[at + 1]! << 8)) & IDETIM_DECODE) !== 0;
  }

  // Legacy ports -----------------------------------------------------------------

  isaRead(region: string, offset: number, size: 1 | 2 | 4): number {
    switch (region) {
      case "primary":
        return this.decodes(0) ? this.channels[0].readCommandBlock(offset, size) : ones(size);
      case "secondary":
        return this.decodes(1) ? this.channels[1].readCommandBlock(offset, size) : ones(size);
      case "primary-control":
        return this.decodes(0) && offset === 0 ? this.controlRead(0, size) : ones(size);
      case "secondary-control":
        return this.decodes(1) && offset === 0 ? this.controlRead(1, size) : ones(size);
      default:
        return ones(size);
    }
  }

  isaWrite(region: string, offset: number, size: 1 | 2 | 4, value: number): void {
    switch (region) {
      case "primary":
        if (this.decodes(0)) this.channels[0].writeCommandBlock(offset, size, value);
        return;
      case "secondary":
        if (this.decodes(1)) this.channels[1].writeCommandBlock(offset, size, value);
        return;
      case "primary-control":
        if (this.decodes(0) && offset === 0) this.channels[0].writeControl(value & 0xff);
        return;
      case "secondary-control":
        if (this.decodes(1) && offset === 0) this.channels[1].writeControl(value & 0xff);
        return;
    }
  }

  /**
   * A string read of a legacy port (`rep insw` on the data port: a sector in
   * one request): whole elements of the current DRQ block at once. Returns
   * how many it moved; 0 for any other port (the bus then reads element by
   * element).
   */
  isaReadString(region: string, offset: number, size: 1 | 2 | 4, count: number, into: Uint8Array, at: number): number {
    if (offset !== 0 || size === 1) return 0;
    const ch = region === "primary" ? 0 : region === "secondary" ? 1 : undefined;
    if (ch === undefined || !this.decodes(ch)) return 0;
    return this.channels[ch].readDataString(size, count, into, at);
  }

  /** A control block read: Alternate Status in the low byte; a wider access floats above it. */
  private controlRead(channel: 0 | 1, size: 1 | 2 | 4): number {
    const v = this.channels[channel].readControl();
    return size === 1 ? v : ((ones(size) & ~0xff) | v) >>> 0;
  }

  // BAR4: bus master -------------------------------------------------------------

  barRead(bar: number, offset: number, size: 1 | 2 | 4): number {
    if (bar !== BUS_MASTER_BAR || offset < 0 || offset + size > 16) return ones(size);
    let v = 0;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      v |= this.channels[at >> 3]!.busMaster.readByte(at & 7) << (8 * i);
    }
    return v >>> 0;
  }

  barWrite(bar: number, offset: number, size: 1 | 2 | 4, value: number): void {
    if (bar !== BUS_MASTER_BAR || offset < 0 || offset + size > 16) return;
    for (let i = 0; i < size; i++) {
      const at = offset + i;
      const channel = this.channels[at >> 3]!;
      if (channel.busMaster.writeByte(at & 7, (value >>> (8 * i)) & 0xff)) channel.busMasterStarted();
    }
  }

  /**
   * Load a saved state (untrusted: every field is checked, and nothing changes
   * unless all of it is valid). Config space is restored by its owner, as for
   * the other PCI models; the drives' images are the ones given at construction.
   * INTRQ lines are re-driven to the restored levels.
   */
  restore(saved: unknown): void {
    const r = new FieldReader(this.name, "", saved);
    r.oneOf("kind", ["piix-ide"]);
    r.int("version", 1, 1);
    const channels = r.children("channels", 2);
    const applies = this.channels.map((c, i) => {
      const cr = channels[i];
      if (cr === null || cr === undefined) return r.fail(`channel ${i} is missing`);
      return c.checkSaved(cr);
    });
    for (const a of applies) a();
    this.publishShadow();
  }

  /** Starts any command a rate limit holds and runs any owed DMA transfer first (its data and completion belong in the state). */
  save(): SavedPiixIde {
    for (const c of this.channels) {
      c.resumeHeld(true);
      c.busMaster.settle();
    }
    this.publishShadow();
    return {
      kind: "piix-ide",
      version: 1,
      pci: this.pci.saveRegisters(),
      channels: this.channels.map((c) => ({
        ...c.save(),
        busMaster: c.busMaster.save(),
        disks: c.devices.map((d) => (d instanceof AtaDisk ? d.saveDisk() : null)),
        cdroms: c.devices.map((d) => (d instanceof AtapiCdrom ? d.saveCdrom() : null)),
      })),
    };
  }
}
