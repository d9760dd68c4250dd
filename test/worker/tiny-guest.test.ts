/**
 * The whole stack on this host — CLI, worker process, vCPU threads, board,
 * console, power control — with tiny hand-written bzImage guests (they run
 * on PVM too: a few CPL0 instructions through KVM's emulator).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { makeBzImage, makeKernelElf, TRIPLE_FAULT_CODE } from "../fixtures/bzimage.js";
import { available2M, hugePagesUnusable, POOL_2M, reserve2M } from "../fixtures/huge-page-pool.js";
import { noKvm } from "../fixtures/kvm.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "partis-tiny-guest-"));

/** mov dx, port; then for each byte: mov al, b; out dx, al. */
function serialPrint(text: string): number[] {
  const code = [0x66, 0xba, 0xf8, 0x03];
  for (const c of Buffer.from(text, "latin1")) code.push(0xb0, c, 0xee);
  return code;
}
/** mov dx, port; mov ax, value; out dx, ax. */
const outw = (port: number, value: number) => [0x66, 0xba, port & 0xff, port >> 8, 0x66, 0xb8, value & 0xff, value >> 8, 0x66, 0xef];
/** mov dx, port; mov al, value; out dx, al. */
const outb = (port: number, value: number) => [0x66, 0xba, port & 0xff, port >> 8, 0xb0, value, 0xee];
const HALT_LOOP = [0xf4, 0xeb, 0xfd];
const ACPI_S5 = outw(0x604, (5 << 10) | (1 << 13));
/**
 * IER = receive interrupts and MCR = DTR|RTS|OUT2 (Partis feeds COM1 once the guest's driver asks for
 * data both ways, as Linux's 8250 does when its open is complete), then poll LSR until a byte is there.
 * Ends with the 9-byte poll loop itself, so code that follows may jump back into it.
 */
const WAIT_FOR_COM1_BYTE = [
  ...outb(0x3f9, 1),
  ...outb(0x3fc, 0x0b),
  0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7, // poll: mov dx,LSR; in al,dx; test al,1; jz poll
];

function kernelFile(name: string, code: number[]): string {
  const path = join(dir, name);
  writeFileSync(path, makeBzImage(Uint8Array.from(code)));
  return path;
}

let disks = 0;
/** A fresh 1 MiB raw disk image (zeros) in this file's temporary folder. */
function emptyDisk(): string {
  const path = join(dir, `disk${disks++}.raw`);
  writeFileSync(path, Buffer.alloc(1 << 20));
  return path;
}

function run(kernel: string, extra: string[] = []) {
  return spawnSync(process.execPath, [CLI, "run", "--kernel", kernel, "--memory", "64M", ...extra], { encoding: "latin1", input: "", timeout: 120_000 });
}

/** The three ways of giving vCPUs threads (--vcpu-threads): tests of threads and teardown run under each. */
const THREAD_KINDS: readonly { readonly kind: string; readonly args: string[] }[] = [
  { kind: "worker", args: ["--vcpu-threads", "worker"] },
  { kind: "native", args: ["--vcpu-threads", "native"] },
  { kind: "native-main", args: ["--vcpu-threads", "native-main"] },
];

for (const { kind, args } of THREAD_KINDS) {
  test(`guest prints on COM1 and powers off through ACPI S5: status 0 (--vcpu-threads ${kind})`, { skip: noKvm }, () => {
    const r = run(kernelFile("hello", [...serialPrint("HELLO-FROM-GUEST\n"), ...ACPI_S5, ...HALT_LOOP]), args);
    assert.equal(r.stdout, "HELLO-FROM-GUEST\n");
    assert.equal(r.status, 0, r.stderr);
  });
}


test("--kernel-unpack: by default the kernel is unpacked on the host and entered at startup_64; guest keeps the decompressor path", { skip: noKvm }, () => {
  // The bzImage's own 64-bit entry (the decompressor's) and the unpacked kernel print different words.
  const unpackedCode = Uint8Array.from([...serialPrint("UNPACKED\n"), ...ACPI_S5, ...HALT_LOOP]);
  const path = join(dir, "two-entries");
  writeFileSync(path, makeBzImage(Uint8Array.from([...serialPrint("COMPRESSED\n"), ...ACPI_S5, ...HALT_LOOP]), { initSize: 1 << 20, compressedKernel: gzipSync(makeKernelElf(unpackedCode)) }));
  const env = { ...process.env, PARTIS_CACHE: join(dir, "cache") };
  const runWith = (extra: string[]) =>
    spawnSync(process.execPath, [CLI, "run", "--kernel", path, "--memory", "64M", ...extra], { encoding: "latin1", input: "", timeout: 120_000, env });
  const auto = runWith([]);
  assert.equal(auto.stdout, "UNPACKED\n", auto.stderr);
  assert.equal(auto.status, 0);
  assert.match(auto.stderr, /unpacking the gzip kernel/, "the first use says it unpacks");
  const again = runWith(["--kernel-unpack", "host"]);
  assert.equal(again.stdout, "UNPACKED\n");
  assert.equal(again.stderr, "", "the second use comes from the cache, silently");
  const guest = runWith(["--kernel-unpack", "guest"]);
  assert.equal(guest.stdout, "COMPRESSED\n");
  assert.equal(guest.status, 0);
  // A kernel with no payload to unpack: auto boots it compressed; host is bad input.
  const plain = kernelFile("plain-for-unpack", [...serialPrint("PLAIN\n"), ...ACPI_S5, ...HALT_LOOP]);
  assert.equal(run(plain).stdout, "PLAIN\n");
  const refused = run(plain, ["--kernel-unpack", "host"]);
  assert.equal(refused.status, 2);
  assert.match(refused.stderr, /--kernel-unpack host: .* cannot be unpacked on the host/);
  assert.equal(refused.stdout, "");
  const bogus = run(plain, ["--kernel-unpack", "sideways"]);
  assert.equal(bogus.status, 2);
  assert.match(bogus.stderr, /--kernel-unpack: "sideways" is not auto, host or guest/);
});

