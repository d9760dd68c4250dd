/**
 * partis: the command line (entered through main.ts). Every error a user can cause ends as one line on
 * stderr and a non-zero status (2 for bad input), never a stack trace.
 *
 * Only the modules of the command family being run are loaded (start-up time
 * matters: `partis run` is on the boot path); `partis --help` loads them all.
 */
import { Command, CommanderError } from "commander";
import { PartisError, UsageError, HostCapabilityError } from "../errors.js";
import { discardEarlyWorker } from "./worker-spawn.js";

const program = new Command();
program.name("partis").description("Partis: virtual machines on KVM").version("0.1.0");
program.exitOverride();
program.configureOutput({ writeErr: (s) => process.stderr.write(s) });

const families: Record<string, () => Promise<void>> = {
  run: async () => {
    (await import("./run-command.js")).registerRunCommand(program);
  },
  host: async () => {
    const host = (await import("./host-command.js")).registerHostCommands(program);
    (await import("../nested/nested-command.js")).registerNestedCommand(host);
  },
  disk: async () => {
    (await import("./disk-command.js")).registerDiskCommands(program);
  },
};

function fail(e: unknown): never {
  if (e instanceof CommanderError) process.exit(e.exitCode === 0 ? 0 : 2);
  const command = process.argv.slice(2).filter((a) => !a.startsWith("-")).slice(0, 2).join(" ");
  const prefix = `partis${command ? " " + command.split(" ")[0] : ""}`;
  if (e instanceof PartisError) {
    process.stderr.write(`${prefix}: ${e.message}\n`);
    const usage = e instanceof UsageError || e instanceof HostCapabilityError || !(e.code.startsWith("KVM_") || e.code === "WORKER_START_FAILED");
    process.exit(usage ? 2 : 1);
  }
  const message = e instanceof Error ? e.message : String(e);
  process.stderr.write(`${prefix}: internal error: ${message}\n`);
  if (process.env.PARTIS_DEBUG) console.error(e);
  process.exit(1);
}

process.on("uncaughtException", fail);
process.on("unhandledRejection", fail);
try {
  const first = process.argv[2];
  const family = first !== undefined ? families[first] : undefined;
  if (family !== undefined) await family();
  else for (const load of Object.values(families)) await load();
  await program.parseAsync(process.argv);
  await discardEarlyWorker(); // a `partis run` that ended without using it (e.g. --version)
} catch (e) {
  await discardEarlyWorker();
  fail(e);
}
