#!/usr/bin/env node
/**
 * partis: the command line. Every error a user can cause ends as one line on
 * stderr and a non-zero status (2 for bad input), never a stack trace.
 */
import { Command, CommanderError } from "commander";
import { PartisError, UsageError, HostCapabilityError } from "../errors.js";
import { registerRunCommand } from "./run-command.js";
import { registerHostCommands } from "./host-command.js";
import { registerNestedCommand } from "../nested/nested-command.js";
import { registerDiskCommands } from "./disk-command.js";

const program = new Command();
program.name("partis").description("Partis: virtual machines on KVM").version("0.1.0");
program.exitOverride();
program.configureOutput({ writeErr: (s) => process.stderr.write(s) });
registerRunCommand(program);
const host = registerHostCommands(program);
registerNestedCommand(host);
registerDiskCommands(program);

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
  await program.parseAsync(process.argv);
} catch (e) {
  fail(e);
}