test("console input sent before the VM exists (a script piped into partis run) reaches the guest", { skip: noKvm }, () => {
  // Wait for input (WAIT_FOR_COM1_BYTE), then echo every received byte until '!', then power off.
  const code = [
    ...WAIT_FOR_COM1_BYTE,
    0x66, 0xba, 0xf8, 0x03, 0xec, 0xee, 0x3c, 0x21, 0x75, 0xed, // mov dx,RBR; in al,dx; out dx,al; cmp al,'!'; jne poll
    ...ACPI_S5, ...HALT_LOOP,
  ];
  const r = spawnSync(process.execPath, [CLI, "run", "--kernel", kernelFile("echo", code), "--memory", "64M"], {
    encoding: "latin1",
    input: "typed early!",
    timeout: 60_000,
    killSignal: "SIGKILL", // SIGTERM would only press the power button, which this guest ignores
  });
  assert.equal(r.stdout, "typed early!", r.stderr);
  assert.equal(r.status, 0);
});

test("--hugepages: guest RAM comes from the host's 2 MiB pool, all of it reserved while the VM runs, given back at exit", { skip: hugePagesUnusable, timeout: 120_000 }, async () => {
  const restore = reserve2M(32);
  try {
    const before = available2M();
    // Print READY, then wait for '!' on COM1, then power off.
    const code = [
      ...serialPrint("READY\n"),
      ...WAIT_FOR_COM1_BYTE,
      0x66, 0xba, 0xf8, 0x03, 0xec, 0x3c, 0x21, 0x75, 0xee, // mov dx,RBR; in al,dx; cmp al,'!'; jne poll
      ...ACPI_S5, ...HALT_LOOP,
    ];
    const child = spawn(process.execPath, [CLI, "run", "--kernel", kernelFile("hugepages", code), "--memory", "64M", "--hugepages"], { stdio: ["pipe", "pipe", "pipe"] });
    const timer = setTimeout(() => child.kill("SIGKILL"), 100_000);
    let stdout = "";
    let stderr = "";
    let during = -1;
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString("latin1")));
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString("latin1");
      if (during < 0 && stdout.includes("READY")) {
        during = available2M();
        child.stdin.write("!");
      }
    });
    const status = await new Promise<number | null>((resolve) => child.on("exit", resolve));
    clearTimeout(timer);
    assert.equal(status, 0, stderr);
    assert.equal(during, before - 32, "64 MiB of guest RAM = 32 pages of 2 MiB, reserved while the guest runs");
    assert.equal(available2M(), before, "given back when the VM exits");
  } finally {
    restore();
  }
});

/** Print BOOT, wait for a byte on COM1, then reset through 0xCF9: partis run boots it again. */
const BOOT_WAIT_RESET = [
  ...serialPrint("BOOT\n"),
  ...WAIT_FOR_COM1_BYTE,
  ...outb(0xcf9, 0x06), ...HALT_LOOP,
];

