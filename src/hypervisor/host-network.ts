/**
 * Host-side network plumbing for the NIC back ends: TAP interfaces
 * (/dev/net/tun, `TUNSETIFF` with IFF_TAP|IFF_NO_PI, optionally IFF_VNET_HDR
 * with its offloads set by `TUNSETOFFLOAD`, Documentation/networking/
 * tuntap.rst) and AF_UNIX sockets (unix(7)): a datagram socket bound to a path
 * that sends to a peer path (the "loopback pair between two VMs"), a stream
 * listener/client pair, and socketpair(2) for tests. Every descriptor is
 * non-blocking and close-on-exec: the device thread polls them.
 *
 * Set-up calls throw `HostNetworkError` (a `PartisError` naming the interface
 * or the socket path, with the failed call's `SystemCallError` as its cause).
 * The per-frame calls (`sendDatagram`, `sendDatagramTo`, `receiveDatagram`,
 * `readFrame`, `writeFrame`, `sendStream`, and the vectored `writeFrameHost`,
 * `sendDatagramHost`, `sendDatagramHostTo`, `sendStreamHost` and
 * `receiveStreamHost`, which take
 * spans of host memory, e.g. guest RAM, as numbers: no copy into a buffer)
 * allocate nothing and report the conditions a
 * network back end handles as results: nothing pending, a full queue, a
 * missing peer.
 *
 * Socket addresses (`UnixSocketAddress`) are built once and reused. A path
 * starting with "@" names the Linux abstract namespace (no file is created).
 */
import { lstatSync, type Stats } from "node:fs";
import { PartisError, type ErrorContext } from "../errors.js";
import { Errno, errno, errnoName, ioctl, lastError, lib, O_CLOEXEC, O_NONBLOCK, O_RDWR, open, close, strerror, readvHost, sendmsgHost, writevHost } from "./libc.js";
import { SystemCallError } from "./errors.js";

/** A host networking set-up step failed (TAP creation, socket bind/connect). */
export class HostNetworkError extends PartisError {}

type IntFn<A extends unknown[]> = (...args: A) => number;

const c = {
  socket: lib.func("int socket(int domain, int type, int protocol)") as IntFn<[number, number, number]>,
  socketpair: lib.func("int socketpair(int domain, int type, int protocol, void *sv)") as IntFn<[number, number, number, Int32Array]>,
  bind: lib.func("int bind(int fd, const void *addr, uint32_t len)") as IntFn<[number, Uint8Array, number]>,
  connect: lib.func("int connect(int fd, const void *addr, uint32_t len)") as IntFn<[number, Uint8Array, number]>,
  listen: lib.func("int listen(int fd, int backlog)") as IntFn<[number, number]>,
  accept4: lib.func("int accept4(int fd, void *addr, void *len, int flags)") as IntFn<[number, null, null, number]>,
  send: lib.func("int64_t send(int fd, const void *buf, size_t len, int flags)") as IntFn<[number, ArrayBufferView, number, number]>,
  sendto: lib.func("int64_t sendto(int fd, const void *buf, size_t len, int flags, const void *addr, uint32_t alen)") as IntFn<
    [number, ArrayBufferView, number, number, Uint8Array, number]
  >,
  recv: lib.func("int64_t recv(int fd, void *buf, size_t len, int flags)") as IntFn<[number, ArrayBufferView, number, number]>,
  read: lib.func("int64_t read(int fd, void *buf, size_t count)") as IntFn<[number, ArrayBufferView, number]>,
  write: lib.func("int64_t write(int fd, const void *buf, size_t count)") as IntFn<[number, ArrayBufferView, number]>,
  close: lib.func("int close(int fd)") as IntFn<[number]>,
  shutdown: lib.func("int shutdown(int fd, int how)") as IntFn<[number, number]>,
  unlink: lib.func("int unlink(const char *path)") as IntFn<[string]>,
  setsockopt: lib.func("int setsockopt(int fd, int level, int name, const void *value, uint32_t len)") as IntFn<
    [number, number, number, Int32Array, number]
  >,
  getsockopt: lib.func("int getsockopt(int fd, int level, int name, void *value, void *len)") as IntFn<
    [number, number, number, Int32Array, Uint32Array]
  >,
};

