// free() of a pointer that is in no segment and no large block of libebb.
//
// Most such pointers are a bug: the address of a local variable or of an
// alloca() buffer, of a global or a string literal, or one computed from a
// heap pointer that lands far from any mapping. Some are legitimate: the
// dynamic loader allocates with a minimal malloc of its own before libebb's
// is bound (pages of its own data, then anonymous mmaps), and glibc frees
// a few of those blocks later through the real free(). libebb cannot have
// recorded them, but it can tell where they live: the loader's mappings or
// anonymous memory. So the mapping that holds the pointer decides, read from
// /proc/self/maps on this rare path (no allocation: a stack buffer):
// - accepted and left alone: an anonymous read-write mapping that is not a
//   thread stack, the brk heap, or any mapping of the dynamic loader;
// - aborted with the one-line message: no mapping, the caller's own stack
//   (the mapping that holds this function's frame), another thread's stack
//   (anonymous read-write right above an inaccessible guard of at most
//   1 MiB, as
//   pthread_create maps them), [stack], [vdso] and the like, and any other
//   file's mapping (a program's or a library's code, constants or globals).
// When /proc cannot be read (no /proc in a container, out of descriptors),
// the pointer is accepted, as before.
#include <errno.h>
#include <fcntl.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

namespace {

struct Mapping {
  uintptr_t start = 0, end = 0;
  bool readable = false, writable = false;
  bool anonymous = false;  // no inode
  char name[64] = {};      // the path's last component, or [stack], [heap], ...
};

uintptr_t parse_hex(const char*& p) {
  uintptr_t v = 0;
  for (;; p++) {
    const char c = *p;
    if (c >= '0' && c <= '9')
      v = v * 16 + static_cast<uintptr_t>(c - '0');
    else if (c >= 'a' && c <= 'f')
      v = v * 16 + static_cast<uintptr_t>(c - 'a' + 10);
    else
      return v;
  }
}

// One line of /proc/self/maps: "start-end perms offset dev inode   path".
bool parse_line(const char* line, Mapping* m) {
  const char* p = line;
  m->start = parse_hex(p);
  if (*p++ != '-') return false;
  m->end = parse_hex(p);
  if (*p++ != ' ' || strlen(p) < 4) return false;
  m->readable = p[0] == 'r';
  m->writable = p[1] == 'w';
  p += 4;
  for (int field = 0; field < 3; field++) {  // offset, dev, inode
    while (*p == ' ') p++;
    const char* at = p;
    while (*p != 0 && *p != ' ') p++;
    if (field == 2) m->anonymous = p - at == 1 && at[0] == '0';
  }
  while (*p == ' ') p++;
  const char* slash = strrchr(p, '/');
  const char* name = slash != nullptr ? slash + 1 : p;
  size_t n = strlen(name);
  if (n >= sizeof m->name) n = sizeof m->name - 1;
  memcpy(m->name, name, n);
  m->name[n] = 0;
  return true;
}

// The mapping holding `a` and the one just below it, read from
// /proc/self/maps; false if it could not be read.
struct Lookup {
  Mapping hit, below;
  bool found = false;
  bool below_adjacent = false;
};

bool lookup(uintptr_t a, Lookup* out) {
  // Raw syscalls: no cancellation point and no interposed open() inside free().
  const long fd = syscall(SYS_openat, AT_FDCWD, "/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[1024];
  char line[320];
  size_t len = 0;
  Mapping prev;
  bool have_prev = false, ok = true;
  for (;;) {
    const long n = syscall(SYS_read, fd, buf, sizeof buf);
    if (n < 0) {
      ok = false;
      break;
    }
    if (n == 0) break;
    for (long i = 0; i < n && !out->found; i++) {
      if (buf[i] != '\n') {
        if (len < sizeof line - 1) line[len++] = buf[i];
        continue;
      }
      line[len] = 0;
      len = 0;
      Mapping m;
      if (!parse_line(line, &m)) continue;
      if (a >= m.start && a < m.end) {
        out->hit = m;
        out->found = true;
        out->below = prev;
        out->below_adjacent = have_prev && prev.end == m.start;
      }
      prev = m;
      have_prev = true;
    }
    if (out->found) break;
  }
  syscall(SYS_close, fd);
  return ok;
}

// The dynamic loader's file, whatever it is called (ld-linux-x86-64.so.2,
// ld-2.31.so, ld64.so.2): the one mapped where the kernel put the
// interpreter (AT_BASE).
bool is_loader(const Mapping& m) {
  if (m.anonymous) return false;
  const uintptr_t base = getauxval(AT_BASE);
  Lookup at;
  if (base != 0 && lookup(base, &at) && at.found) return strcmp(at.hit.name, m.name) == 0;
  return strncmp(m.name, "ld-", 3) == 0 || strncmp(m.name, "ld64", 4) == 0;
}

// glibc maps a thread's stack with its guard (one page by default) at the
// low end; a bigger inaccessible mapping below is a reservation (glibc's
// own malloc arenas end in one), not a guard.
constexpr uintptr_t kMaxGuard = uintptr_t{1} << 20;

}  // namespace

void check_foreign_free(const void* p, const char* what) {
  const int saved_errno = errno;  // free() leaves errno alone
  const auto a = reinterpret_cast<uintptr_t>(p);
  Lookup at;
  const bool read = lookup(a, &at);
  errno = saved_errno;
  if (!read) return;
  if (!at.found) os::fatal_pointer(what, "invalid pointer (not mapped)", p);
  const Mapping& m = at.hit;
  if (is_loader(m)) {  // the loader's own allocations, from before libebb was bound
    errno = saved_errno;
    return;
  }
  const auto frame = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  if (frame >= m.start && frame < m.end) os::fatal_pointer(what, "invalid pointer (on the stack)", p);
  const bool unnamed = m.name[0] == 0 || strncmp(m.name, "[anon:", 6) == 0;  // named with prctl (Linux 5.17)
  if (m.anonymous && unnamed && m.readable && m.writable) {
    const Mapping& g = at.below;
    const bool guard = at.below_adjacent && g.anonymous && !g.readable && !g.writable && g.end - g.start <= kMaxGuard;
    if (guard) os::fatal_pointer(what, "invalid pointer (on a thread stack)", p);
    return;  // anonymous memory: the loader's minimal malloc maps its blocks so
  }
  if (strcmp(m.name, "[heap]") == 0) return;
  os::fatal_pointer(what,
                    m.name[0] == '[' ? "invalid pointer (not heap memory)" : "invalid pointer (in a file mapping)", p);
}

}  // namespace ebb
