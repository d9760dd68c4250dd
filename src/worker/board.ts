/**
 * The virtual motherboard of a Partis VM: the emulated platform devices on
 * their ISA ports and IRQs, the PCI host bridge, all on one IoBus.
 *
 * Every thread of a worker builds its own Board over the same shared state
 * arena (the devices' state lives there), in the same order, so a device has
 * the same bytes in every thread. The thread that powers the machine on calls
 * `powerOn()` once, before any vCPU runs.
 *
 * ISA interrupts: COM1 IRQ4, keyboard IRQ1, aux IRQ12, RTC IRQ8, ACPI SCI
 * IRQ9 (level, active high, per the MADT override).
 */
import { IoBus } from "../machine/bus.js";
import { SharedStateArena } from "../machine/shared-state.js";
import { PciHostBridge } from "../machine/pci-host-bridge.js";
import { Uart16550 } from "../devices/emulated/uart16550.js";
import { I8042 } from "../devices/emulated/i8042.js";
import { CmosRtc } from "../devices/emulated/cmos-rtc.js";
import { AcpiPm } from "../devices/emulated/acpi-pm.js";
import { ResetControl } from "../devices/emulated/reset-control.js";
import { SystemControlPortB } from "../devices/emulated/system-control-port-b.js";
import { Pvpanic } from "../devices/emulated/pvpanic.js";
import type { ByteSink, Clock, IrqLine, PowerControl } from "../devices/dependencies.js";

export const ISA_IRQ = { keyboard: 1, com1: 4, rtc: 8, sci: 9, aux: 12 } as const;

export interface BoardDependencies {
  /** An interrupt line for an ISA IRQ / GSI number. */
  irq(gsi: number): IrqLine;
  readonly console: ByteSink;
  readonly clock: Clock;
  readonly power: PowerControl;
}

export interface BoardConfig {
  readonly memoryBytes: number;
}

export class Board {
  readonly bus = new IoBus();
  readonly com1: Uart16550;
  readonly i8042: I8042;
  readonly rtc: CmosRtc;
  readonly pm: AcpiPm;
  readonly resetControl: ResetControl;
  readonly portB: SystemControlPortB;
  readonly pciHost: PciHostBridge;
  readonly pvpanic: Pvpanic;

  constructor(readonly arena: SharedStateArena, deps: BoardDependencies, config: BoardConfig, initialise: boolean) {
    this.com1 = new Uart16550("com1", arena.allocate(Uart16550.layout), { irq: deps.irq(ISA_IRQ.com1), output: deps.console }, { base: 0x3f8 });
    this.i8042 = new I8042("i8042", arena.allocate(I8042.layout), {
      kbdIrq: deps.irq(ISA_IRQ.keyboard),
      auxIrq: deps.irq(ISA_IRQ.aux),
      power: deps.power,
    });
    this.rtc = new CmosRtc("rtc", arena.allocate(CmosRtc.layout), { irq: deps.irq(ISA_IRQ.rtc), clock: deps.clock }, { ramBytes: config.memoryBytes });
    this.pm = new AcpiPm("acpi-pm", arena.allocate(AcpiPm.layout), { sci: deps.irq(ISA_IRQ.sci), clock: deps.clock, power: deps.power });
    this.resetControl = new ResetControl("reset-control", arena.allocate(ResetControl.layout), { power: deps.power });
    this.portB = new SystemControlPortB("port-b", arena.allocate(SystemControlPortB.layout), { clock: deps.clock });
    this.pciHost = new PciHostBridge({ arena, initialise });
    this.pvpanic = new Pvpanic("pvpanic", arena.allocate(Pvpanic.layout), { power: deps.power });
    for (const d of [this.com1, this.i8042, this.rtc, this.pm, this.resetControl, this.portB, this.pciHost, this.pvpanic]) this.bus.attach(d);
  }

  /** Power-on reset of every device's state (once, before the vCPUs start). */
  powerOn(): void {
    this.com1.reset();
    this.i8042.reset();
    this.rtc.reset();
    this.pm.reset();
    this.resetControl.reset();
    this.portB.reset();
    this.pvpanic.reset();
  }
}