// --- constants (linux/socket.h, linux/if_tun.h, linux/sockios.h) ---------------------------------

const AF_UNIX = 1;
const AF_INET = 2;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const SOCK_SEQPACKET = 5;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const MSG_DONTWAIT = 0x40;
const MSG_TRUNC = 0x20;
const MSG_NOSIGNAL = 0x4000;
const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const SO_SNDBUFFORCE = 32;
const SO_RCVBUFFORCE = 33;

const TUNSETIFF = 0x400454ca;
const TUNSETVNETHDRSZ = 0x400454d8;
const TUNSETOFFLOAD = 0x400454d0;
const TUN_F_CSUM = 0x01;
const TUN_F_TSO4 = 0x02;
const TUN_F_TSO6 = 0x04;
const TUN_F_TSO_ECN = 0x08;
const IFF_TAP = 0x0002;
const IFF_NO_PI = 0x1000;
const IFF_VNET_HDR = 0x4000;
const IFF_MULTI_QUEUE = 0x0100;
const IFF_ATTACH_QUEUE = 0x0200;
const IFF_DETACH_QUEUE = 0x0400;
const TUNSETQUEUE = 0x400454d9;
const IFNAMSIZ = 16;
const IFREQ_SIZE = 40;
const SIOCGIFFLAGS = 0x8913;
const SIOCSIFFLAGS = 0x8914;
const IFF_UP = 0x1;

const ECONNREFUSED = 111;
const ENOTCONN = 107;
const EMSGSIZE = 90;
const ENOBUFS = 105;
const EPIPE = 32;
const ECONNRESET = 104;

/** Size of `struct virtio_net_hdr_v1` (with num_buffers): what a TAP with a vnet header prepends. */
export const VNET_HEADER_BYTES = 12;

/** Bytes of `sun_path` (including the terminating NUL for a filesystem path). */
const SUN_PATH_BYTES = 108;

function wrap(code: string, message: string, call: string, context: ErrorContext): HostNetworkError {
  const cause = lastError(call, context);
  return new HostNetworkError(code, `${message}: ${cause.errnoName} (${strerror(cause.errno)})`, { ...context, call, errno: cause.errnoName }, { cause });
}

// --- TAP ----------------------------------------------------------------------------------------

export interface TapOptions {
  /** Interface name or template ("tap%d"); the kernel picks "tapN" when omitted. At most 15 bytes. */
  readonly name?: string;
  /** Ask for a virtio_net_hdr (12 bytes) before each frame (IFF_VNET_HDR). Default off. */
  readonly vnetHeader?: boolean;
  /**
   * Open one queue of a multi-queue interface (IFF_MULTI_QUEUE): opening the
   * same name again adds a queue, each with its own descriptor, and the
   * kernel steers a flow's received frames to the queue that last sent on it.
   * A multi-queue interface cannot be attached to as a single-queue one, nor
   * the reverse (EINVAL).
   */
  readonly multiQueue?: boolean;
}

/** An open TAP interface: frames are read and written whole on `fd` (non-blocking). */
export interface TapDevice {
  readonly fd: number;
  /** The interface name the kernel assigned ("tap0"). */
  readonly name: string;
  readonly vnetHeader: boolean;
}

/**
 * Create (or attach to) a TAP interface. The interface disappears when `fd` is
 * closed unless it was made persistent elsewhere (`ip tuntap add`). Needs
 * CAP_NET_ADMIN (or ownership of a persistent interface) and /dev/net/tun.
 */
