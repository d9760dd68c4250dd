/*
 * A guest-side AF_VSOCK tool for the real-guest tests (busybox has none),
 * built with `gcc -static` and appended to the default guest's initramfs.
 *
 *   vsock connect CID PORT   connect; stdin -> socket (then shutdown(SHUT_WR)),
 *                            socket -> stdout, until both directions are done
 *                            (the peer ending its side does not stop stdin going out)
 *   vsock listen PORT        accept one connection on PORT (any CID), then the same;
 *                            prints "VSOCK-LISTENING PORT" on stderr once listening
 *   vsock listen-unix PATH   the same on a UNIX stream socket at PATH (a host service
 *                            for Partis's device, which connects to <socket>_<port>;
 *                            benches use it so both VMMs' host ends are this program)
 *
 * Exit status 0 when both directions ended cleanly; 1 with a message otherwise.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what) {
  fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
  return 1;
}

static int relay(int s) {
  char buf[65536];
  int inOpen = 1, sockOpen = 1;
  while (sockOpen || inOpen) {
    struct pollfd p[2] = {{.fd = sockOpen ? s : -1, .events = POLLIN}, {.fd = inOpen ? 0 : -1, .events = POLLIN}};
    if (poll(p, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return fail("poll");
    }
    if (p[0].revents) {
      ssize_t n = read(s, buf, sizeof buf);
      if (n < 0) return fail("read socket");
      if (n == 0) sockOpen = 0;
      for (ssize_t off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0) return fail("write stdout");
        off += w;
      }
    }
    if (inOpen && p[1].revents) {
      ssize_t n = read(0, buf, sizeof buf);
      if (n < 0) return fail("read stdin");
      if (n == 0) {
        inOpen = 0;
        if (shutdown(s, SHUT_WR) < 0) return fail("shutdown");
      }
      for (ssize_t off = 0; off < n;) {
        ssize_t w = write(s, buf + off, n - off);
        if (w < 0) return fail("write socket");
        off += w;
      }
    }
  }
  close(s);
  return 0;
}

/* Accept one connection on a listening socket, then relay. */
static int serve(int s, const char *name) {
  if (listen(s, 1) < 0) return fail("listen");
  fprintf(stderr, "VSOCK-LISTENING %s\n", name);
  int c = accept(s, 0, 0);
  if (c < 0) return fail("accept");
  close(s);
  return relay(c);
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "listen-unix") == 0) {
    struct sockaddr_un u;
    memset(&u, 0, sizeof u);
    u.sun_family = AF_UNIX;
    if (strlen(argv[2]) >= sizeof u.sun_path) {
      fprintf(stderr, "vsock: %s: path too long\n", argv[2]);
      return 2;
    }
    strcpy(u.sun_path, argv[2]);
    unlink(argv[2]); /* a socket file an earlier run left */
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) return fail("socket");
    if (bind(s, (struct sockaddr *)&u, sizeof u) < 0) return fail("bind");
    return serve(s, argv[2]);
  }
  struct sockaddr_vm a;
  memset(&a, 0, sizeof a);
  a.svm_family = AF_VSOCK;
  int s = socket(AF_VSOCK, SOCK_STREAM, 0);
  if (s < 0) return fail("socket");
  if (argc == 4 && strcmp(argv[1], "connect") == 0) {
    a.svm_cid = (unsigned)strtoul(argv[2], 0, 10);
    a.svm_port = (unsigned)strtoul(argv[3], 0, 10);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) return fail("connect");
    return relay(s);
  }
  if (argc == 3 && strcmp(argv[1], "listen") == 0) {
    a.svm_cid = VMADDR_CID_ANY;
    a.svm_port = (unsigned)strtoul(argv[2], 0, 10);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) return fail("bind");
    return serve(s, argv[2]);
  }
  fprintf(stderr, "usage: vsock connect CID PORT | vsock listen PORT | vsock listen-unix PATH\n");
  return 2;
}
