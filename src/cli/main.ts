#!/usr/bin/env node
/**
 * partis: the command line (the program itself is cli-program.ts). For
 * `partis run` the VM's worker process is started before anything else is
 * loaded (worker-spawn.ts): its start-up then overlaps the CLI's own.
 */
import { spawnEarlyWorker } from "./worker-spawn.js";

spawnEarlyWorker(process.argv);
await import("./cli-program.js");