export function openTap(opts: TapOptions = {}): TapDevice {
  const requested = opts.name ?? "";
  const nameBytes = Buffer.from(requested, "utf8");
  if (nameBytes.length >= IFNAMSIZ || requested.includes("\0"))
    throw new HostNetworkError("TAP_BAD_NAME", `TAP interface name "${requested}" is longer than ${IFNAMSIZ - 1} bytes`, { interface: requested });
  let fd: number;
  try {
    fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  } catch (e) {
    const err = e as SystemCallError;
    throw new HostNetworkError(
      "TAP_OPEN_FAILED",
      `cannot open /dev/net/tun for TAP interface "${requested || "tap%d"}": ${err.errnoName ?? ""} (${err.message})`,
      { interface: requested, path: "/dev/net/tun" },
      { cause: e },
    );
  }
  const ifr = new Uint8Array(IFREQ_SIZE);
  ifr.set(nameBytes, 0);
  const vnet = opts.vnetHeader === true;
  const flags = IFF_TAP | IFF_NO_PI | (vnet ? IFF_VNET_HDR : 0) | (opts.multiQueue === true ? IFF_MULTI_QUEUE : 0);
  new DataView(ifr.buffer).setUint16(IFNAMSIZ, flags, true);
  try {
    ioctl(fd, TUNSETIFF, ifr, "TUNSETIFF", { interface: requested });
    if (vnet) {
      const size = new Int32Array([VNET_HEADER_BYTES]);
      ioctl(fd, TUNSETVNETHDRSZ, size, "TUNSETVNETHDRSZ", { interface: requested });
    }
  } catch (e) {
    close(fd);
    const err = e as SystemCallError;
    throw new HostNetworkError(
      "TAP_CREATE_FAILED",
      `cannot create TAP interface "${requested || "tap%d"}": ${err.message}`,
      { interface: requested, errno: err.errnoName },
      { cause: e },
    );
  }
  const end = ifr.indexOf(0);
  const name = Buffer.from(ifr.subarray(0, end < 0 || end > IFNAMSIZ ? IFNAMSIZ : end)).toString("utf8");
  return { fd, name, vnetHeader: vnet };
}

/** What the reader of a TAP with a vnet header accepts in received frames (TUNSETOFFLOAD). */
export interface TapOffloads {
  /** Partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM) instead of complete ones. */
  readonly csum: boolean;
  /** TCP segmentation offload: frames up to 64 KiB with a GSO type, IPv4 and IPv6 (each needs csum). */
  readonly tso4: boolean;
  readonly tso6: boolean;
  /** GSO frames with the ECN bit (needs tso4 or tso6). */
  readonly ecn: boolean;
}

/**
 * Tell the kernel which offloads the TAP's reader takes in received frames
 * (TUNSETOFFLOAD): with none, it completes checksums and segments everything
 * before handing frames over; with them, frames may come with a partial
 * checksum or as one 64 KiB GSO frame. Only for a TAP opened with a vnet
 * header. The kernel refuses TSO without csum (EINVAL).
 */
export function setTapOffloads(fd: number, offloads: TapOffloads, name: string): void {
  const flags = (offloads.csum ? TUN_F_CSUM : 0) | (offloads.csum && offloads.tso4 ? TUN_F_TSO4 : 0) | (offloads.csum && offloads.tso6 ? TUN_F_TSO6 : 0) | (offloads.csum && (offloads.tso4 || offloads.tso6) && offloads.ecn ? TUN_F_TSO_ECN : 0);
  try {
    ioctl(fd, TUNSETOFFLOAD, flags, "TUNSETOFFLOAD", { interface: name, flags });
  } catch (e) {
    const err = e as SystemCallError;
    throw new HostNetworkError("TAP_OFFLOAD_FAILED", `cannot set offloads 0x${flags.toString(16)} on TAP interface "${name}": ${err.message}`, { interface: name, errno: err.errnoName }, { cause: e });
  }
}

/**
 * Attach or detach one queue of a multi-queue TAP (TUNSETQUEUE with
 * IFF_ATTACH_QUEUE / IFF_DETACH_QUEUE): a detached queue's descriptor stays
 * open but the kernel steers no frames to it and drops what it held.
 */
