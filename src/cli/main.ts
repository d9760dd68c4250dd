#!/usr/bin/env node
/**
 * partis: the command line (the program itself is cli-program.ts). For
 * `partis run` the VM's threads are started before anything else is loaded
 * (early-threads.ts): their start-up then overlaps the CLI's own.
 */
import { startEarlyThreads } from "./early-threads.js";
import { bootTrace } from "../worker/boot-trace.js";

bootTrace("cli", `entered (${Math.round(performance.now())} ms after the process started)`);
startEarlyThreads(process.argv);
await import("./cli-program.js");