for (const { kind, args: threadArgs } of THREAD_KINDS) {
  test(`reboots release the old VM: threads, fds, guest RAM mappings and reserved huge pages stay level boot after boot (vCPU and device threads included; --vcpu-threads ${kind})`, { skip: hugePagesUnusable, timeout: 120_000 }, async () => {
    // A pool that holds exactly one guest: a boot that kept the last one's pages could not start.
    const restore = reserve2M(32);
    const pool = `${POOL_2M}/nr_hugepages`;
    const sized = readFileSync(pool, "utf8").trim();
    writeFileSync(pool, String(Number(sized) - (available2M() - 32)));
    try {
      assert.equal(available2M(), 32);
      // --cpus 2, --rng and two disks (virtio-blk and IDE, each with its io_uring): vCPU threads and a
      // device thread that maps guest RAM and opens images and rings, all made anew on every boot.
      const disks = ["virtio", "ide"].map((bus) => {
        const path = join(dir, `reboot-${bus}.raw`);
        writeFileSync(path, Buffer.alloc(1 << 20));
        return ["--disk", `${path},if=${bus}`];
      });
      const args = ["--memory", "64M", "--hugepages", "--cpus", "2", "--rng", ...disks.flat(), ...threadArgs];
      const child = spawn(process.execPath, [CLI, "run", "--kernel", kernelFile("reboot-loop", BOOT_WAIT_RESET), ...args], { stdio: ["pipe", "pipe", "pipe"] });
      const timer = setTimeout(() => child.kill("SIGKILL"), 100_000);
      const held = (): string => {
        const fds = readdirSync(`/proc/${child.pid}/fd`).map((f) => {
          try {
            return readlinkSync(`/proc/${child.pid}/fd/${f}`);
          } catch {
            return "";
          }
        });
        const maps = readFileSync(`/proc/${child.pid}/maps`, "utf8").split("\n");
        const count = (xs: string[], re: RegExp) => xs.filter((x) => re.test(x)).length;
        const threads = readdirSync(`/proc/${child.pid}/task`).length;
        return `threads ${threads}, fds ${fds.length}, vcpu fds ${count(fds, /kvm-vcpu/)}, vm fds ${count(fds, /kvm-vm/)}, image fds ${count(fds, /reboot-.*\.raw/)}, io_urings ${count(fds, /io_uring/)}, guest RAM mappings ${count(maps, /partis-guest-ram/)}`;
      };
      const samples: string[] = [];
      let stdout = "";
      let stderr = "";
      child.stderr.on("data", (d: Buffer) => (stderr += d.toString("latin1")));
      const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));
      child.stdout.on("data", (d: Buffer) => {
        stdout += d.toString("latin1");
        const boots = stdout.split("BOOT").length - 1;
        if (boots > samples.length) {
          samples.push(held());
          if (boots < 5) child.stdin.write("x");
          else child.kill("SIGKILL");
        }
      });
      await exited;
      clearTimeout(timer);
      assert.equal(samples.length, 5, `five boots expected; stdout ${JSON.stringify(stdout)}\nstderr: ${stderr}`);
      // Boot 1 may differ (threads started early); from boot 2 on every boot holds what the one before held.
      assert.deepEqual(samples.slice(2), [samples[1], samples[1], samples[1]], samples.join("\n"));
      assert.match(samples[1]!, /vcpu fds 2, vm fds 1, image fds 2, io_urings 2,/, samples[1]);
    } finally {
      restore();
    }
  });
}

test("a reboot that cannot start again (its huge pages gone meanwhile): status 1 with the reason, not bad input", { skip: hugePagesUnusable, timeout: 120_000 }, async () => {
  const restore = reserve2M(32);
  const pool = `${POOL_2M}/nr_hugepages`;
  try {
    const child = spawn(process.execPath, [CLI, "run", "--kernel", kernelFile("reboot-once", BOOT_WAIT_RESET), "--memory", "64M", "--hugepages"], { stdio: ["pipe", "pipe", "pipe"] });
    const timer = setTimeout(() => child.kill("SIGKILL"), 100_000);
    let stdout = "";
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString("latin1")));
    child.stdout.on("data", (d: Buffer) => {
      stdout += d.toString("latin1");
      if (stdout === "BOOT\n") {
        // Shrink the pool by what was free plus one page: the running guest keeps its pages,
        // and once it lets them go the pool is one page short of the next boot.
        const total = Number(readFileSync(pool, "utf8").trim());
        writeFileSync(pool, String(total - available2M() - 1));
        child.stdin.write("x");
      }
    });
    const status = await new Promise<number | null>((resolve) => child.on("exit", resolve));
    clearTimeout(timer);
    assert.equal(stdout, "BOOT\n");
    assert.equal(status, 1, stderr);
    assert.match(stderr, /the guest rebooted but could not start again: guest RAM needs 32 huge pages of 2 MiB/);
  } finally {
    restore();
  }
});

/** A worker started directly with start-up hints, given `cpus` in its configuration; resolves with its exit status and console. */
function workerWithHints(hints: string[], kernel: string, cpus: number): Promise<{ status: number | null; stdout: string; events: string[] }> {
  const WORKER = fileURLToPath(new URL("../../partis/partis-worker.js", import.meta.url));
  const child = spawn(process.execPath, [WORKER, ...hints], { stdio: ["pipe", "pipe", "pipe", "ipc"] });
  let stdout = "";
  const events: string[] = [];
  child.stdout!.on("data", (d: Buffer) => (stdout += d.toString("latin1")));
  child.on("message", (m: { type: string }) => events.push(m.type));
  child.send({ type: "start", config: { name: "hints", memoryBytes: 64 << 20, cpus, kernelPath: kernel, cmdline: "" } });
  const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
  return new Promise((resolve) =>
    child.on("exit", (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, events });
    }),
  );
}

