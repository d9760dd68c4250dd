/**
 * partis: the command line (entered through main.ts). Every error a user can cause ends as one line on
 * stderr and a non-zero status (2 for bad input), never a stack trace.
 *
 * Only the modules of the command family being run are loaded (start-up time
 * matters: `partis run` is on the boot path); `partis --help` loads them all.
 */
import { Command, CommanderError } from "commander";
import { PartisError, UsageError, HostCapabilityError } from "../errors.js";
import { discardEarlyThreads } from "./early-threads.js";

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

/** The one line a user sees for an error, and the exit status (2 for bad input). */
function report(e: unknown): number {
  if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 2;
  const command = process.argv.slice(2).filter((a) => !a.startsWith("-")).slice(0, 2).join(" ");
  const prefix = `partis${command ? " " + command.split(" ")[0] : ""}`;
  if (e instanceof PartisError) {
    process.stderr.write(`${prefix}: ${e.message}\n`);
    const usage = e instanceof UsageError || e instanceof HostCapabilityError || !(e.code.startsWith("KVM_") || e.code === "WORKER_START_FAILED");
    return usage ? 2 : 1;
  }
  const message = e instanceof Error ? e.message : String(e);
  process.stderr.write(`${prefix}: internal error: ${message}\n`);
  if (process.env.PARTIS_DEBUG) console.error(e);
  return 1;
}

/** Report and exit, once `partis run`'s early threads are gone (exiting under a thread still loading koffi aborts the process). */
async function fail(e: unknown): Promise<never> {
  const status = report(e);
  await discardEarlyThreads();
  process.exit(status);
}

process.on("uncaughtException", (e) => void fail(e));
process.on("unhandledRejection", (e) => void fail(e));
try {
  const first = process.argv[2];
  const family = first !== undefined ? families[first] : undefined;
  if (family !== undefined) await family();
  else for (const load of Object.values(families)) await load();
  await program.parseAsync(process.argv);
  await discardEarlyThreads(); // a `partis run` that ended without using them (e.g. --version)
} catch (e) {
  await fail(e);
}
