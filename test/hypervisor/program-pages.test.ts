/** program-pages.ts: which mappings may give their resident pages back, and that doing it leaves the process working. */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { isReleasableProgramMapping, parseSmaps, releaseProgramPages } from "../../src/hypervisor/program-pages.js";
import * as libc from "../../src/hypervisor/libc.js";

const SMAPS = `00400000-00b6f000 r--p 00000000 fe:00 260689                             /usr/bin/node
Size:               7612 kB
Rss:                5912 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
00b72000-025fe000 r-xp 00772000 fe:00 260689                             /usr/bin/node
Rss:               16568 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
0563a000-0563e000 r--p 05239000 fe:00 260689                             /usr/bin/node
Rss:                  16 kB
Anonymous:             8 kB
VmFlags: rd mr mw me ac sd
0563e000-0565d000 rw-p 0523d000 fe:00 260689                             /usr/bin/node
Rss:                 124 kB
Anonymous:            92 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0010000000 rw-s 00000000 00:01 1234                       /memfd:partis-guest-ram (deleted)
Rss:               71648 kB
Anonymous:             0 kB
VmFlags: rd wr sh mr mw me ms sd
7f0010000000-7f0010001000 r--p 00000000 00:01 1235                       /memfd:sealed (deleted)
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f0020000000-7f0020003000 rw-s 00000000 00:0e 77                         anon_inode:kvm-vcpu:0
Rss:                  12 kB
Anonymous:             0 kB
VmFlags: rd wr sh mr mw me ms sd
7f0030000000-7f0030100000 r-xp 00000000 fe:00 999                        /usr/lib/x86_64-linux-gnu/libpinned.so
Rss:                 100 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me lo sd
7f0040000000-7f0040100000 r-xp 00000000 fe:00 998                        /usr/lib/x86_64-linux-gnu/libcold.so
Rss:                   0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
7f0050000000-7f0050100000 r--p 00000000 00:00 0
Rss:                  64 kB
Anonymous:            64 kB
VmFlags: rd mr mw me ac sd
7ffc00000000-7ffc00002000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me de sd
`;

test("parseSmaps reads each mapping's range, permissions, name, Rss, Anonymous and flags", () => {
  const maps = parseSmaps(SMAPS);
  assert.equal(maps.length, 11);
  const text = maps[1]!;
  assert.equal(text.start, 0xb72000n);
  assert.equal(text.end, 0x25fe000n);
  assert.equal(text.perms, "r-xp");
  assert.equal(text.name, "/usr/bin/node");
  assert.equal(text.rssKiB, 16568);
  assert.equal(text.anonymousKiB, 0);
  assert.deepEqual(text.flags, ["rd", "ex", "mr", "mw", "me", "sd"]);
  assert.equal(maps[4]!.name, "/memfd:partis-guest-ram (deleted)");
  assert.equal(maps[9]!.name, "");
  // A mapping whose lines are missing is never released.
  const [bare] = parseSmaps("00400000-00401000 r--p 00000000 fe:00 1 /usr/bin/x\n");
  assert.equal(bare!.anonymousKiB, -1);
  assert.equal(isReleasableProgramMapping(bare!), false);
});

test("only read-only private file mappings with resident pages and no private copies are releasable", () => {
  const releasable = parseSmaps(SMAPS).filter(isReleasableProgramMapping).map((m) => `${m.name} ${m.perms} ${m.start.toString(16)}`);
  // The node binary's tables and text; not its relocated RELRO (private copies), its data,
  // guest RAM or any memfd, a vCPU's kvm_run, a locked library, one with nothing resident,
  // anonymous memory or the vDSO.
  assert.deepEqual(releasable, ["/usr/bin/node r--p 400000", "/usr/bin/node r-xp b72000"]);
});

/** This process's RssFile (KiB). */
function rssFileKiB(): number {
  const m = /^RssFile:\s+(\d+) kB/m.exec(readFileSync("/proc/self/status", "utf8"));
  assert.ok(m, "RssFile in /proc/self/status");
  return Number(m[1]);
}

test("releaseProgramPages: the program files' resident pages leave the RSS and the process goes on working", () => {
  // Work that runs through V8's compilers and builtins, libc (through koffi) and the relocated
  // data of every library: its results before and after must agree.
  const work = (): string => {
    const h = createHash("sha256");
    for (let i = 0; i < 2000; i++) h.update(JSON.stringify({ i, s: String(i * 7919) }));
    const buf = libc.alignedBuffer(8192, 4096);
    buf.fill(0x5a);
    h.update(buf);
    libc.releaseMapping(buf);
    h.update(String(libc.errnoName(libc.Errno.ENOENT)));
    return h.digest("hex");
  };
  const before = work();
  const releasableKiB = parseSmaps(readFileSync("/proc/self/smaps", "utf8"))
    .filter(isReleasableProgramMapping)
    .reduce((sum, m) => sum + m.rssKiB, 0);
  assert.ok(releasableKiB > 4096, `a Node process has megabytes of program pages resident (${releasableKiB} KiB)`);
  // Private copies in file mappings (relocated RELRO, written data), by mapping.
  const privateCopies = (): Map<string, number> =>
    new Map(parseSmaps(readFileSync("/proc/self/smaps", "utf8")).filter((m) => m.name.startsWith("/") && m.anonymousKiB > 0).map((m) => [`${m.name}@${m.start.toString(16)}`, m.anonymousKiB]));
  const copiesBefore = privateCopies();
  const fileBefore = rssFileKiB();
  const r = releaseProgramPages();
  const fileAfter = rssFileKiB();
  assert.ok(r.mappings > 0);
  assert.ok(r.residentKiB >= releasableKiB / 2, `released ${r.residentKiB} KiB of ${releasableKiB}`);
  // Only the pages touched between the release and the read come back.
  assert.ok(fileAfter <= fileBefore - r.residentKiB / 2, `RssFile ${fileBefore} → ${fileAfter} KiB after releasing ${r.residentKiB} KiB`);
  assert.equal(work(), before);
  // Private copies were never dropped: every file mapping that held some holds as many still.
  assert.ok(copiesBefore.size > 0);
  const copiesAfter = privateCopies();
  for (const [mapping, kib] of copiesBefore) assert.ok((copiesAfter.get(mapping) ?? 0) >= kib, `${mapping}: ${kib} KiB of private pages before, ${copiesAfter.get(mapping) ?? 0} after`);
});