test("prestarted threads: more or fewer than the VM needs, or a device thread it does not need, still boot and exit cleanly", { skip: noKvm }, async () => {
  const kernel = kernelFile("hello-hints", [...serialPrint("HINTS\n"), ...ACPI_S5, ...HALT_LOOP]);
  // Three vCPU threads and a device thread prestarted for a 1-vCPU VM without devices: the spares are ended (else the worker never exits).
  const extra = await workerWithHints(["--prestart-vcpus", "3", "--prestart-devices"], kernel, 1);
  assert.equal(extra.stdout, "HINTS\n");
  assert.equal(extra.status, 0);
  assert.deepEqual(extra.events, ["running", "exited"]);
  // One prestarted for a 2-vCPU VM: the second is started when the configuration says so.
  const fewer = await workerWithHints(["--prestart-vcpus", "1"], kernel, 2);
  assert.equal(fewer.stdout, "HINTS\n");
  assert.equal(fewer.status, 0);
  // Nonsense hints are ignored.
  const bad = await workerWithHints(["--prestart-vcpus", "-5"], kernel, 1);
  assert.equal(bad.status, 0);
});

for (const { kind, args: threadArgs } of THREAD_KINDS) {
  test(`the VM's threads are named: partis-vcpu0, partis-vcpu1 (ps -T, top -H; --vcpu-threads ${kind})`, { skip: noKvm }, async () => {
    const kernel = kernelFile("named-threads", [...serialPrint("UP\n"), ...HALT_LOOP]);
    const child = spawn(process.execPath, [CLI, "run", "--kernel", kernel, "--memory", "64M", "--cpus", "2", ...threadArgs], { stdio: ["pipe", "pipe", "pipe"] });
    try {
      await new Promise<void>((resolve, reject) => {
        child.stdout!.once("data", () => resolve());
        child.once("exit", (code) => reject(new Error(`partis run exited (${code}) before the guest printed`)));
      });
      // `partis run` is its VM's process; its threads' names are in /proc/<pid>/task/<tid>/comm.
      const names = readdirSync(`/proc/${child.pid}/task`).map((t) => readFileSync(`/proc/${child.pid}/task/${t}/comm`, "utf8").trim());
      assert.ok(names.includes("partis-vcpu0") && names.includes("partis-vcpu1"), names.join(", "));
      // native: the vCPUs' own threads carry those names; one worker, partis-vcpus, handles their exits.
      assert.equal(names.includes("partis-vcpus"), kind === "native", names.join(", "));
    } finally {
      // This guest ignores the power button: pull the plug.
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGKILL");
      await exited;
    }
  });
}

/** PARTIS_STATS=1 on a guest that prints and powers off: vCPU 0's stats line, parsed. */
function vcpu0Stats(args: string[]): Record<string, number> {
  const kernel = kernelFile("stats", [...serialPrint("STATS\n"), ...ACPI_S5, ...HALT_LOOP]);
  const r = spawnSync(process.execPath, [CLI, "run", "--kernel", kernel, "--memory", "64M", ...args], {
    encoding: "latin1",
    input: "",
    timeout: 120_000,
    env: { ...process.env, PARTIS_STATS: "1" },
  });
  assert.equal(r.status, 0, r.stderr);
  const m = /partis-vm: vCPU 0 exits (\{.*\})/.exec(r.stderr);
  assert.ok(m, r.stderr);
  return JSON.parse(m[1]!) as Record<string, number>;
}

test("PARTIS_STATS=1 with --vcpu-threads worker: each vCPU's exits by kind and its CPU time split between KVM_RUN and handling them", { skip: noKvm }, () => {
  const stats = vcpu0Stats(["--vcpu-threads", "worker"]);
  assert.equal(stats["io"], 7, "six COM1 bytes and the PM1a_CNT write");
  assert.ok(stats["inKvmRun"]! > 0 && stats["ioUs"]! > 0, JSON.stringify(stats));
  assert.equal(stats["mmioUs"], undefined, "no MMIO exit, no MMIO time");
});

test("PARTIS_STATS=1 with --vcpu-threads native: each vCPU's exits, and the handling thread's CPU time by kind", { skip: noKvm }, () => {
  const stats = vcpu0Stats(["--vcpu-threads", "native"]);
  assert.equal(stats["io"], 7, "six COM1 bytes and the PM1a_CNT write");
  assert.ok(stats["ioUs"]! > 0, JSON.stringify(stats));
  assert.equal(stats["inKvmRun"], undefined, "KVM_RUN is made on the vCPU's native thread, not timed by the handling thread");
});

