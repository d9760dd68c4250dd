/**
 * A tiny `partis` entry with only the disk verbs, for the CLI tests
 * (node dist/test/storage/tools/cli-entry.js disk <verb> ...).
 */
import { Command } from "commander";
import { registerDiskCommands } from "../../../src/cli/disk-command.js";

const program = new Command("partis");
registerDiskCommands(program);
await program.parseAsync(process.argv);
