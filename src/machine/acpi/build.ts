/**
 * Writes the board's ACPI tables into the ACPI area of guest RAM (0xE0000-0xFFFFF):
 * RSDP at the start of the area (found by the kernel's BIOS-area scan and handed over
 * in boot_params.acpi_rsdp_addr), then XSDT, RSDT, FADT, FACS, DSDT and MADT.
 */
import type { GuestMemory } from "../guest-memory.js";
import type { MemoryPlan } from "../memory-map.js";
import { dsdt } from "./dsdt.js";
import {
  AcpiTableError,
  facs,
  fadt,
  madt,
  MPS_INTI_ACTIVE_HIGH,
  MPS_INTI_CONFORMS,
  MPS_INTI_LEVEL,
  rsdp,
  rsdt,
  xsdt,
} from "./tables.js";

/** Fixed ACPI hardware of the board (the power-management device implements these ports). */
export const ACPI_PM1A_EVT_PORT = 0x600;
export const ACPI_PM1A_CNT_PORT = 0x604;
export const ACPI_PM_TMR_PORT = 0x608;
export const ACPI_SCI_IRQ = 9;
export const ACPI_RESET_PORT = 0xcf9;
export const ACPI_RESET_VALUE = 0x06;
export const CMOS_CENTURY_INDEX = 0x32;
export const IOAPIC_ID = 0;
export const IOAPIC_GSI_BASE = 0;

export interface AcpiBuildOptions {
  readonly vcpuCount: number;
  readonly plan: MemoryPlan;
}

export interface AcpiTableLocation {
  readonly signature: string;
  readonly address: number;
  readonly length: number;
}

export interface AcpiBuildResult {
  readonly rsdpAddress: number;
  readonly tables: readonly AcpiTableLocation[];
}

export function buildAcpiTables(opts: AcpiBuildOptions, memory: GuestMemory): AcpiBuildResult {
  const { plan, vcpuCount } = opts;
  if (!Number.isInteger(vcpuCount) || vcpuCount < 1 || vcpuCount > 255)
    throw new AcpiTableError("ACPI_BAD_VCPU_COUNT", `vCPU count ${vcpuCount} is outside 1..255`, { vcpuCount });
  const area = plan.acpiArea;
  let next = plan.rsdpAddr + 64; // RSDP (36 bytes) first
  const placed: AcpiTableLocation[] = [];
  const place = (signature: string, bytes: Uint8Array, align = 16): number => {
    const at = Math.ceil(next / align) * align;
    if (at + bytes.length > area.start + area.size)
      throw new AcpiTableError("ACPI_AREA_FULL", `ACPI tables need more than the ${area.size} bytes of the ACPI area (at ${signature})`, {
        vcpuCount,
      });
    memory.write(at, bytes);
    placed.push({ signature, address: at, length: bytes.length });
    next = at + bytes.length;
    return at;
  };

  const facsAddr = place("FACS", facs(), 64);
  const dsdtAddr = place("DSDT", dsdt({ vcpuCount, plan }));
  const fadtAddr = place(
    "FACP",
    fadt({
      dsdtAddress: dsdtAddr,
      facsAddress: facsAddr,
      sciIrq: ACPI_SCI_IRQ,
      pm1aEvtPort: ACPI_PM1A_EVT_PORT,
      pm1aCntPort: ACPI_PM1A_CNT_PORT,
      pmTimerPort: ACPI_PM_TMR_PORT,
      resetPort: ACPI_RESET_PORT,
      resetValue: ACPI_RESET_VALUE,
      centuryCmosIndex: CMOS_CENTURY_INDEX,
    }),
  );
  const madtAddr = place(
    "APIC",
    madt({
      localApicAddress: plan.lapic.start,
      apicIds: Array.from({ length: vcpuCount }, (_, i) => i),
      ioapicId: IOAPIC_ID,
      ioapicAddress: plan.ioapic.start,
      ioapicGsiBase: IOAPIC_GSI_BASE,
      overrides: [
        { irq: 0, gsi: 2, flags: MPS_INTI_CONFORMS },
        { irq: ACPI_SCI_IRQ, gsi: ACPI_SCI_IRQ, flags: MPS_INTI_LEVEL | MPS_INTI_ACTIVE_HIGH },
      ],
      nmiLint: 1,
    }),
  );
  const xsdtAddr = place("XSDT", xsdt([fadtAddr, madtAddr]));
  const rsdtAddr = place("RSDT", rsdt([fadtAddr, madtAddr]));
  memory.write(plan.rsdpAddr, rsdp(rsdtAddr, xsdtAddr));
  placed.unshift({ signature: "RSD PTR ", address: plan.rsdpAddr, length: 36 });
  return { rsdpAddress: plan.rsdpAddr, tables: placed };
}