export function setTapQueueAttached(fd: number, attached: boolean, name: string): void {
  const ifr = new Uint8Array(IFREQ_SIZE);
  new DataView(ifr.buffer).setUint16(IFNAMSIZ, attached ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE, true);
  try {
    ioctl(fd, TUNSETQUEUE, ifr, "TUNSETQUEUE", { interface: name, attached });
  } catch (e) {
    const err = e as SystemCallError;
    throw new HostNetworkError("TAP_QUEUE_FAILED", `cannot ${attached ? "attach" : "detach"} a queue of TAP interface "${name}": ${err.message}`, { interface: name, errno: err.errnoName }, { cause: e });
  }
}

/** Bring a host interface up or down (SIOCSIFFLAGS IFF_UP), as `ip link set <name> up` does. */
export function setInterfaceUp(name: string, up: boolean): void {
  const nameBytes = Buffer.from(name, "utf8");
  if (nameBytes.length >= IFNAMSIZ) throw new HostNetworkError("TAP_BAD_NAME", `interface name "${name}" is too long`, { interface: name });
  const s = c.socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (s < 0) throw wrap("NET_SOCKET_FAILED", `cannot open a control socket for interface ${name}`, "socket", { interface: name });
  try {
    const ifr = new Uint8Array(IFREQ_SIZE);
    ifr.set(nameBytes, 0);
    const dv = new DataView(ifr.buffer);
    try {
      ioctl(s, SIOCGIFFLAGS, ifr, "SIOCGIFFLAGS", { interface: name });
      const flags = dv.getUint16(IFNAMSIZ, true);
      dv.setUint16(IFNAMSIZ, up ? flags | IFF_UP : flags & ~IFF_UP, true);
      ioctl(s, SIOCSIFFLAGS, ifr, "SIOCSIFFLAGS", { interface: name });
    } catch (e) {
      throw new HostNetworkError("NET_IFFLAGS_FAILED", `cannot set interface ${name} ${up ? "up" : "down"}: ${(e as Error).message}`, { interface: name }, { cause: e });
    }
  } finally {
    close(s);
  }
}

/**
 * Read one frame from a TAP (or any packet) descriptor. Returns its length, or
 * -1 when nothing is pending (EAGAIN). Throws `SystemCallError` on other failures.
 */
export function readFrame(fd: number, buf: Uint8Array): number {
  return transferred(c.read(fd, buf, buf.byteLength), "read", fd, "frame");
}

/**
 * A non-blocking transfer's result: `n` bytes, or -1 when it would block or
 * was interrupted (EAGAIN/EINTR). Any other failure throws `SystemCallError`.
 */
function transferred(n: number, call: string, fd: number, what?: string): number {
  if (n >= 0) return n;
  const e = errno();
  if (e === Errno.EAGAIN || e === Errno.EINTR) return -1;
  throw new SystemCallError(call, e, errnoName(e), strerror(e), what === undefined ? { fd } : { fd, what });
}

/**
 * Whether a frame write got through: false for the refusals a NIC treats as a
 * dropped frame (queue full, interface down: EAGAIN/ENOBUFS/EIO, an invalid
 * frame: EINVAL/EMSGSIZE). Any other failure throws `SystemCallError`.
 */
function frameWritten(n: number, call: string, fd: number): boolean {
  if (n >= 0) return true;
  const e = errno();
  if (e === Errno.EAGAIN || e === Errno.EINTR || e === ENOBUFS || e === Errno.EIO || e === Errno.EINVAL || e === EMSGSIZE) return false;
  throw new SystemCallError(call, e, errnoName(e), strerror(e), { fd, what: "frame" });
}

/**
 * Write one frame to a TAP descriptor. Returns true when the kernel took it;
 * false when it was refused for a reason a NIC treats as a dropped frame
 * (queue full, interface down: EAGAIN/ENOBUFS/EIO, or an invalid frame: EINVAL/EMSGSIZE).
 */
export function writeFrame(fd: number, buf: Uint8Array, length: number): boolean {
  return frameWritten(c.write(fd, buf, length), "write", fd);
}

/**
 * Write one frame gathered from host spans (GuestMemory.hostAddresses) to a TAP
 * descriptor with writev(2): the frame goes from guest RAM to the kernel with
 * no copy in between. Results as writeFrame.
 */
