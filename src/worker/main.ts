#!/usr/bin/env node
/**
 * partis-worker: one process per running VM. It receives its VmConfig over
 * the Node IPC control channel, runs the VM with the console on its
 * stdin/stdout, reports how the VM ended, and exits with a status the parent
 * reads (WORKER_EXIT). A crash here ends one VM and nothing else.
 */
import { PrestartedThreads } from "./thread-prestart.js";
// Before anything else is loaded: the threads the CLI's hints ask for start loading their modules now.
const prestarted = PrestartedThreads.fromArgv(process.argv);

import type { RunningVm } from "./running-vm.js";
import { WORKER_EXIT, type ControlEvent, type ControlRequest, type VmOutcome } from "./vm-config.js";
import { PartisError } from "../errors.js";
import { bootTrace } from "./boot-trace.js";

// The VM's modules load while the control channel is already listening (a "start" never waits unheard).
const vmModule = import("./running-vm.js").then((m) => {
  bootTrace("worker", "modules loaded");
  return m;
});
vmModule.catch(() => {}); // a load failure is reported when "start" comes (start() awaits it)

function send(event: ControlEvent): void {
  if (process.send !== undefined) process.send(event);
}

function exitFor(outcome: VmOutcome): number {
  if (outcome.kind === "failed") return WORKER_EXIT.failed;
  return outcome.kind === "poweroff" ? WORKER_EXIT.poweroff : outcome.kind === "reset" ? WORKER_EXIT.reset : WORKER_EXIT.crash;
}

let vm: RunningVm | undefined;
let starting = false;
let pendingShutdown = false;

async function start(request: Extract<ControlRequest, { type: "start" }>): Promise<void> {
  bootTrace("worker", "start received");
  try {
    const { RunningVm: Vm } = await vmModule;
    vm = Vm.start(request.config, { consoleFd: 1, prestarted });
    bootTrace("worker", "partition built, guest loaded");
  } catch (e) {
    const code = e instanceof PartisError ? e.code : "WORKER_START_FAILED";
    const message = e instanceof Error ? e.message : String(e);
    send({ type: "error", code, message });
    exitAfterThreads(e instanceof PartisError ? WORKER_EXIT.badConfig : WORKER_EXIT.failed);
    return;
  }
  send({ type: "running", vcpus: request.config.cpus });
  // Read no faster than the guest takes its console input (stdin is paused while it is behind).
  process.stdin.on("data", (d: Buffer) => vm?.consoleInput(d, process.stdin));
  process.stdin.on("error", () => {});
  if (pendingShutdown) vm.pressPowerButton();
  const outcome = await vm.outcome;
  let status: number = exitFor(outcome);
  try {
    await vm.teardown();
  } catch (e) {
    process.stderr.write(`partis-worker: ${e instanceof Error ? e.message : String(e)}\n`);
    status = WORKER_EXIT.failed;
  }
  send({ type: "exited", outcome });
  if (status === WORKER_EXIT.failed) {
    // A vCPU thread is stuck in the kernel: Node would wait for it forever at
    // exit, so end the process the hard way (the parent has the outcome).
    setTimeout(() => process.kill(process.pid, "SIGKILL"), 100);
    return;
  }
  exitAfterThreads(status);
}

/** process.exit once the prestarted threads nobody took are gone (thread-prestart.ts: exiting under one still loading aborts). */
function exitAfterThreads(status: number): void {
  void prestarted.dispose().then(() => process.exit(status));
}

process.on("message", (m: ControlRequest) => {
  switch (m.type) {
    case "start":
      if (!starting) {
        starting = true;
        void start(m);
      }
      break;
    case "shutdown":
      if (vm === undefined) pendingShutdown = true;
      else vm.pressPowerButton();
      break;
    case "stop":
      if (vm === undefined) exitAfterThreads(WORKER_EXIT.poweroff);
      else vm.stop("host-stop");
      break;
  }
});
process.on("disconnect", () => {
  // The parent is gone: nobody can see this VM any more.
  if (vm === undefined) exitAfterThreads(WORKER_EXIT.failed);
  else vm.stop("parent-disconnected");
});
// A state report on standard error (state-report.ts); the VM runs on.
process.on("SIGQUIT", () => vm?.reportState());
for (const sig of ["SIGTERM", "SIGINT", "SIGHUP"] as const) process.on(sig, () => (vm === undefined ? exitAfterThreads(WORKER_EXIT.failed) : vm.stop(`signal ${sig}`)));
