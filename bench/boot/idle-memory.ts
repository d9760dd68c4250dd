/**
 * A VM's memory over time while its guest sits idle at its shell: one VMM
 * boots the default guest (same kernel, initrd, command line and 256 MiB as
 * bench/boot/boot-time.ts), and from the init marker on its process's memory
 * is read at the given times: RSS − guest RAM (RssShmem), the private part
 * (RssAnon), program files (RssFile) and transparent huge pages in private
 * memory (AnonHugePages). Shows what settles after boot (V8's memory reducer,
 * program pages faulted back in) and what creeps (khugepaged collapsing
 * ranges into 2 MiB pages where the host's THP policy is "always").
 *
 * Inside the nested test host (this machine's KVM is PVM), several VMMs side
 * by side in one run:
 *   node dist/partis/partis.js host nested -- sh -c 'node dist/bench/boot/idle-memory.js --vmm partis & node dist/bench/boot/idle-memory.js --vmm qemu-q35; wait'
 * `--vmm partis|partis-worker|partis-native-main|qemu-q35` (partis: the default,
 * `--vcpu-threads auto`, native-main for this guest); `--at S,S,...` seconds after
 * the marker (default 1.5,60,120,180,240,300).
 */
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { prepareDefaultGuest, GUEST_READY_MARKER } from "../../src/images/default-guest.js";
import { readVmmMemory } from "./vmm-memory.js";

const CLI = fileURLToPath(new URL("../../partis/partis.js", import.meta.url));
const args = process.argv.slice(2);
const option = (name: string): string | undefined => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);
const vmm = option("--vmm") ?? "partis";
const at = (option("--at") ?? "1.5,60,120,180,240,300").split(",").map(Number);
if (at.some((s) => !Number.isFinite(s) || s < 0)) throw new Error(`--at: ${option("--at")} is not a list of seconds`);
const append = "console=ttyS0 panic=-1 quiet";
const memory = "256M";

async function main(): Promise<void> {
  const guest = await prepareDefaultGuest();
  const partis = (extra: string[]) => ({ command: process.execPath, argv: [CLI, "run", "--kernel", guest.kernel, "--initrd", guest.initrd, "--memory", memory, "--append", append, ...extra] });
  const vmms: Record<string, { command: string; argv: string[] }> = {
    partis: partis([]),
    "partis-worker": partis(["--vcpu-threads", "worker"]),
    "partis-native-main": partis(["--vcpu-threads", "native-main"]),
    "qemu-q35": {
      command: "/usr/bin/qemu-system-x86_64",
      argv: ["-M", "q35,memory-backend=ram0", "-object", `memory-backend-memfd,id=ram0,size=${memory}`, "-enable-kvm", "-cpu", "host", "-m", memory, "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", guest.kernel, "-initrd", guest.initrd, "-append", append],
    },
  };
  const run = vmms[vmm];
  if (run === undefined) throw new Error(`--vmm: ${vmm} is not one of ${Object.keys(vmms).join(", ")}`);
  const child = spawn(run.command, run.argv, { stdio: ["pipe", "pipe", "inherit"] });
  try {
    let out = "";
    await new Promise<void>((resolve, reject) => {
      child.on("exit", (code) => reject(new Error(`${vmm} ended (status ${code}) before the marker`)));
      child.stdout!.on("data", (d: Buffer) => {
        out = (out + d.toString("latin1")).slice(-4096);
        if (out.includes(GUEST_READY_MARKER)) resolve();
      });
    });
    const t0 = Date.now();
    for (const s of at) {
      await new Promise((r) => setTimeout(r, Math.max(0, s * 1000 - (Date.now() - t0))));
      const m = readVmmMemory(child.pid!);
      const mib = (k: number) => (k / 1024).toFixed(1);
      console.log(`${vmm} +${s}s: overhead ${mib(m.overheadKiB)} MiB, private ${mib(m.privateKiB)}, program files ${mib(m.fileKiB)}, huge pages ${mib(m.hugeKiB)}`);
    }
  } finally {
    child.kill("SIGKILL");
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exit(1);
});
