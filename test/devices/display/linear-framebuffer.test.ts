/**
 * LinearFramebuffer and struct screen_info: the bytes the kernel reads from
 * boot_params, the PPM snapshot, geometry checks, and loadLinux carrying
 * screen_info into the zero page.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  DEFAULT_FRAMEBUFFER_HEIGHT,
  DEFAULT_FRAMEBUFFER_WIDTH,
  FRAMEBUFFER_GPA,
  FramebufferConfigError,
  LinearFramebuffer,
} from "../../../src/devices/display/linear-framebuffer.js";
import { SCREEN_INFO_SIZE, ScreenInfoError, VIDEO_CAPABILITY, VIDEO_TYPE, encodeScreenInfo, type ScreenInfo } from "../../../src/devices/display/screen-info.js";
import { ChunkedGuestMemory } from "../../../src/machine/guest-memory.js";
import { PLATFORM_MMIO_START, ZERO_PAGE_ADDR, planMemory, MiB } from "../../../src/machine/memory-map.js";
import { LinuxLoadError, loadLinux } from "../../../src/machine/linux-boot.js";
import { makeBzImage } from "../../fixtures/bzimage.js";

function withFramebuffer(options: Parameters<typeof LinearFramebuffer.create>[0], body: (fb: LinearFramebuffer) => void): void {
  const fb = LinearFramebuffer.create(options);
  try {
    body(fb);
  } finally {
    fb.close();
  }
}

test("default framebuffer: 1024x768 XRGB8888 at the start of the platform MMIO window, black", () => {
  withFramebuffer({}, (fb) => {
    assert.equal(FRAMEBUFFER_GPA, PLATFORM_MMIO_START);
    assert.equal(FRAMEBUFFER_GPA, 0xfc00_0000);
    assert.deepEqual([fb.width, fb.height, fb.stride, fb.format, fb.gpa], [DEFAULT_FRAMEBUFFER_WIDTH, DEFAULT_FRAMEBUFFER_HEIGHT, 4096, "XRGB8888", FRAMEBUFFER_GPA]);
    assert.equal(fb.size, 3 * MiB);
    assert.equal(fb.memory.size, 3 * MiB);
    assert.equal(fb.pixels().length, 4096 * 768);
    assert.ok(fb.pixels().every((b) => b === 0));
  });
});

test("screenInfo(): the fields vesafb reads", () => {
  withFramebuffer({}, (fb) => {
    assert.deepEqual(fb.screenInfo(), {
      videoType: VIDEO_TYPE.vesaLfb,
      lfbBase: 0xfc00_0000,
      lfbSize: 3 * MiB,
      lfbWidth: 1024,
      lfbHeight: 768,
      lfbDepth: 32,
      lfbLineLength: 4096,
      red: { size: 8, pos: 16 },
      green: { size: 8, pos: 8 },
      blue: { size: 8, pos: 0 },
      rsvd: { size: 8, pos: 24 },
    });
  });
});

test("encodeScreenInfo: struct screen_info byte layout for VIDEO_TYPE_VLFB", () => {
  withFramebuffer({}, (fb) => {
    const b = encodeScreenInfo(fb.screenInfo());
    assert.equal(b.length, SCREEN_INFO_SIZE);
    const dv = new DataView(b.buffer);
    assert.equal(b[0x0f], 0x23, "orig_video_isVGA = VIDEO_TYPE_VLFB");
    assert.equal(dv.getUint16(0x12, true), 1024, "lfb_width");
    assert.equal(dv.getUint16(0x14, true), 768, "lfb_height");
    assert.equal(dv.getUint16(0x16, true), 32, "lfb_depth");
    assert.equal(dv.getUint32(0x18, true), 0xfc00_0000, "lfb_base");
    assert.equal(dv.getUint32(0x1c, true), 48, "lfb_size in 64 KiB units (VBE)");
    assert.equal(dv.getUint16(0x24, true), 4096, "lfb_linelength");
    assert.deepEqual(Array.from(b.subarray(0x26, 0x2e)), [8, 16, 8, 8, 8, 0, 8, 24], "red/green/blue/rsvd size,pos");
    assert.equal(dv.getUint16(0x2e, true), 0, "vesapm_seg: no protected-mode interface");
    assert.equal(dv.getUint16(0x32, true), 1, "pages");
    assert.equal(dv.getUint32(0x36, true), 0, "capabilities: VGA compatible, 32-bit base");
    assert.equal(dv.getUint32(0x3a, true), 0, "ext_lfb_base");
    // No text mode: the decompressor and vgacon see 0 lines and columns.
    assert.equal(b[0x07], 0, "orig_video_cols");
    assert.equal(b[0x0e], 0, "orig_video_lines");
  });
});

const sample: ScreenInfo = {
  videoType: VIDEO_TYPE.efi,
  lfbBase: 0x1_2345_0000,
  lfbSize: 800 * 600 * 4,
  lfbWidth: 800,
  lfbHeight: 600,
  lfbDepth: 32,
  lfbLineLength: 3200,
  red: { size: 8, pos: 16 },
  green: { size: 8, pos: 8 },
  blue: { size: 8, pos: 0 },
  rsvd: { size: 0, pos: 0 },
};

test("encodeScreenInfo: a base above 4 GiB sets VIDEO_CAPABILITY_64BIT_BASE and ext_lfb_base; EFI counts bytes", () => {
  const b = encodeScreenInfo(sample);
  const dv = new DataView(b.buffer);
  assert.equal(b[0x0f], 0x70);
  assert.equal(dv.getUint32(0x18, true), 0x2345_0000);
  assert.equal(dv.getUint32(0x3a, true), 0x1);
  assert.equal(dv.getUint32(0x36, true), VIDEO_CAPABILITY.base64);
  assert.equal(dv.getUint32(0x1c, true), 800 * 600 * 4, "lfb_size in bytes for EFI");
  const skip = encodeScreenInfo({ ...sample, lfbBase: 0xe000_0000, capabilities: VIDEO_CAPABILITY.skipQuirks });
  assert.equal(new DataView(skip.buffer).getUint32(0x36, true), VIDEO_CAPABILITY.skipQuirks);
  assert.equal(new DataView(skip.buffer).getUint32(0x3a, true), 0);
});

test("encodeScreenInfo refuses values that do not fit their fields", () => {
  const bad: Partial<ScreenInfo>[] = [
    { lfbWidth: 0x10000 },
    { lfbLineLength: 70000 },
    { lfbDepth: -1 },
    { lfbBase: -4096 },
    { lfbBase: 1.5 },
    { lfbSize: 0 },
    { videoType: 0x100 },
    { red: { size: 256, pos: 0 } },
  ];
  for (const b of bad) assert.throws(() => encodeScreenInfo({ ...sample, ...b }), ScreenInfoError, JSON.stringify(b));
});

test("firmware 'efi' announces VIDEO_TYPE_EFI with the size in bytes", () => {
  withFramebuffer({ width: 640, height: 480, firmware: "efi" }, (fb) => {
    const si = fb.screenInfo();
    assert.equal(si.videoType, VIDEO_TYPE.efi);
    const b = encodeScreenInfo(si);
    assert.equal(new DataView(b.buffer).getUint32(0x1c, true), fb.size);
    assert.equal(fb.size, 1_245_184, "640*480*4 rounded up to 64 KiB");
  });
});

test("geometry and placement checks", () => {
  const code = (c: string) => (e: unknown) => e instanceof FramebufferConfigError && e.code === c;
  assert.throws(() => LinearFramebuffer.create({ width: 0 }), code("FRAMEBUFFER_GEOMETRY"));
  assert.throws(() => LinearFramebuffer.create({ width: 100.5 }), code("FRAMEBUFFER_GEOMETRY"));
  assert.throws(() => LinearFramebuffer.create({ width: 16384 }), code("FRAMEBUFFER_GEOMETRY"), "stride beyond 16 bits");
  assert.throws(() => LinearFramebuffer.create({ width: 4096, height: 4096 }), code("FRAMEBUFFER_GEOMETRY"), "more than 16 MiB");
  assert.throws(() => LinearFramebuffer.create({ gpa: 0xfc00_1000 }), code("FRAMEBUFFER_PLACEMENT"));
  assert.throws(() => LinearFramebuffer.create({ gpa: 0xffff_0000 }), code("FRAMEBUFFER_PLACEMENT"), "crosses 4 GiB");
  assert.throws(() => LinearFramebuffer.create({ gpa: 2 ** 33 }), code("FRAMEBUFFER_PLACEMENT"), "vesafb reads a 32-bit base");
  assert.throws(() => LinearFramebuffer.create({ firmware: "bios" as "vesa" }), code("FRAMEBUFFER_FIRMWARE"));
  withFramebuffer({ width: 2048, height: 2048 }, (fb) => assert.equal(fb.size, 16 * MiB));
  withFramebuffer({ width: 1, height: 1 }, (fb) => assert.equal(fb.size, 0x10000));
});

test("pixels(): XRGB8888 little-endian (B, G, R, X); pixel() reads 0xRRGGBB", () => {
  withFramebuffer({ width: 4, height: 2 }, (fb) => {
    const p = fb.pixels();
    p.set([0x30, 0x20, 0x10, 0xff], 0); // (0,0) = #102030, X byte ignored
    p.set([0xff, 0x00, 0x00, 0x00], fb.stride + 3 * 4); // (3,1) = blue
    assert.equal(fb.pixel(0, 0), 0x102030);
    assert.equal(fb.pixel(3, 1), 0x0000ff);
    assert.equal(fb.pixel(1, 0), 0);
    assert.equal(fb.pixel(4, 0), undefined);
    assert.equal(fb.pixel(0, 2), undefined);
    assert.equal(fb.pixel(-1, 0), undefined);
  });
});

test("snapshotPpm(): P6 header, RGB triples in scan order", () => {
  withFramebuffer({ width: 3, height: 2 }, (fb) => {
    fb.fill(0x123456);
    const p = fb.pixels();
    p.set([0x03, 0x02, 0x01, 0x00], 4); // (1,0) = #010203
    p.set([0xcc, 0xbb, 0xaa, 0x99], fb.stride + 8); // (2,1) = #aabbcc
    const ppm = fb.snapshotPpm();
    const header = "P6\n3 2\n255\n";
    assert.equal(new TextDecoder().decode(ppm.subarray(0, header.length)), header);
    assert.deepEqual(Array.from(ppm.subarray(header.length)), [
      0x12, 0x34, 0x56, 0x01, 0x02, 0x03, 0x12, 0x34, 0x56,
      0x12, 0x34, 0x56, 0x12, 0x34, 0x56, 0xaa, 0xbb, 0xcc,
    ]);
    assert.equal(ppm.length, header.length + 3 * 2 * 3);
  });
});

test("attach(handoff()): a second mapping of the same pixels", () => {
  withFramebuffer({ width: 64, height: 64 }, (fb) => {
    const h = fb.handoff();
    assert.deepEqual(structuredClone(h), h);
    const other = LinearFramebuffer.attach(h);
    try {
      fb.pixels().set([1, 2, 3, 4], 64 * 4 * 10);
      assert.deepEqual(Array.from(other.pixels().subarray(64 * 4 * 10, 64 * 4 * 10 + 4)), [1, 2, 3, 4]);
      other.fill(0xabcdef);
      assert.equal(fb.pixel(63, 63), 0xabcdef);
      assert.deepEqual(other.screenInfo(), fb.screenInfo());
    } finally {
      other.close();
    }
    assert.throws(() => LinearFramebuffer.attach({ ...h, height: 1024 }), FramebufferConfigError, "geometry needs more memory than the handoff has");
  });
});

test("loadLinux writes screen_info at boot_params offset 0; without it the bytes stay zero", () => {
  const plan = planMemory(64 * MiB);
  const kernel = makeBzImage(Uint8Array.of(0xf4));
  const withInfo = ChunkedGuestMemory.anonymous(plan.ram);
  withFramebuffer({}, (fb) => {
    const si = encodeScreenInfo(fb.screenInfo());
    const info = loadLinux(withInfo, plan, kernel, undefined, "console=ttyS0", { screenInfo: si });
    assert.equal(info.bootParams, ZERO_PAGE_ADDR);
    assert.deepEqual(Array.from(withInfo.read(info.bootParams, 0x40)), Array.from(si));
    assert.equal(withInfo.read(info.bootParams + 0x0f, 1)[0], 0x23);
    // The rest of the zero page is as before: the setup header copy is still there.
    assert.equal(new DataView(withInfo.read(info.bootParams + 0x202, 4).buffer).getUint32(0, true), 0x53726448);
  });
  const without = ChunkedGuestMemory.anonymous(plan.ram);
  const info = loadLinux(without, plan, kernel, undefined, "console=ttyS0");
  assert.ok(without.read(info.bootParams, 0x40).every((b) => b === 0));
  assert.throws(
    () => loadLinux(ChunkedGuestMemory.anonymous(plan.ram), plan, kernel, undefined, "", { screenInfo: new Uint8Array(0x20) }),
    (e: unknown) => e instanceof LinuxLoadError && e.code === "SCREEN_INFO_SIZE",
  );
});
