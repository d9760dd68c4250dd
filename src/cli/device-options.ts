/**
 * `partis run` device flags, parsed and checked before anything starts:
 *
 *   --disk PATH[,if=virtio|ide][,ro][,packed][,cache=MODE]   a disk image (raw, VHD, VHDX) or host block device
 *        cache: writeback (default) | none (O_DIRECT) | writethrough (O_DSYNC) | directsync | unsafe
 *               (flushes ignored), for every format (a differencing disk's parents too)
 *        serial: what the guest reads as the disk's serial number (1-20 printable ASCII characters)
 *        iops, iops_rd, iops_wr: most reads+writes / reads / writes per second (virtio and IDE disks)
 *        mbps, mbps_rd, mbps_wr: most MiB per second read+written / read / written (virtio and IDE disks; decimals allowed)
 *   --cdrom ISO                        an ATAPI CD-ROM on the IDE controller
 *   --nic BACKEND[,model=virtio|ne2k][,mac=52:54:00:..][,packed][,offload=on|off][,queues=N][,mtu=N]
 *        packed: the virtio device also offers packed virtqueues (VIRTIO_F_RING_PACKED)
 *        offload: checksum and TCP segmentation offloads of a virtio NIC on a TAP (default on there; off: none offered)
 *        queues: receive/transmit queue pairs of a virtio NIC on a TAP (1-64, default 1; the TAP is then multi-queue)
 *        mtu: the MTU a virtio NIC reports to the guest (68-65535; longer received frames are dropped)
 *        rate: most MiB per second the NIC moves each way (decimals allowed; a NE2000 at least 0.1)
 *        BACKEND: tap:IFNAME | dgram:LOCAL.sock:PEER.sock | none
 *   --channel SOCKET[,name=NAME]       a host<->guest byte channel on a UNIX socket the VM listens on:
 *        without a name a virtio console of its own (/dev/hvcN in the guest); named channels are the ports
 *        of one virtio-serial device (/dev/vportNpM, /dev/virtio-ports/NAME with udev; at most 31)
 *   --rng                              a virtio entropy source
 *   --vsock SOCKET[,cid=N]             AF_VSOCK stream sockets (virtio-vsock; one per VM; guest CID N, default 3):
 *        the guest's connections to port P go to the UNIX socket SOCKET_P; host programs connect to SOCKET
 *        and write "CONNECT P\n" (Firecracker's convention)
 *
 * Every problem is a UsageError naming the flag and the value.
 */
import { accessSync, constants, existsSync, statSync } from "node:fs";
import { createHash } from "node:crypto";
import { dirname, resolve } from "node:path";
import { PartisError, UsageError } from "../errors.js";
import { CACHE_MODES, type CacheMode } from "../storage/block-device.js";
import { openDisk } from "../storage/open.js";
import { VIRTIO_NET_MAX_QUEUE_PAIRS } from "../devices/net/virtio-net.js";
import { NE2K_MIN_RATE_BYTES_PER_SECOND } from "../devices/net/ne2k-pci.js";
import { VIRTIO_CONSOLE_MAX_NAMED_PORTS, VIRTIO_CONSOLE_PORT_NAME } from "../devices/virtio/virtio-console.js";
import { VSOCK_MAX_GUEST_CID, VSOCK_MIN_GUEST_CID } from "../devices/virtio/virtio-vsock.js";
import type { DiskIoLimits } from "../devices/io-limits.js";
import { DevicePlanError, MAX_IDE_DRIVES, parseMac, planPci, type DeviceSpec, type DiskSpec, type NicBackendSpec } from "../worker/device-plan.js";

export interface DeviceOptions {
  disk?: string[];
  cdrom?: string[];
  nic?: string[];
  channel?: string[];
  rng?: boolean;
  vsock?: string[];
}

