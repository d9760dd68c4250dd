/**
 * `partis host nested [--memory 6G] [--cpus 2] -- <command…>`: runs a command
 * inside the nested test host (QEMU TCG with emulated AMD-V) and exits with its
 * status.
 */
import type { Command } from "commander";
import { existsSync, realpathSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { UsageError } from "../errors.js";
import { NESTED_QEMU_MIN_MAJOR, nestedHostQemu, qemuTooOldForNestedHost, runNested } from "./nested-host.js";

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
      const qemu = nestedHostQemu();
      const version = qemu?.version !== undefined ? `QEMU ${qemu.version} TCG` : "QEMU TCG";
      process.stderr.write(`partis: nested test host: AMD-V is emulated in software (${version}), so everything inside is slow\n`);
      if (qemuTooOldForNestedHost(qemu?.version)) {
        process.stderr.write(
          `partis: warning: QEMU ${qemu?.version} is older than ${NESTED_QEMU_MIN_MAJOR}: the test bed and the benchmarks' QEMU baseline are measured on 10 (docs/guests.md); scripts/setup.sh installs it\n`,
        );
      }
      // Through any symlink (an npm bin link): the script's real place is where its project is.
      const cli = process.argv[1] !== undefined ? realpathSync(resolve(process.argv[1])) : undefined;
      const status = await runNested({
        command,
        memory: o.memory,
        cpus,
        stdio: "inherit",
        // `partis` inside is this very CLI (bundled or not), as the host's own path names it.
        ...(cli !== undefined ? { partis: { node: process.execPath, cli, root: projectRoot(cli) } } : {}),
        ...(o.verbose ? { log: (l: string) => process.stderr.write(`partis: ${l}\n`) } : {}),
      });
      process.exitCode = status;
    });
}

/** The directory of the nearest package.json above the CLI's script (the project: its dist/ and node_modules/). */
function projectRoot(cli: string): string {
  for (let dir = dirname(cli); ; dir = dirname(dir)) {
    if (existsSync(join(dir, "package.json"))) return dir;
    if (dirname(dir) === dir) return dirname(cli);
  }
}
