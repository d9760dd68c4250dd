/**
 * Constants from the specifications the IDE models follow: the ATA/ATAPI-6/7
 * command block and control block registers (ATA-6 section 7), their status
 * and error bits, the ATA command opcodes used by a PC guest, SFF-8038i
 * bus-master registers, and the SCSI/MMC packet opcodes, sense keys and
 * additional sense codes an ATAPI CD-ROM reports (SPC-3, MMC-3).
 */

/** Command block register offsets (from 0x1F0 / 0x170). */
export const REG = {
  data: 0,
  /** Read: Error; write: Features. */
  errorFeatures: 1,
  sectorCount: 2,
  lbaLow: 3,
  lbaMid: 4,
  lbaHigh: 5,
  device: 6,
  /** Read: Status; write: Command. */
  statusCommand: 7,
} as const;

/** Status register bits. */
export const ST = { bsy: 0x80, drdy: 0x40, df: 0x20, dsc: 0x10, drq: 0x08, corr: 0x04, idx: 0x02, err: 0x01 } as const;

/** Error register bits. */
export const ER = { icrc: 0x80, unc: 0x40, mc: 0x20, idnf: 0x10, mcr: 0x08, abrt: 0x04, tk0nf: 0x02, amnf: 0x01 } as const;

/** Device Control register bits (control block, write). */
export const DC = { hob: 0x80, srst: 0x04, nien: 0x02 } as const;

/** Device register bits. */
export const DEV = { lba: 0x40, dev: 0x10 } as const;

/** ATAPI interrupt reason (Sector Count register during PACKET). */
export const IREASON = { cod: 0x01, io: 0x02, rel: 0x04 } as const;

/** ATA command opcodes. */
export const CMD = {
  nop: 0x00,
  deviceReset: 0x08,
  recalibrate: 0x10,
  readSectors: 0x20,
  readSectorsNoRetry: 0x21,
  readSectorsExt: 0x24,
  readDmaExt: 0x25,
  readMultipleExt: 0x29,
  writeSectors: 0x30,
  writeSectorsNoRetry: 0x31,
  writeSectorsExt: 0x34,
  writeDmaExt: 0x35,
  writeMultipleExt: 0x39,
  readVerify: 0x40,
  readVerifyNoRetry: 0x41,
  readVerifyExt: 0x42,
  seek: 0x70,
  executeDiagnostic: 0x90,
  initializeParams: 0x91,
  packet: 0xa0,
  identifyPacket: 0xa1,
  readMultiple: 0xc4,
  writeMultiple: 0xc5,
  setMultiple: 0xc6,
  readDma: 0xc8,
  readDmaNoRetry: 0xc9,
  writeDma: 0xca,
  writeDmaNoRetry: 0xcb,
  standbyImmediate: 0xe0,
  idleImmediate: 0xe1,
  standby: 0xe2,
  idle: 0xe3,
  checkPowerMode: 0xe5,
  sleep: 0xe6,
  flushCache: 0xe7,
  flushCacheExt: 0xea,
  identify: 0xec,
  setFeatures: 0xef,
} as const;

/** SET FEATURES subcommands (Features register). */
export const SETF = {
  enableWriteCache: 0x02,
  transferMode: 0x03,
  disableLookAhead: 0x55,
  disableRevertDefaults: 0x66,
  disableWriteCache: 0x82,
  enableLookAhead: 0xaa,
  enableRevertDefaults: 0xcc,
} as const;

/** SFF-8038i bus-master register offsets within one channel's 8 bytes. */
export const BM = { command: 0, status: 2, prdTable: 4 } as const;
/** Bus-master command bits. */
export const BMCMD = { start: 0x01, toMemory: 0x08 } as const;
/** Bus-master status bits. */
export const BMST = { active: 0x01, error: 0x02, interrupt: 0x04, drive0Dma: 0x20, drive1Dma: 0x40, simplex: 0x80 } as const;

/** SCSI / MMC packet opcodes. */
export const SCSI = {
  testUnitReady: 0x00,
  requestSense: 0x03,
  inquiry: 0x12,
  modeSense6: 0x1a,
  startStopUnit: 0x1b,
  preventAllow: 0x1e,
  readCapacity: 0x25,
  read10: 0x28,
  seek10: 0x2b,
  readToc: 0x43,
  getConfiguration: 0x46,
  getEventStatus: 0x4a,
  readDiscInfo: 0x51,
  readTrackInfo: 0x52,
  modeSense10: 0x5a,
  read12: 0xa8,
  setCdSpeed: 0xbb,
  mechanismStatus: 0xbd,
} as const;

/** SCSI sense keys. */
export const SENSE = { none: 0x0, notReady: 0x2, mediumError: 0x3, illegalRequest: 0x5, unitAttention: 0x6 } as const;

/** Additional sense code << 8 | qualifier. */
export const ASC = {
  none: 0x0000,
  unrecoveredRead: 0x1100,
  invalidOpcode: 0x2000,
  lbaOutOfRange: 0x2100,
  invalidField: 0x2400,
  mediumChanged: 0x2800,
  savingNotSupported: 0x3900,
  noMediumTrayClosed: 0x3a01,
  noMediumTrayOpen: 0x3a02,
  removalPrevented: 0x5302,
} as const;

export const ATA_SECTOR = 512;
export const CD_SECTOR = 2048;