export function writeFrameHost(fd: number, addresses: Float64Array, lengths: Uint32Array, count: number): boolean {
  return frameWritten(writevHost(fd, addresses, lengths, count), "writev", fd);
}

// --- AF_UNIX addresses --------------------------------------------------------------------------

/** A prebuilt `struct sockaddr_un` (reused for every send). */
export interface UnixSocketAddress {
  readonly path: string;
  readonly bytes: Uint8Array;
  /** The address length to pass with `bytes`. */
  readonly length: number;
  readonly abstract: boolean;
}

/** Build a sockaddr_un for `path` ("@name" = abstract namespace). */
export function unixAddress(path: string): UnixSocketAddress {
  const abstract = path.startsWith("@");
  const body = Buffer.from(abstract ? path.slice(1) : path, "utf8");
  const max = abstract ? SUN_PATH_BYTES - 1 : SUN_PATH_BYTES - 1;
  if (path.length === 0 || body.length > max || (!abstract && path.includes("\0")))
    throw new HostNetworkError("UNIX_BAD_PATH", `socket path "${path}" is empty or longer than ${max} bytes`, { path });
  const bytes = new Uint8Array(2 + SUN_PATH_BYTES);
  new DataView(bytes.buffer).setUint16(0, AF_UNIX, true);
  let length: number;
  if (abstract) {
    bytes[2] = 0;
    bytes.set(body, 3);
    length = 3 + body.length;
  } else {
    bytes.set(body, 2);
    length = 2 + body.length + 1;
  }
  return { path, bytes, length, abstract };
}

function unixSocket(type: number, context: ErrorContext): number {
  const fd = c.socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw wrap("UNIX_SOCKET_FAILED", `cannot create an AF_UNIX socket`, "socket", context);
  return fd;
}

/**
 * Remove a socket file at `path` (not for abstract names). Missing is fine;
 * anything that is not a socket is refused, never deleted.
 */