function splitSpec(flag: string, value: string): { head: string; opts: Map<string, string | true> } {
  const parts = value.split(",");
  const head = parts.shift() ?? "";
  if (head === "") throw new UsageError(`${flag}: "${value}" has no ${flag === "--nic" ? "backend" : "path"}`);
  const opts = new Map<string, string | true>();
  for (const p of parts) {
    const eq = p.indexOf("=");
    const k = eq < 0 ? p : p.slice(0, eq);
    if (k === "" || opts.has(k)) throw new UsageError(`${flag}: "${value}": option "${p}" is empty or repeated`);
    opts.set(k, eq < 0 ? true : p.slice(eq + 1));
  }
  return { head, opts };
}

function rejectUnknown(flag: string, value: string, opts: Map<string, string | true>, known: readonly string[]): void {
  for (const k of opts.keys()) if (!known.includes(k)) throw new UsageError(`${flag}: "${value}": unknown option "${k}" (known: ${known.join(", ")})`);
}

/** The `cache` option: one of CACHE_MODES. */
function cacheOption(value: string, opts: Map<string, string | true>): CacheMode | undefined {
  const c = opts.get("cache");
  if (c === undefined) return undefined;
  if (c === true || !(CACHE_MODES as readonly string[]).includes(c)) throw new UsageError(`--disk ${value}: cache takes one of ${CACHE_MODES.join(", ")}`);
  return c as CacheMode;
}

/** The `serial` option: 1-20 printable ASCII characters, no spaces (virtio-blk GET_ID and ATA IDENTIFY hold 20). */
function serialOption(value: string, opts: Map<string, string | true>): string | undefined {
  const s = opts.get("serial");
  if (s === undefined) return undefined;
  if (s === true || !/^[\x21-\x7e]{1,20}$/.test(s)) throw new UsageError(`--disk ${value}: serial takes 1 to 20 printable ASCII characters without spaces`);
  return s;
}

const MIB = 1024 * 1024;
/** The disk limit options (Proxmox's names): what each sets, and whether it counts MiB/s (else operations/s). */
const DISK_LIMIT_OPTIONS: Record<string, readonly [keyof DiskIoLimits, boolean]> = {
  iops: ["iops", false],
  iops_rd: ["readIops", false],
  iops_wr: ["writeIops", false],
  mbps: ["bytesPerSecond", true],
  mbps_rd: ["readBytesPerSecond", true],
  mbps_wr: ["writeBytesPerSecond", true],
};

/** A positive rate: a whole number of operations, or a decimal number of MiB (at most 1,000,000 either way). */
function rateOption(what: string, key: string, v: string | true, whole = false): number {
  const ok = v !== true && (whole ? /^[0-9]{1,7}$/ : /^[0-9]{1,7}(\.[0-9]{1,6})?$/).test(v) && Number(v) > 0 && Number(v) <= 1_000_000;
  if (!ok) throw new UsageError(`${what}: ${key}=${v === true ? "" : v} is not a ${whole ? "whole " : ""}number above 0 (at most 1000000)`);
  return Number(v);
}

/** The disk's IOPS and bandwidth limits, when any is given. */
function diskLimitsOption(value: string, o: Map<string, string | true>): DiskIoLimits | undefined {
  const limits: Record<string, number> = {};
  for (const [key, [field, mib]] of Object.entries(DISK_LIMIT_OPTIONS)) {
    const v = o.get(key);
    if (v !== undefined) limits[field] = mib ? rateOption(`--disk ${value}`, key, v) * MIB : rateOption(`--disk ${value}`, key, v, true);
  }
  return Object.keys(limits).length === 0 ? undefined : (limits as DiskIoLimits);
}

/** Check the image opens (format, parents) without changing it. */
function checkDisk(flag: string, path: string, readOnly: boolean, cache?: CacheMode): DiskSpec {
  if (!existsSync(path)) throw new UsageError(`${flag} ${path}: no such file`);
  const st = statSync(path);
  if (st.isDirectory()) throw new UsageError(`${flag} ${path}: is a directory`);
  try {
    accessSync(path, readOnly ? constants.R_OK : constants.R_OK | constants.W_OK);
  } catch {
    throw new UsageError(`${flag} ${path}: not ${readOnly ? "readable" : "readable and writable (add ,ro for read-only)"}`);
  }
  try {
    const d = openDisk(path, { readOnly: true });
    d.close();
  } catch (e) {
    if (e instanceof PartisError) throw new UsageError(`${flag} ${path}: ${e.message.startsWith(path) ? e.message.slice(path.length).replace(/^:\s*/, "") : e.message}`);
    throw e;
  }
  return { path, readOnly, ...(cache !== undefined ? { cache } : {}) };
}

