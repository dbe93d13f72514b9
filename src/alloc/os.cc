#include "os.h"

#include <errno.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace ebb::os {

void* map_aligned(size_t size, size_t align) {
  // Ask for `size` first: the kernel often hands out aligned addresses on its own
  // when mappings are made in align-sized steps, which saves two syscalls.
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  if ((reinterpret_cast<uintptr_t>(p) & (align - 1)) == 0) return p;
  munmap(p, size);
  // Over-allocate and trim both ends.
  size_t over = size + align;
  if (over < size) return nullptr;
  p = mmap(nullptr, over, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  uintptr_t start = reinterpret_cast<uintptr_t>(p);
  uintptr_t aligned = (start + align - 1) & ~(align - 1);
  if (aligned > start) munmap(p, aligned - start);
  uintptr_t end = start + over;
  if (end > aligned + size) munmap(reinterpret_cast<void*>(aligned + size), end - aligned - size);
  return reinterpret_cast<void*>(aligned);
}

void unmap(void* p, size_t size) { munmap(p, size); }

bool decommit(void* p, size_t size) {
  // MADV_DONTNEED, not MADV_FREE: RSS drops at once, so users and supervisors see
  // the memory go (MADV_FREE leaves it counted until the kernel needs it).
  return madvise(p, size, MADV_DONTNEED) == 0;
}

uint64_t now_ms() {
  // The coarse clock (the kernel's tick, 1-4 ms) is enough for delays of tens
  // of milliseconds and costs a few nanoseconds where the precise one reads
  // the TSC (about 20 ns in a VM): bins read it on every refill and flush.
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000u + static_cast<uint64_t>(ts.tv_nsec) / 1000000u;
}

void write_err(const char* s) {
  size_t n = strlen(s);
  while (n > 0) {
    ssize_t w = write(STDERR_FILENO, s, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}

char* fmt_hex(char* buf, uintptr_t v) {
  char tmp[20];
  int n = 0;
  do {
    tmp[n++] = "0123456789abcdef"[v & 15];
    v >>= 4;
  } while (v != 0);
  char* o = buf;
  *o++ = '0';
  *o++ = 'x';
  while (n > 0) *o++ = tmp[--n];
  *o = 0;
  return buf;
}

char* fmt_dec(char* buf, uint64_t v) {
  char tmp[24];
  int n = 0;
  do {
    tmp[n++] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0);
  char* o = buf;
  while (n > 0) *o++ = tmp[--n];
  *o = 0;
  return buf;
}

void fatal_pointer(const char* what, const char* why, const void* addr) {
  char line[160];
  char hex[24];
  fmt_hex(hex, reinterpret_cast<uintptr_t>(addr));
  line[0] = 0;
  strcat(line, "ebb: ");
  strncat(line, what, 40);
  strcat(line, "(): ");
  strncat(line, why, 60);
  strcat(line, " ");
  strcat(line, hex);
  strcat(line, "\n");
  write_err(line);
  abort();
}

void fatal(const char* msg) {
  write_err("ebb: ");
  write_err(msg);
  write_err("\n");
  abort();
}

uint64_t random64() {
  uint64_t v = 0;
  if (getrandom(&v, sizeof v, GRND_NONBLOCK) == static_cast<ssize_t>(sizeof v)) return v;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  v = static_cast<uint64_t>(ts.tv_nsec) * 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(getpid()) << 32;
  return v ^ reinterpret_cast<uintptr_t>(&v);
}

size_t copy_readable(void* dst, const void* src, size_t n) {
  // process_vm_readv on ourselves copies what it can and fails on a fault
  // instead of raising SIGSEGV. Page by page, so a partial copy stops exactly
  // at the first unreadable page.
  size_t done = 0;
  while (done < n) {
    uintptr_t at = reinterpret_cast<uintptr_t>(src) + done;
    size_t chunk = 4096 - (at & 4095);
    if (chunk > n - done) chunk = n - done;
    struct iovec local = {static_cast<char*>(dst) + done, chunk};
    struct iovec remote = {reinterpret_cast<void*>(at), chunk};
    if (process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != static_cast<ssize_t>(chunk)) break;
    done += chunk;
  }
  return done;
}

}  // namespace ebb::os

#include <fcntl.h>

namespace ebb::os {

namespace {

// Reads a small /proc file into buf (NUL-terminated); returns its length or -1.
ssize_t read_small(const char* path, char* buf, size_t cap) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  ssize_t n = read(fd, buf, cap - 1);
  close(fd);
  if (n < 0) return -1;
  buf[n] = 0;
  return n;
}

uint64_t parse_u64(const char*& p) {
  while (*p == ' ') p++;
  uint64_t v = 0;
  while (*p >= '0' && *p <= '9') v = v * 10 + static_cast<uint64_t>(*p++ - '0');
  return v;
}

}  // namespace

uint64_t rss_bytes() {
  char buf[128];
  if (read_small("/proc/self/statm", buf, sizeof buf) <= 0) return 0;
  const char* p = buf;
  parse_u64(p);  // size
  return parse_u64(p) * static_cast<uint64_t>(getpagesize());
}

void statm(uint64_t* rss, uint64_t* file) {
  char buf[128];
  *rss = *file = 0;
  if (read_small("/proc/self/statm", buf, sizeof buf) <= 0) return;
  const char* p = buf;
  parse_u64(p);  // size
  const auto page = static_cast<uint64_t>(getpagesize());
  *rss = parse_u64(p) * page;
  *file = parse_u64(p) * page;
}

uint64_t start_ticks() {
  char buf[1024];
  if (read_small("/proc/self/stat", buf, sizeof buf) <= 0) return 0;
  const char* p = strrchr(buf, ')');
  if (p == nullptr) return 0;
  p++;
  // Fields after the name: 3 (state) .. 22 (starttime).
  for (int field = 3; field < 22; field++) {
    while (*p == ' ') p++;
    while (*p && *p != ' ') p++;
  }
  return parse_u64(p);
}

}  // namespace ebb::os
