// Resident set size of this process, read with plain syscalls (no stdio, no
// allocation) so that reading it does not disturb the heap being measured.
#pragma once

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

inline size_t rss_bytes() {
  int fd = open("/proc/self/statm", O_RDONLY);
  if (fd < 0) return 0;
  char buf[128];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  buf[n] = 0;
  char* rest = nullptr;
  strtoull(buf, &rest, 10);  // total program size; resident follows
  return strtoull(rest, nullptr, 10) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}
