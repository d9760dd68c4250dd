/**
 * The Differentiated System Description Table of the Partis board.
 *
 *   \_S5          Package {5, 5, 0, 0}: soft-off writes SLP_TYP=5 | SLP_EN to PM1a_CNT
 *   \_SB.PCI0     PCI root bridge (PNP0A03), bus 0, _CRS windows, _PRT
 *   \_SB.COM1     16550 UART (PNP0501) 0x3F8-0x3FF, IRQ 4
 *   \_SB.KBD_     i8042 keyboard controller (PNP0303) 0x60, 0x64, IRQ 1
 *   \_SB.RTC_     CMOS RTC (PNP0B00) 0x70-0x71, IRQ 8
 *   \_SB.PEVT     pvpanic (QEMU0001) port 0x505
 *   \_SB.Cxxx     one ACPI0007 processor device per vCPU (_UID = MADT processor UID)
 *
 * PCI INTx routing (_PRT, one entry per slot 0..31 and pin INTA..INTD), no link
 * devices: slot S pin P (0 = INTA) goes to IOAPIC GSI 16 + ((S + P) mod 4), so
 * INTx never shares a line with an ISA device. Linux programs these GSIs
 * level-triggered, active-low; KVM's in-kernel IOAPIC ignores polarity, so the
 * device model asserts a line by raising it (KVM_IRQ_LINE level 1 / a level irqfd).
 */
import {
  device,
  dwordMemory,
  eisaId,
  integer,
  io,
  irqNoFlags,
  method,
  name,
  pkg,
  qwordMemory,
  resourceTemplate,
  ret,
  scope,
  string,
  wordBusNumber,
  wordIo,
  concat,
} from "./aml.js";
import { sdt } from "./tables.js";
import type { MemoryPlan } from "../memory-map.js";

export const PCI_INTX_GSI_BASE = 16;
export const PCI_INTX_GSI_COUNT = 4;

/** GSI for PCI slot `slot` (0..31), interrupt pin `pin` (0 = INTA .. 3 = INTD). */
export function pciIntxGsi(slot: number, pin: number): number {
  return PCI_INTX_GSI_BASE + ((slot + pin) % PCI_INTX_GSI_COUNT);
}

/** The SLP_TYP value for S5 that \_S5 announces. */
export const S5_SLP_TYP = 5;

export interface DsdtOptions {
  readonly vcpuCount: number;
  readonly plan: MemoryPlan;
}

function prt(): Uint8Array {
  const entries: Uint8Array[] = [];
  for (let slot = 0; slot < 32; slot++)
    for (let pin = 0; pin < 4; pin++)
      entries.push(pkg(integer(((slot << 16) | 0xffff) >>> 0), integer(pin), integer(0), integer(pciIntxGsi(slot, pin))));
  return pkg(...entries);
}

function pciRoot(plan: MemoryPlan): Uint8Array {
  const m32 = plan.pciMmio32;
  const m64 = plan.pciMmio64;
  const crs = resourceTemplate(
    wordBusNumber({ min: 0, max: 0xff }),
    wordIo({ min: 0x0000, max: 0x0cf7 }),
    io(0x0cf8, 0x0cf8, 1, 8),
    wordIo({ min: 0x0d00, max: 0xffff }),
    dwordMemory({ min: m32.start, max: m32.start + m32.size - 1, cacheability: "non-cacheable" }),
    qwordMemory({ min: BigInt(m64.start), max: BigInt(m64.start) + BigInt(m64.size) - 1n, cacheability: "prefetchable" }),
  );
  return device(
    "PCI0",
    name("_HID", eisaId("PNP0A03")),
    name("_BBN", integer(0)),
    name("_UID", integer(0)),
    name("_CRS", crs),
    name("_PRT", prt()),
  );
}

function legacy(devName: string, hid: string, uid: number, crs: Uint8Array): Uint8Array {
  return device(devName, name("_HID", eisaId(hid)), name("_UID", integer(uid)), name("_CRS", crs));
}

function processors(count: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let i = 0; i < count; i++) {
    const n = `C${i.toString(16).toUpperCase().padStart(3, "0")}`;
    out.push(device(n, name("_HID", string("ACPI0007")), name("_UID", integer(i)), method("_STA", 0, false, ret(integer(0x0f)))));
  }
  return out;
}

export function dsdtAml(o: DsdtOptions): Uint8Array {
  return concat(
    name("\\_S5", pkg(integer(S5_SLP_TYP), integer(S5_SLP_TYP), integer(0), integer(0))),
    scope(
      "\\_SB",
      pciRoot(o.plan),
      legacy("COM1", "PNP0501", 1, resourceTemplate(io(0x3f8, 0x3f8, 1, 8), irqNoFlags(4))),
      legacy("KBD", "PNP0303", 0, resourceTemplate(io(0x60, 0x60, 1, 1), io(0x64, 0x64, 1, 1), irqNoFlags(1))),
      legacy("RTC", "PNP0B00", 0, resourceTemplate(io(0x70, 0x70, 1, 2), irqNoFlags(8))),
      device("PEVT", name("_HID", string("QEMU0001")), name("_UID", integer(0)), name("_CRS", resourceTemplate(io(0x505, 0x505, 1, 1)))),
      ...processors(o.vcpuCount),
    ),
  );
}

/** DSDT revision 2: 64-bit AML integers. */
export function dsdt(o: DsdtOptions): Uint8Array {
  return sdt("DSDT", 2, dsdtAml(o));
}
