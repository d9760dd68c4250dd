/*
 * Reference for bench/pio-exit/pio-exit.ts: the same tiny real-mode guest
 * (out 0x10, al; inc al; jmp back) driven with raw KVM ioctls from C.
 * Usage: pio-exit-c <exits> ; prints "c_us_per_exit <wall µs> cpu <thread CPU µs>".
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
  perror(what);
  exit(1);
}

static double now_us(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv) {
  long exits = argc > 1 ? atol(argv[1]) : 100000;
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) die("open /dev/kvm");
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) die("KVM_CREATE_VM");
  if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0) die("KVM_SET_TSS_ADDR"); /* VT-x hosts, real mode */
  size_t ram_size = 0x100000;
  uint8_t *ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (ram == MAP_FAILED) die("mmap ram");
  /* mov al, 0 ; loop: out 0x10, al ; inc al ; jmp loop */
  const uint8_t code[] = {0xb0, 0x00, 0xe6, 0x10, 0xfe, 0xc0, 0xeb, 0xfa};
  memcpy(ram + 0x1000, code, sizeof code);
  struct kvm_userspace_memory_region region = {
      .slot = 0, .guest_phys_addr = 0, .memory_size = ram_size, .userspace_addr = (uint64_t)(uintptr_t)ram};
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) die("KVM_CREATE_VCPU");
  int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) die("mmap kvm_run");
  struct kvm_sregs sregs;
  if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  sregs.ds.base = sregs.es.base = sregs.ss.base = 0;
  sregs.ds.selector = sregs.es.selector = sregs.ss.selector = 0;
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
  struct kvm_regs regs = {.rip = 0x1000, .rflags = 2, .rsp = 0xf000};
  if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

  long warmup = exits / 10;
  double start = 0, start_cpu = 0;
  for (long i = 0; i < warmup + exits; i++) {
    if (i == warmup) {
      start = now_us(CLOCK_MONOTONIC);
      start_cpu = now_us(CLOCK_THREAD_CPUTIME_ID);
    }
    if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0x10) {
      fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
      return 1;
    }
  }
  double elapsed_cpu = now_us(CLOCK_THREAD_CPUTIME_ID) - start_cpu;
  double elapsed = now_us(CLOCK_MONOTONIC) - start;
  printf("c_us_per_exit %.3f cpu %.3f\n", elapsed / exits, elapsed_cpu / exits);
  return 0;
}