/** The `packed` option: no value, and only on a virtio device (an emulated one has no virtqueues). */
function packedOption(flag: string, value: string, opts: Map<string, string | true>, virtio: boolean): boolean {
  const p = opts.get("packed");
  if (p === undefined) return false;
  if (p !== true) throw new UsageError(`${flag} ${value}: packed takes no value`);
  if (!virtio) throw new UsageError(`${flag} ${value}: packed is for virtio devices (an emulated device has no virtqueues)`);
  return true;
}

function defaultMac(vmName: string, index: number): string {
  // 52:54:00 (locally administered, the prefix KVM tools use) + 3 bytes of a hash of the VM name and NIC index.
  const h = createHash("sha256").update(`${vmName}/${index}`).digest();
  return ["52:54:00", ...[h[0]!, h[1]!, h[2]!].map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

function parseNicBackend(value: string, head: string): NicBackendSpec {
  if (head === "none") return { kind: "none" };
  if (head.startsWith("tap:")) {
    const ifname = head.slice(4);
    if (!/^[A-Za-z0-9_.-]{1,15}$/.test(ifname)) throw new UsageError(`--nic ${value}: "${ifname}" is not a valid interface name (1-15 letters, digits, _ . -)`);
    if (!existsSync("/dev/net/tun")) throw new UsageError(`--nic ${value}: /dev/net/tun is missing (load the tun module)`);
    return { kind: "tap", ifname };
  }
  if (head.startsWith("dgram:")) {
    const rest = head.slice(6).split(":");
    if (rest.length !== 2 || rest[0] === "" || rest[1] === "") throw new UsageError(`--nic ${value}: expected dgram:LOCAL.sock:PEER.sock`);
    for (const p of rest) if (!existsSync(dirname(p!))) throw new UsageError(`--nic ${value}: directory of ${p} does not exist`);
    if (existsSync(rest[0]!) && !statSync(rest[0]!).isSocket()) throw new UsageError(`--nic ${value}: ${rest[0]} exists and is not a socket (refusing to replace it)`);
    if (Buffer.byteLength(rest[0]!) > 107 || Buffer.byteLength(rest[1]!) > 107) throw new UsageError(`--nic ${value}: socket paths are limited to 107 bytes`);
    return { kind: "dgram", local: rest[0]!, peer: rest[1]! };
  }
  throw new UsageError(`--nic ${value}: unknown backend "${head}" (tap:IFNAME, dgram:LOCAL:PEER or none)`);
}

/** A whole-number NIC option within [min, max], for virtio NICs only (`virtio`); undefined when not given. */
function nicNumberOption(value: string, o: Map<string, string | true>, key: string, min: number, max: number, virtio: boolean): number | undefined {
  const v = o.get(key);
  if (v === undefined) return undefined;
  if (!virtio) throw new UsageError(`--nic ${value}: ${key} is for virtio NICs (the NE2000 has one queue and a fixed 1500-byte MTU)`);
  if (v === true || !/^[0-9]{1,6}$/.test(v) || Number(v) < min || Number(v) > max) throw new UsageError(`--nic ${value}: ${key}=${v === true ? "" : v} is not a whole number from ${min} to ${max}`);
  return Number(v);
}

export function resolveDevices(opts: DeviceOptions, vmName: string, cpus: number): DeviceSpec[] {
  const out: DeviceSpec[] = [];
  let ide = 0;
  (opts.disk ?? []).forEach((value, i) => {
    const { head, opts: o } = splitSpec("--disk", value);
    rejectUnknown("--disk", value, o, ["if", "ro", "packed", "cache", "serial", ...Object.keys(DISK_LIMIT_OPTIONS)]);
    const iface = o.get("if") ?? "virtio";
    if (iface !== "virtio" && iface !== "ide") throw new UsageError(`--disk ${value}: if=${String(iface)} is not virtio or ide`);
    if (o.get("ro") !== undefined && o.get("ro") !== true) throw new UsageError(`--disk ${value}: ro takes no value`);
    const packed = packedOption("--disk", value, o, iface === "virtio");
    const serial = serialOption(value, o);
    const checked = checkDisk("--disk", head, o.get("ro") === true, cacheOption(value, o));
    const disk: DiskSpec = serial !== undefined ? { ...checked, serial } : checked;
    const limits = diskLimitsOption(value, o);
    if (iface === "ide") {
      ide++;
      out.push({ kind: "ide-disk", id: `ide-disk${i}`, disk, ...(limits !== undefined ? { limits } : {}) });
    } else out.push({ kind: "virtio-blk", id: `virtio-blk${i}`, disk, queues: cpus, ...(packed ? { ringPacked: true } : {}), ...(limits !== undefined ? { limits } : {}) });
  });
  (opts.cdrom ?? []).forEach((value, i) => {
    ide++;
    out.push({ kind: "ide-cdrom", id: `cdrom${i}`, disk: value === "" ? undefined : checkDisk("--cdrom", value, true) });
  });
  if (ide > MAX_IDE_DRIVES) throw new UsageError(`--disk/--cdrom: ${ide} IDE drives; the IDE controller takes at most ${MAX_IDE_DRIVES}`);
  (opts.nic ?? []).forEach((value, i) => {
    const { head, opts: o } = splitSpec("--nic", value);
    rejectUnknown("--nic", value, o, ["model", "mac", "packed", "offload", "queues", "mtu", "rate"]);
    const model = o.get("model") ?? "virtio";
    if (model !== "virtio" && model !== "ne2k") throw new UsageError(`--nic ${value}: model=${String(model)} is not virtio or ne2k`);
    const packed = packedOption("--nic", value, o, model === "virtio");
    const offload = o.get("offload");
    if (offload !== undefined) {
      if (offload !== "on" && offload !== "off") throw new UsageError(`--nic ${value}: offload=${String(offload === true ? "" : offload)} is not on or off`);
      if (model !== "virtio") throw new UsageError(`--nic ${value}: offload is for virtio NICs (the NE2000 has no offloads)`);
      if (offload === "on" && !head.startsWith("tap:")) throw new UsageError(`--nic ${value}: offloads need a TAP back end (a datagram pair carries no virtio-net header)`);
    }
    const queues = nicNumberOption(value, o, "queues", 1, VIRTIO_NET_MAX_QUEUE_PAIRS, model === "virtio");
    if (queues !== undefined && queues > 1 && !head.startsWith("tap:")) throw new UsageError(`--nic ${value}: queues=${queues} needs a TAP back end (its queues are the TAP's; a datagram pair has one)`);
    const mtu = nicNumberOption(value, o, "mtu", 68, 65535, model === "virtio");
    const rate = o.get("rate");
    const rateMiB = rate === undefined ? undefined : rateOption(`--nic ${value}`, "rate", rate);
    if (rateMiB !== undefined && model === "ne2k" && rateMiB * MIB < NE2K_MIN_RATE_BYTES_PER_SECOND)
      throw new UsageError(`--nic ${value}: rate=${String(rate)} is below the NE2000's least, 0.1 (MiB/s): a frame held longer than its driver's 200 ms transmit watchdog makes it reset the card`);
    const macText = o.get("mac");
    const mac = typeof macText === "string" ? macText : defaultMac(vmName, i);
    try {
      parseMac(mac);
    } catch (e) {
      if (e instanceof DevicePlanError) throw new UsageError(`--nic ${value}: ${e.message}`);
      throw e;
    }
    out.push({
      kind: model === "virtio" ? "virtio-net" : "ne2k",
      id: `nic${i}`,
      mac: mac.toLowerCase(),
      backend: parseNicBackend(value, head),
      ...(packed ? { ringPacked: true } : {}),
      ...(offload === "off" ? { offloads: false } : {}),
      ...(queues !== undefined && queues > 1 ? { queues } : {}),
      ...(mtu !== undefined ? { mtu } : {}),
      ...(rateMiB !== undefined ? { rateBytesPerSecond: rateMiB * MIB } : {}),
    });
  });
  const named: { name: string; socketPath: string }[] = [];
  const socketPaths = new Set<string>();
  (opts.channel ?? []).forEach((value, i) => {
    if (value === "") throw new UsageError("--channel: empty socket path");
    const { head: path, opts: o } = splitSpec("--channel", value);
    rejectUnknown("--channel", value, o, ["name"]);
    if (!existsSync(dirname(path))) throw new UsageError(`--channel ${value}: directory ${dirname(path)} does not exist`);
    if (Buffer.byteLength(path) > 107) throw new UsageError(`--channel ${value}: socket paths are limited to 107 bytes`);
    if (existsSync(path) && !statSync(path).isSocket()) throw new UsageError(`--channel ${value}: ${path} exists and is not a socket (refusing to replace it)`);
    const key = resolve(path);
    if (socketPaths.has(key)) throw new UsageError(`--channel ${value}: socket ${path} is given to another channel already`);
    socketPaths.add(key);
    const name = o.get("name");
    if (name === undefined) {
      out.push({ kind: "virtio-console", id: `channel${i}`, socketPath: path });
      return;
    }
    if (typeof name !== "string" || !VIRTIO_CONSOLE_PORT_NAME.test(name))
      throw new UsageError(`--channel ${value}: name must be 1-127 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. org.qemu.guest_agent.0)`);
    if (named.some((p) => p.name === name)) throw new UsageError(`--channel ${value}: another channel is named ${name} already`);
    if (named.length === VIRTIO_CONSOLE_MAX_NAMED_PORTS) throw new UsageError(`--channel ${value}: at most ${VIRTIO_CONSOLE_MAX_NAMED_PORTS} named channels (the ports of one virtio-serial device)`);
    named.push({ name, socketPath: path });
  });
  if (named.length > 0) out.push({ kind: "virtio-serial", id: "serial0", ports: named });
  if (opts.rng === true) out.push({ kind: "virtio-rng", id: "rng0" });
  const vsock = opts.vsock ?? [];
  if (vsock.length > 1) throw new UsageError(`--vsock is given ${vsock.length} times; a VM has one vsock device (the guest's AF_VSOCK takes one virtio transport)`);
  for (const value of vsock) {
    const { head: path, opts: o } = splitSpec("--vsock", value);
    rejectUnknown("--vsock", value, o, ["cid"]);
    if (!existsSync(dirname(path))) throw new UsageError(`--vsock ${value}: directory ${dirname(path)} does not exist`);
    // The guest's connections go to PATH_<port>: room for "_4294967295" in a 107-byte UNIX socket path.
    if (Buffer.byteLength(path) > 96) throw new UsageError(`--vsock ${value}: the socket path may be at most 96 bytes (the service sockets PATH_<port> must fit in 107)`);
    if (existsSync(path) && !statSync(path).isSocket()) throw new UsageError(`--vsock ${value}: ${path} exists and is not a socket (refusing to replace it)`);
    if (socketPaths.has(resolve(path))) throw new UsageError(`--vsock ${value}: socket ${path} is given to a channel already`);
    const cidText = o.get("cid") ?? "3";
    const cid = typeof cidText === "string" && /^\d{1,10}$/.test(cidText) ? Number(cidText) : NaN;
    if (!(cid >= VSOCK_MIN_GUEST_CID && cid <= VSOCK_MAX_GUEST_CID))
      throw new UsageError(`--vsock ${value}: cid must be a whole number from ${VSOCK_MIN_GUEST_CID} to ${VSOCK_MAX_GUEST_CID} (0-2 are the hypervisor, loopback and host)`);
    out.push({ kind: "virtio-vsock", id: "vsock0", socketPath: path, cid });
  }
  try {
    planPci(out);
  } catch (e) {
    if (e instanceof DevicePlanError) throw new UsageError(e.message);
    throw e;
  }
  return out;
}
