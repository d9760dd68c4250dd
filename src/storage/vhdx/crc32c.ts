/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table driven, as
 * used by every VHDX checksum (MS-VHDX 2.2.2, 2.2.3.1, 2.3.1.1). Initial value
 * and final XOR are 0xFFFFFFFF, so crc32c("123456789") = 0xE3069283.
 */

const TABLE: Uint32Array = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** Continue a running (pre-inverted) CRC over bytes[start, end). */
export function crc32cUpdate(state: number, bytes: Uint8Array, start = 0, end = bytes.length): number {
  let c = state;
  for (let i = start; i < end; i++) c = TABLE[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

export function crc32c(bytes: Uint8Array, start = 0, end = bytes.length): number {
  return (crc32cUpdate(0xffffffff, bytes, start, end) ^ 0xffffffff) >>> 0;
}

/**
 * CRC-32C of a structure whose 4-byte checksum field at `fieldOffset` counts
 * as zero (how every VHDX checksum is defined), without copying the buffer.
 */
export function crc32cWithZeroField(bytes: Uint8Array, fieldOffset: number, length = bytes.length): number {
  const zero = new Uint8Array(4);
  let c = crc32cUpdate(0xffffffff, bytes, 0, fieldOffset);
  c = crc32cUpdate(c, zero, 0, 4);
  c = crc32cUpdate(c, bytes, fieldOffset + 4, length);
  return (c ^ 0xffffffff) >>> 0;
}