test("PARTIS_STATS=1 with --vcpu-threads native-main: each vCPU's exits, handled and timed on the main thread", { skip: noKvm }, () => {
  const stats = vcpu0Stats(["--vcpu-threads", "native-main"]);
  assert.equal(stats["io"], 7, "six COM1 bytes and the PM1a_CNT write");
  assert.ok(stats["ioUs"]! > 0, JSON.stringify(stats));
  assert.equal(stats["inKvmRun"], undefined, "KVM_RUN is made on the vCPU's native thread");
});

test("--vcpu-threads auto (the default): native-main without exit-bound devices, a worker per vCPU with an IDE drive or an NE2000", { skip: noKvm }, () => {
  // Only a vCPU's own worker makes KVM_RUN on the thread that handles its exits, so only it times KVM_RUN (inKvmRun).
  for (const [args, worker, what] of [
    [[], false, "no device"],
    [["--rng"], false, "virtio-rng only"],
    [["--vcpu-threads", "auto", "--rng", "--disk", `${emptyDisk()},if=virtio`], false, "virtio devices, auto named"],
    [["--cdrom", ""], true, "an empty IDE CD-ROM drive"],
    [["--disk", `${emptyDisk()},if=ide`], true, "an IDE disk"],
    [["--nic", "none,model=ne2k"], true, "an NE2000"],
  ] as const) {
    const stats = vcpu0Stats([...args]);
    assert.equal(stats["io"], 7, what);
    if (worker) assert.ok(stats["inKvmRun"]! > 0, `${what}: a worker per vCPU: ${JSON.stringify(stats)}`);
    else assert.equal(stats["inKvmRun"], undefined, `${what}: native-main: ${JSON.stringify(stats)}`);
  }
});

for (const { kind, args: threadArgs } of THREAD_KINDS) {
  test(`SMP: powering off while an AP is still parked in KVM_RUN ends cleanly with status 0 (--vcpu-threads ${kind})`, { skip: noKvm }, () => {
    // The APs never get INIT/SIPI, so their threads stay blocked in KVM_RUN; the
    // worker must kick them out before it can exit.
    const r = run(kernelFile("hello-smp", [...serialPrint("SMP\n"), ...ACPI_S5, ...HALT_LOOP]), ["--cpus", "3", ...threadArgs]);
    assert.equal(r.stdout, "SMP\n");
    assert.equal(r.status, 0, r.stderr);
  });
}

test("guest resets through 0xCF9 with --no-reboot: status 3", { skip: noKvm }, () => {
  const r = run(kernelFile("reset", [...serialPrint("R"), ...outb(0xcf9, 0x06), ...HALT_LOOP]), ["--no-reboot"]);
  assert.equal(r.stdout, "R");
  assert.equal(r.status, 3, r.stderr);
  assert.match(r.stderr, /rebooted \(cf9\)/);
});

test("guest reset through the i8042 reset line with --no-reboot: status 3", { skip: noKvm }, () => {
  const r = run(kernelFile("kbd-reset", [...outb(0x64, 0xfe), ...HALT_LOOP]), ["--no-reboot"]);
  assert.equal(r.status, 3, r.stderr);
  assert.match(r.stderr, /rebooted \(i8042\)/);
});