export function removeSocketPath(path: string): void {
  if (path.startsWith("@")) return;
  let st: Stats;
  try {
    st = lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new HostNetworkError("UNIX_PATH_NOT_SOCKET", `${path} exists and is not a socket; refusing to replace it`, { path });
  if (c.unlink(path) < 0 && errno() !== Errno.ENOENT) throw wrap("UNIX_UNLINK_FAILED", `cannot remove stale socket ${path}`, "unlink", { path });
}

/** Replace a stale socket at `path` before binding: refused when something still answers there. */
function replaceStaleSocket(path: string, type: number): void {
  if (path.startsWith("@")) return;
  try {
    if (!lstatSync(path).isSocket()) throw new HostNetworkError("UNIX_PATH_NOT_SOCKET", `${path} exists and is not a socket; refusing to replace it`, { path });
  } catch (e) {
    if (e instanceof HostNetworkError) throw e;
    return; // missing
  }
  const probe = unixSocket(type, { path });
  const addr = unixAddress(path);
  const live = c.connect(probe, addr.bytes, addr.length) === 0 || errno() === Errno.EAGAIN;
  c.close(probe);
  if (live) throw new HostNetworkError("UNIX_PATH_IN_USE", `${path} is in use by another process`, { path });
  removeSocketPath(path);
}

function bindTo(fd: number, addr: UnixSocketAddress, replace: boolean, type: number): void {
  if (replace) replaceStaleSocket(addr.path, type);
  if (c.bind(fd, addr.bytes, addr.length) < 0) {
    const err = wrap("UNIX_BIND_FAILED", `cannot bind socket to ${addr.path}`, "bind", { path: addr.path });
    c.close(fd);
    throw err;
  }
}

// --- datagram sockets ---------------------------------------------------------------------------

export interface DatagramSocketOptions {
  /** Where this end listens. */
  readonly localPath: string;
  /** Where frames go; with `connect`, the socket is connected to it (ENOENT/ECONNREFUSED when the peer is not there). */
  readonly peerPath?: string;
  /** connect(2) to `peerPath` now. Default false (send with `sendDatagramTo`). */
  readonly connect?: boolean;
  /** Remove a stale socket file at `localPath` first. Default true. */
  readonly replaceStale?: boolean;
  /** SO_SNDBUF / SO_RCVBUF in bytes (the kernel doubles them); left alone when omitted. */
  readonly bufferBytes?: number;
}

export interface DatagramSocket {
  readonly fd: number;
  readonly local: UnixSocketAddress;
  readonly peer: UnixSocketAddress | undefined;
}

/** An AF_UNIX SOCK_DGRAM socket bound to `localPath` (non-blocking), optionally connected to `peerPath`. */
export function openDatagramSocket(opts: DatagramSocketOptions): DatagramSocket {
  const local = unixAddress(opts.localPath);
  const peer = opts.peerPath === undefined ? undefined : unixAddress(opts.peerPath);
  const fd = unixSocket(SOCK_DGRAM, { path: opts.localPath });
  bindTo(fd, local, opts.replaceStale ?? true, SOCK_DGRAM);
  try {
    if (opts.bufferBytes !== undefined) setBufferBytes(fd, opts.bufferBytes, opts.localPath);
    if (opts.connect === true) {
      if (peer === undefined) throw new HostNetworkError("UNIX_NO_PEER", `connect asked without a peer path`, { path: opts.localPath });
      if (c.connect(fd, peer.bytes, peer.length) < 0)
        throw wrap("UNIX_CONNECT_FAILED", `cannot connect ${opts.localPath} to ${peer.path}`, "connect", { path: opts.localPath, peer: peer.path });
    }
  } catch (e) {
    c.close(fd);
    removeSocketPath(opts.localPath);
    throw e;
  }
  return { fd, local, peer };
}

/**
 * An unbound AF_UNIX SOCK_DGRAM socket (non-blocking) that only sends: connect
 * it to a peer with connectDatagram for the fast path. Receiving stays with a
 * separate bound, unconnected socket, which then accepts datagrams from any
 * sender (a connected socket refuses all but its peer).
 */
export function openDatagramSender(opts: { readonly bufferBytes?: number; readonly peerPath: string }): number {
  const fd = unixSocket(SOCK_DGRAM, { path: opts.peerPath });
  try {
    if (opts.bufferBytes !== undefined) setBufferBytes(fd, opts.bufferBytes, opts.peerPath);
  } catch (e) {
    c.close(fd);
    throw e;
  }
  return fd;
}

/**
 * SO_SNDBUF/SO_RCVBUF. With CAP_NET_ADMIN the FORCE options set the size asked
 * for; without it (EPERM) the plain ones do, which the kernel caps at
 * net.core.wmem_max / rmem_max (212992 bytes by default: 1 MiB asked comes back as ~416 KiB).
 */
function setBufferBytes(fd: number, bytes: number, path: string): void {
  const v = new Int32Array([bytes]);
  for (const [force, plain] of [
    [SO_SNDBUFFORCE, SO_SNDBUF],
    [SO_RCVBUFFORCE, SO_RCVBUF],
  ] as const) {
    if (c.setsockopt(fd, SOL_SOCKET, force, v, 4) === 0) continue;
    if (c.setsockopt(fd, SOL_SOCKET, plain, v, 4) < 0)
      throw wrap("UNIX_SOCKOPT_FAILED", `cannot set socket buffer size on ${path}`, "setsockopt", { path, bytes });
  }
}

/**
 * connect(2) a datagram socket to `peer` (later sends need no address lookup).
 * False when nobody is bound there (ENOENT/ECONNREFUSED); throws otherwise.
 */
export function connectDatagram(fd: number, peer: UnixSocketAddress): boolean {
  if (c.connect(fd, peer.bytes, peer.length) === 0) return true;
  const e = errno();
  if (e === Errno.ENOENT || e === ECONNREFUSED || e === Errno.EAGAIN) return false;
  throw new SystemCallError("connect", e, errnoName(e), strerror(e), { fd, peer: peer.path });
}

/** SO_SNDBUF and SO_RCVBUF of a socket, as the kernel reports them. */
export function socketBufferBytes(fd: number): { send: number; receive: number } {
  const v = new Int32Array(1);
  const len = new Uint32Array([4]);
  if (c.getsockopt(fd, SOL_SOCKET, SO_SNDBUF, v, len) < 0) throw lastError("getsockopt", { fd, option: "SO_SNDBUF" });
  const send = v[0]!;
  if (c.getsockopt(fd, SOL_SOCKET, SO_RCVBUF, v, len) < 0) throw lastError("getsockopt", { fd, option: "SO_RCVBUF" });
  return { send, receive: v[0]! };
}

/**
 * Why a datagram was not sent: "again" = the peer's queue is full (EAGAIN; with
 * AF_UNIX datagrams the receiver queues at most net.unix.max_dgram_qlen),
 * "no-peer" = nobody listens at the peer address (ENOENT/ECONNREFUSED/ENOTCONN), or
 * the peer's socket is connected to someone else (EPERM),
 * "too-big" = larger than the socket buffer allows (EMSGSIZE), "no-buffers" = ENOBUFS.
 */
export type SendRefusal = "again" | "no-peer" | "too-big" | "no-buffers";

/** The refusal for the errno of a failed send; throws for anything else. */
function refusal(call: string, fd: number): SendRefusal {
  const e = errno();
  if (e === Errno.EAGAIN || e === Errno.EINTR) return "again";
  // EPERM: the receiving datagram socket is connected to another peer (unix_may_send).
  if (e === Errno.ENOENT || e === ECONNREFUSED || e === ENOTCONN || e === EPIPE || e === ECONNRESET || e === Errno.EPERM) return "no-peer";
  if (e === EMSGSIZE) return "too-big";
  if (e === ENOBUFS || e === Errno.ENOMEM) return "no-buffers";
  throw new SystemCallError(call, e, errnoName(e), strerror(e), { fd });
}

/** send(2) one datagram on a connected socket: `true` when sent, else why not. */
export function sendDatagram(fd: number, buf: ArrayBufferView, length: number): true | SendRefusal {
  const n = c.send(fd, buf, length, MSG_DONTWAIT | MSG_NOSIGNAL);
  return n >= 0 ? true : refusal("send", fd);
}

/**
 * One datagram gathered from host spans (see writeFrameHost) on a connected,
 * non-blocking socket (writev(2) on a connected datagram socket sends one
 * datagram): `true` when sent, else why not, as sendDatagram.
 */
export function sendDatagramHost(fd: number, addresses: Float64Array, lengths: Uint32Array, count: number): true | SendRefusal {
  return writevHost(fd, addresses, lengths, count) >= 0 ? true : refusal("writev", fd);
}

/**
 * sendmsg(2) one datagram to `to`, gathered from host spans (see
 * writeFrameHost): `true` when sent, else why not, as sendDatagramTo.
 */
export function sendDatagramHostTo(fd: number, to: UnixSocketAddress, addresses: Float64Array, lengths: Uint32Array, count: number): true | SendRefusal {
  return sendmsgHost(fd, to.bytes, to.length, addresses, lengths, count, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0 ? true : refusal("sendmsg", fd);
}

/** sendto(2) one datagram to `to`: `true` when sent, else why not. */
export function sendDatagramTo(fd: number, to: UnixSocketAddress, buf: ArrayBufferView, length: number): true | SendRefusal {
  const n = c.sendto(fd, buf, length, MSG_DONTWAIT | MSG_NOSIGNAL, to.bytes, to.length);
  return n >= 0 ? true : refusal("sendto", fd);
}

/**
 * recv(2) one datagram into `buf`. Returns its full length (which may exceed
 * `buf.byteLength`: the datagram was truncated, MSG_TRUNC), or -1 when none is
 * pending. A closed stream peer reads as 0.
 */
export function receiveDatagram(fd: number, buf: ArrayBufferView): number {
  return transferred(c.recv(fd, buf, buf.byteLength, MSG_DONTWAIT | MSG_TRUNC), "recv", fd);
}

// --- stream sockets -----------------------------------------------------------------------------

/** AF_UNIX SOCK_STREAM listener on `path` (non-blocking; a stale socket file is replaced). */
export function listenStream(path: string, backlog = 16): number {
  const addr = unixAddress(path);
  const fd = unixSocket(SOCK_STREAM, { path });
  bindTo(fd, addr, true, SOCK_STREAM);
  if (c.listen(fd, backlog) < 0) {
    const err = wrap("UNIX_LISTEN_FAILED", `cannot listen on ${path}`, "listen", { path });
    c.close(fd);
    throw err;
  }
  return fd;
}

/** accept4(2) one pending connection (non-blocking, close-on-exec), or undefined when none waits. */
export function acceptStream(listenFd: number): number | undefined {
  const fd = c.accept4(listenFd, null, null, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd >= 0) return fd;
  const e = errno();
  if (e === Errno.EAGAIN || e === Errno.EINTR) return undefined;
  throw new SystemCallError("accept4", e, errnoName(e), strerror(e), { fd: listenFd });
}

/** Connect a non-blocking AF_UNIX stream client to `path`. */
export function connectStream(path: string): number {
  const addr = unixAddress(path);
  const fd = unixSocket(SOCK_STREAM, { path });
  if (c.connect(fd, addr.bytes, addr.length) < 0) {
    const err = wrap("UNIX_CONNECT_FAILED", `cannot connect to ${path}`, "connect", { path });
    c.close(fd);
    throw err;
  }
  return fd;
}

/** Bytes written by a stream `send` (possibly short), or -1 when the socket is full. Throws on a broken connection. */
export function sendStream(fd: number, buf: ArrayBufferView, length: number): number {
  return transferred(c.send(fd, buf, length, MSG_DONTWAIT | MSG_NOSIGNAL), "send", fd);
}

/** As sendStream, from host spans (see writeFrameHost) with one writev(2). */
export function sendStreamHost(fd: number, addresses: Float64Array, lengths: Uint32Array, count: number): number {
  return transferred(writevHost(fd, addresses, lengths, count), "writev", fd);
}

/**
 * Read from a stream socket into host spans with one readv(2): the bytes read,
 * 0 at the end of the stream, -1 when nothing is pending. Throws on other failures.
 */
export function receiveStreamHost(fd: number, addresses: Float64Array, lengths: Uint32Array, count: number): number {
  return transferred(readvHost(fd, addresses, lengths, count), "readv", fd);
}

/**
 * recv(2) at most `length` bytes of a stream socket into `buf` without
 * blocking: the bytes read, 0 at the end of the stream, -1 when nothing is
 * pending. Throws `SystemCallError` on other failures (ECONNRESET).
 */
export function receiveStream(fd: number, buf: Uint8Array, length: number): number {
  return transferred(c.recv(fd, buf, Math.min(length, buf.byteLength), MSG_DONTWAIT), "recv", fd);
}

/**
 * shutdown(2) one or both directions of a connected stream socket. A socket
 * whose peer is already gone (ENOTCONN) is not an error.
 */
export function shutdownStream(fd: number, how: "read" | "write" | "both"): void {
  if (c.shutdown(fd, how === "read" ? 0 : how === "write" ? 1 : 2) === 0) return;
  const e = errno();
  if (e === ENOTCONN) return;
  throw new SystemCallError("shutdown", e, errnoName(e), strerror(e), { fd });
}

/** A connected pair of non-blocking AF_UNIX sockets (tests, in-process plumbing). */
export function socketPair(kind: "datagram" | "stream" | "seqpacket" = "datagram"): [number, number] {
  const type = kind === "datagram" ? SOCK_DGRAM : kind === "stream" ? SOCK_STREAM : SOCK_SEQPACKET;
  const sv = new Int32Array(2);
  if (c.socketpair(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) < 0) throw wrap("UNIX_SOCKETPAIR_FAILED", `cannot create a ${kind} socket pair`, "socketpair", { kind });
  return [sv[0]!, sv[1]!];
}

/** close(2), throwing `SystemCallError` on failure. */
export function closeDescriptor(fd: number): void {
  close(fd);
}
