/**
 * `partis host nested [--memory 6G] [--cpus 2] -- <command…>`: runs a command
 * inside the nested test host (QEMU TCG with emulated AMD-V) and exits with its
 * status.
 */
import type { Command } from "commander";
import { resolve } from "node:path";
import { UsageError } from "../errors.js";
import { runNested } from "./nested-host.js";

export function registerNestedCommand(host: Command): Command {
  return host
    .command("nested")
    .description("run a command inside the nested test host (Linux with kvm-amd under QEMU TCG)")
    .option("--memory <size>", "nested host memory (QEMU -m syntax)", "6G")
    .option("--cpus <n>", "nested host vCPUs", "2")
    .option("-v, --verbose", "log the nested host's set-up on stderr")
    .argument("<command...>", "command and arguments (after --)")
    .action(async (command: string[], o: { memory: string; cpus: string; verbose?: boolean }) => {
      const cpus = Number(o.cpus);
      if (!Number.isInteger(cpus) || cpus < 1) throw new UsageError(`--cpus must be a positive integer, got ${o.cpus}`);
      process.stderr.write("partis: nested test host: AMD-V is emulated in software (QEMU TCG), so everything inside is slow\n");
      const status = await runNested({
        command,
        memory: o.memory,
        cpus,
        stdio: "inherit",
        // `partis` inside is this very CLI (bundled or not), as the host's own path names it.
        ...(process.argv[1] !== undefined ? { partis: { node: process.execPath, cli: resolve(process.argv[1]) } } : {}),
        ...(o.verbose ? { log: (l: string) => process.stderr.write(`partis: ${l}\n`) } : {}),
      });
      process.exitCode = status;
    });
}