for (const { kind, args: threadArgs } of THREAD_KINDS) {
  test(`guest reboot without --no-reboot restarts the guest (--vcpu-threads ${kind})`, { skip: noKvm }, async () => {
    const kernel = kernelFile("reboot-loop", [...serialPrint("B"), ...outb(0xcf9, 0x06), ...HALT_LOOP]);
    const child = spawn(process.execPath, [CLI, "run", "--kernel", kernel, "--memory", "64M", ...threadArgs], { stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const status = await new Promise<number | null>((resolve) => {
      child.stdout.on("data", (d: Buffer) => {
        out += d.toString("latin1");
        if ((out.match(/B/g) ?? []).length >= 3) child.kill("SIGINT");
      });
      child.on("exit", (code) => resolve(code));
    });
    assert.ok((out.match(/B/g) ?? []).length >= 3, `expected three boots, console: ${JSON.stringify(out)}, status ${status}, stderr: ${err}`);
    assert.equal(status, 130, "quit by the user");
  });
}

test("triple fault: non-zero status with the reason", { skip: noKvm }, () => {
  const r = run(kernelFile("triple-fault", [...TRIPLE_FAULT_CODE]));
  assert.equal(r.status, 4, r.stderr);
  assert.match(r.stderr, /guest crashed: .*(triple fault|internal error)/);
  // Where the guest died: long mode (EFER.LMA), paging on, at the ud2 (64-bit entry = load address 1 MiB + 0x200).
  const state = /cs=0x[0-9a-f]+ rip=0x([0-9a-f]+) .*cr0=0x([0-9a-f]+) .*efer=0x([0-9a-f]+)/.exec(r.stderr);
  assert.ok(state, r.stderr);
  assert.equal(Number.parseInt(state[1]!, 16), 0x100200, state[0]);
  assert.ok(((Number.parseInt(state[2]!, 16) & 0x8000_0001) >>> 0) === 0x8000_0001, `CR0.PG|PE in ${state[0]}`);
  assert.ok((Number.parseInt(state[3]!, 16) & 0x400) !== 0, `EFER.LMA in ${state[0]}`);
});

/** mov rdi, imm64; mov dword [rdi], imm32 */
const store32 = (gpa: number, value: number) => {
  const a = Buffer.alloc(8);
  a.writeBigUInt64LE(BigInt(gpa));
  const v = Buffer.alloc(4);
  v.writeUInt32LE(value >>> 0);
  return [0x48, 0xbf, ...a, 0xc7, 0x07, ...v];
};

test("--screenshot: pixels the guest stores into the framebuffer come back as a PPM", { skip: noKvm }, () => {
  const FB = 0xfc00_0000;
  const shot = join(dir, "screen.ppm");
  const code = [...store32(FB, 0x00ff0000), ...store32(FB + 4, 0x0000ff00), ...store32(FB + 640 * 4, 0x000000ff), ...serialPrint("FB\n"), ...ACPI_S5, ...HALT_LOOP];
  const r = run(kernelFile("framebuffer", code), ["--framebuffer", "640x480", "--screenshot", shot]);
  assert.equal(r.stdout, "FB\n");
  assert.equal(r.status, 0, r.stderr);
  const ppm = readFileSync(shot);
  const header = "P6\n640 480\n255\n";
  assert.equal(ppm.subarray(0, header.length).toString("latin1"), header);
  const px = (x: number, y: number) => Array.from(ppm.subarray(header.length + (y * 640 + x) * 3, header.length + (y * 640 + x) * 3 + 3));
  assert.deepEqual(px(0, 0), [0xff, 0, 0]);
  assert.deepEqual(px(1, 0), [0, 0xff, 0]);
  assert.deepEqual(px(0, 1), [0, 0, 0xff]);
  assert.deepEqual(px(5, 5), [0, 0, 0]);
});

test("--framebuffer with a malformed or too large size: one line, status 2", () => {
  const k = kernelFile("fb-bad", [...ACPI_S5, ...HALT_LOOP]);
  for (const [arg, re] of [["big", /not WIDTHxHEIGHT/], ["8000x8000", /outside/]] as const) {
    const r = run(k, ["--framebuffer", arg]);
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, re);
    assert.equal(r.stderr.trim().split("\n").length, 1);
  }
});

/** mov dx, port; mov eax, imm32; out dx, eax */
const outl = (port: number, value: number) => {
  const v = Buffer.alloc(4);
  v.writeUInt32LE(value >>> 0);
  return [0x66, 0xba, port & 0xff, port >> 8, 0xb8, ...v, 0xef];
};
/** mov dx, port; in eax, dx; cmp eax, imm32; jne +N (over `then`); then... */
const ifInlEquals = (port: number, value: number, then: number[]) => {
  const v = Buffer.alloc(4);
  v.writeUInt32LE(value >>> 0);
  return [0x66, 0xba, port & 0xff, port >> 8, 0xed, 0x3d, ...v, 0x75, then.length, ...then];
};

for (const { kind, args: threadArgs } of THREAD_KINDS) {
  test(`a PCI device on the device thread answers config reads through 0xCF8/0xCFC (virtio-rng at 00:02.0; --vcpu-threads ${kind})`, { skip: noKvm }, () => {
    const code = [
      ...outl(0xcf8, 0x8000_1000), // bus 0, device 2, function 0, register 0
      ...ifInlEquals(0xcfc, 0x1044_1af4, serialPrint("ID-OK\n")),
      ...outl(0xcf8, 0x8000_1800), // device 3: absent
      ...ifInlEquals(0xcfc, 0xffff_ffff, serialPrint("ABSENT-OK\n")),
      ...ACPI_S5,
      ...HALT_LOOP,
    ];
    const r = run(kernelFile("pci-probe", code), ["--rng", ...threadArgs]);
    assert.equal(r.stdout, "ID-OK\nABSENT-OK\n", r.stderr);
    assert.equal(r.status, 0, r.stderr);
    // Nothing else to say (a prestarted device thread's "loaded" message once came out as "partis-vm: undefined").
    assert.equal(r.stderr, "");
  });
}

for (const { kind, args: threadArgs } of THREAD_KINDS) {
  test(`a device back end that cannot start (channel socket in use by another process): status 1, the reason, the other socket untouched (2 vCPUs, --vcpu-threads ${kind})`, { skip: noKvm }, async () => {
    const { createServer, connect } = await import("node:net");
    const sock = join(dir, `busy-${kind}.sock`);
    const server = createServer(() => {});
    await new Promise<void>((r) => server.listen(sock, r));
    try {
      const k = kernelFile("devices-fail", [...serialPrint("SHOULD-NOT-RUN\n"), ...ACPI_S5, ...HALT_LOOP]);
      const r = await new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, [CLI, "run", "--kernel", k, "--memory", "64M", "--cpus", "2", "--channel", sock, ...threadArgs], { stdio: ["ignore", "pipe", "pipe"] });
        let stdout = "";
        let stderr = "";
        child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
        child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
        child.on("exit", (status) => resolve({ status, stdout, stderr }));
      });
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, /cannot start the devices: .*busy-[\w-]+\.sock is in use/);
      assert.doesNotMatch(r.stdout, /SHOULD-NOT-RUN/);
      await new Promise<void>((resolve, reject) => connect(sock).once("connect", function (this: import("node:net").Socket) {
        this.destroy();
        resolve();
      }).once("error", reject));
    } finally {
      server.close();
    }
  });
}

