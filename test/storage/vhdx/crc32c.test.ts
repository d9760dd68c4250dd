import assert from "node:assert/strict";
import { test } from "node:test";
import { crc32c, crc32cWithZeroField } from "../../../src/storage/vhdx/crc32c.js";

test("CRC-32C known vectors", () => {
  assert.equal(crc32c(Buffer.from("123456789")), 0xe3069283);
  assert.equal(crc32c(Buffer.alloc(0)), 0);
  // RFC 3720 (iSCSI) B.4 vectors.
  assert.equal(crc32c(Buffer.alloc(32, 0)), 0x8a9136aa);
  assert.equal(crc32c(Buffer.alloc(32, 0xff)), 0x62a8ab43);
  assert.equal(crc32c(Buffer.from(Array.from({ length: 32 }, (_, i) => i))), 0x46dd794e);
});

test("CRC with a zeroed checksum field equals CRC of the zeroed copy", () => {
  const b = Buffer.from("head\xde\xad\xbe\xefrest of the structure", "latin1");
  const z = Buffer.from(b);
  z.fill(0, 4, 8);
  assert.equal(crc32cWithZeroField(b, 4), crc32c(z));
});