for (const { kind, args: threadArgs } of THREAD_KINDS) {
  test(`SIGQUIT: a state report of every vCPU (registers, run state, LAPIC) and device (virtqueues), and the VM runs on (--vcpu-threads ${kind})`, { skip: noKvm, timeout: 120_000 }, async () => {
    // vCPU 0 prints, then halts with interrupts off; vCPU 1 is never started by this guest; virtio-rng has no driver.
    const kernel = kernelFile("report", [...serialPrint("UP\n"), ...HALT_LOOP]);
    const child = spawn(process.execPath, [CLI, "run", "--kernel", kernel, "--memory", "64M", "--cpus", "2", "--rng", ...threadArgs], { stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let err = "";
    const reportDone = () => /report: vCPU 0:/.test(err) && /report: vCPU 1:/.test(err) && /report: {3}queue 0:/.test(err);
    const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
    let exitedEarly = false;
    void exited.then(() => (exitedEarly = true));
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no report; console ${JSON.stringify(out)}; stderr ${err}`)), 60_000);
      child.stdout.on("data", (d: Buffer) => {
        out += d.toString("latin1");
        if (out.includes("UP\n")) child.kill("SIGQUIT");
      });
      child.stderr.on("data", (d: Buffer) => {
        err += d.toString();
        if (reportDone()) {
          clearTimeout(timer);
          resolve();
        }
      });
    });
    // The report is a look, not a stop: the VM is still running afterwards.
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(exitedEarly, false, `the VM ended after its report: ${err}`);
    child.kill("SIGINT");
    assert.equal(await exited, 130);
    const line = (re: RegExp) => err.split("\n").find((l) => re.test(l)) ?? "";
    const vcpu0 = line(/report: vCPU 0:/);
    // Halted with interrupts off, in the guest's HLT loop (KVM on PVM emulates HLT and may report it runnable).
    assert.match(vcpu0, /rip=0x[0-9a-f]+ .*rflags=0x2 .*mp_state (halted|runnable); lapic tpr 0x0 isr - irr -/, err);
    // The AP waits for its INIT/SIPI: KVM's "uninitialized" state.
    assert.match(line(/report: vCPU 1:/), /mp_state uninitialized/, err);
    assert.match(line(/report: VM /), /^partis-vm: report: VM \S+: 2 vCPU\(s\), 2 started, power on/, err);
    assert.match(line(/report: rng0/), /^partis-vm: report: rng0: status 0x0, features 0x0, INTx, isr 0$/, err);
    assert.match(line(/report: {3}queue 0:/), /queue 0: not ready; vector none/, err);
    // Where the process's memory is: the kernel's split, then what each thread's V8 isolate holds.
    const proc = /report: process: ([\d.]+) MiB resident: ([\d.]+) private, ([\d.]+) program files, ([\d.]+) shared .*; (\d+) threads$/.exec(line(/report: process:/));
    assert.ok(proc, err);
    assert.ok(Number(proc[2]) > 0 && Number(proc[2]) < Number(proc[1]), `private ${proc[2]} of ${proc[1]} MiB`);
    const isolates = [...err.matchAll(/report: ([\w ]+): V8 heap ([\d.]+) MiB committed \((.*)\), ([\d.]+) MiB in use/g)];
    for (const [, , committed, spaces, used] of isolates) {
      assert.match(spaces!, /old [\d.]+/);
      assert.ok(Number(used) > 0 && Number(used) <= Number(committed), `${used} of ${committed} MiB`);
    }
    // One line per isolate: the main thread, the device thread, and the vCPUs' own (one per vCPU; one for all; none).
    const vcpuIsolates = kind === "worker" ? ["vcpu0 thread", "vcpu1 thread"] : kind === "native" ? ["vcpus thread"] : [];
    assert.deepEqual(isolates.map((m) => m[1]).sort(), ["device thread", "main thread", ...vcpuIsolates].sort(), err);
  });
}

test("console input the guest never reads is not buffered without bound: partis run stops reading its input", { skip: noKvm, timeout: 120_000 }, async () => {
  // This guest never enables COM1's receiver; 32 MiB are offered on standard input.
  const kernel = kernelFile("deaf", [...serialPrint("UP\n"), ...HALT_LOOP]);
  const child = spawn(process.execPath, [CLI, "run", "--kernel", kernel, "--memory", "64M"], { stdio: ["pipe", "pipe", "pipe"] });
  let err = "";
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  child.stdin.on("error", () => {});
  // The guest's bytes come one write at a time: look at everything received so far.
  let out = "";
  await new Promise<void>((resolve) =>
    child.stdout.on("data", (d: Buffer) => {
      out += d.toString("latin1");
      if (out.includes("UP\n")) resolve();
    }),
  );
  const chunk = Buffer.alloc(64 * 1024, 0x61);
  let accepted = 0;
  // Write until the pipe stays full for 2 s (or everything went in, which is the bug).
  await new Promise<void>((resolve) => {
    let stall: NodeJS.Timeout | undefined;
    const pump = (): void => {
      clearTimeout(stall);
      while (accepted < 32 * 1024 * 1024) {
        accepted += chunk.length;
        if (!child.stdin.write(chunk)) {
          stall = setTimeout(resolve, 2000);
          child.stdin.once("drain", pump);
          return;
        }
      }
      resolve();
    };
    pump();
  });
  child.kill("SIGQUIT");
  await new Promise<void>((resolve, reject) => {
    const started = Date.now();
    const check = setInterval(() => {
      if (/console input byte/.test(err) || Date.now() - started > 30_000) {
        clearInterval(check);
        if (/console input byte/.test(err)) resolve();
        else reject(new Error(`no state report after SIGQUIT: ${err}`));
      }
    }, 50);
  });
  const waiting = Number(/(\d+) console input byte\(s\) waiting/.exec(err)?.[1]);
  const rssAnonKb = Number(/RssAnon:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, "utf8"))?.[1]);
  child.kill("SIGINT");
  assert.equal(await exited, 130);
  assert.ok(accepted < 32 * 1024 * 1024, "every byte was taken in");
  assert.ok(waiting > 0 && waiting <= 256 * 1024, `${waiting} bytes queued for a guest that does not read`);
  assert.ok(rssAnonKb < 200 * 1024, `partis run grew to ${rssAnonKb} KiB of private memory`);
});

/**
 * A running guest that waits for a console byte; `partis run`'s RssFile (the program files' resident
 * pages) once its start-up is over, then the byte, the guest's answer and poweroff.
 */
async function programPagesWhileRunning(env: NodeJS.ProcessEnv, after: RegExp): Promise<{ rssFileKiB: number; out: string; status: number | null; err: string }> {
  const kernel = kernelFile("wait-byte", [...WAIT_FOR_COM1_BYTE, ...serialPrint("GOT\n"), ...ACPI_S5, ...HALT_LOOP]);
  const child = spawn(process.execPath, [CLI, "run", "--kernel", kernel, "--memory", "64M"], { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, ...env, PARTIS_TRACE_BOOT: "1" } });
  let err = "";
  let out = "";
  child.stdout.on("data", (d: Buffer) => (out += d.toString("latin1")));
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  await new Promise<void>((resolve) =>
    child.stderr.on("data", (d: Buffer) => {
      err += d.toString();
      if (after.test(err)) resolve();
    }),
  );
  // The guest sits in its poll loop meanwhile (port I/O exits, handled by the vCPU thread).
  await new Promise((r) => setTimeout(r, 500));
  const m = /^RssFile:\s+(\d+) kB/m.exec(readFileSync(`/proc/${child.pid}/status`, "utf8"));
  assert.ok(m);
  child.stdin.write("x");
  const status = await exited;
  return { rssFileKiB: Number(m[1]), out, status, err };
}

test("once the guest runs, the program pages only start-up used leave partis run's RSS; the VM goes on working", { skip: noKvm, timeout: 120_000 }, async (t) => {
  const kept = await programPagesWhileRunning({ PARTIS_KEEP_PROGRAM_PAGES: "1" }, /start gate open/);
  assert.equal(kept.status, 0, kept.err);
  assert.equal(kept.out, "GOT\n");
  assert.doesNotMatch(kept.err, /program pages released/);
  const released = await programPagesWhileRunning({}, /program pages released/);
  assert.equal(released.status, 0, released.err);
  assert.equal(released.out, "GOT\n");
  const m = /program pages released \((\d+) mappings, (\d+) KiB resident\)/.exec(released.err);
  assert.ok(m && Number(m[1]) > 0, released.err);
  t.diagnostic(`RssFile: ${kept.rssFileKiB} KiB kept, ${released.rssFileKiB} KiB released`);
  assert.ok(released.rssFileKiB < kept.rssFileKiB * 0.75, `RssFile ${released.rssFileKiB} KiB released, ${kept.rssFileKiB} KiB kept`);
});
