// The floor: the least work a preloaded allocator can do per call, as a
// reference point for bench/run_speed.py (allocator `floor`), never for use.
//
// Per size class, a LIFO list of free objects threaded through the objects
// themselves, in thread-local storage: malloc pops, free pushes, under
// twenty instructions each. It checks nothing (a double free corrupts it)
// and never gives memory back; an object freed by another thread goes to
// that thread's lists, so a program that frees in another thread than it
// allocates grows without bound. It bounds the work per call, not the
// placement: LIFO lists scatter objects, which can cost more than the
// instructions saved.
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <atomic>

namespace {

constexpr size_t kWindow = size_t{4} << 20;  // memory is taken in aligned 4 MiB windows
constexpr unsigned kWindowShift = 22;
constexpr size_t kWindows = size_t{1} << (47 - kWindowShift);
constexpr unsigned kFineClasses = 64;             // 16, 32, ... 1024 bytes
constexpr unsigned kClasses = kFineClasses + 12;  // then 2 KiB, 4 KiB, ... 4 MiB
constexpr unsigned kHuge = 255;                   // a window that starts a block of its own
constexpr size_t kHugeHeader = 64;                // a huge block's length, at its window's start

struct Free {
  Free* next;
};

// The class of each window (0: not ours). Free looks a pointer up here.
std::atomic<uint8_t*> g_table{nullptr};

__thread Free* t_free[kClasses + 1] __attribute__((tls_model("initial-exec")));
__thread char* t_bump[kClasses + 1] __attribute__((tls_model("initial-exec")));
__thread char* t_end[kClasses + 1] __attribute__((tls_model("initial-exec")));

size_t class_size(unsigned c) { return c <= kFineClasses ? c * size_t{16} : size_t{1024} << (c - kFineClasses); }

unsigned class_of(size_t n) {
  if (n <= 1024) return n == 0 ? 1 : static_cast<unsigned>((n + 15) >> 4);
  return kFineClasses + static_cast<unsigned>(64 - __builtin_clzll(n - 1)) - 10;
}

void* map(size_t n) {
  void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

uint8_t* table() {
  uint8_t* t = g_table.load(std::memory_order_acquire);
  if (t != nullptr) return t;
  auto* mine = static_cast<uint8_t*>(map(kWindows));
  if (mine == nullptr) return nullptr;
  if (!g_table.compare_exchange_strong(t, mine)) munmap(mine, kWindows);  // another thread won
  return g_table.load(std::memory_order_acquire);
}

// Maps n bytes (a multiple of kWindow) starting on a window boundary.
char* map_windows(size_t n) {
  auto* m = static_cast<char*>(map(n + kWindow));
  if (m == nullptr) return nullptr;
  auto* a = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(m) + kWindow - 1) & ~(kWindow - 1));
  if (a != m) munmap(m, static_cast<size_t>(a - m));
  munmap(a + n, static_cast<size_t>(m + kWindow - a));
  return a;
}

void* refill(unsigned c) {
  const size_t size = class_size(c);
  if (t_bump[c] == nullptr || static_cast<size_t>(t_end[c] - t_bump[c]) < size) {
    uint8_t* t = table();
    char* w = t != nullptr ? map_windows(kWindow) : nullptr;
    if (w == nullptr) {
      errno = ENOMEM;
      return nullptr;
    }
    t[reinterpret_cast<uintptr_t>(w) >> kWindowShift] = static_cast<uint8_t>(c);
    t_bump[c] = w;
    t_end[c] = w + kWindow;
  }
  void* p = t_bump[c];
  t_bump[c] += size;
  return p;
}

// Above 4 MiB: a mapping of its own, starting a window, its length in the
// header there; the block starts `align` bytes in (at least kHugeHeader).
void* huge(size_t n, size_t align = kHugeHeader) {
  uint8_t* t = table();
  if (t == nullptr || n > (size_t{1} << 46) || align >= kWindow) {  // the block must start in the first window
    errno = ENOMEM;
    return nullptr;
  }
  if (align < kHugeHeader) align = kHugeHeader;
  const size_t len = (n + align + kWindow - 1) & ~(kWindow - 1);
  char* a = map_windows(len);
  if (a == nullptr) {
    errno = ENOMEM;
    return nullptr;
  }
  *reinterpret_cast<size_t*>(a) = len;
  t[reinterpret_cast<uintptr_t>(a) >> kWindowShift] = kHuge;
  return a + align;
}

char* huge_start(const void* p) { return reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(p) & ~(kWindow - 1)); }

inline unsigned class_at(const void* p) {
  const uint8_t* t = g_table.load(std::memory_order_relaxed);
  const uintptr_t w = reinterpret_cast<uintptr_t>(p) >> kWindowShift;
  return t == nullptr || w >= kWindows ? 0 : t[w];
}

inline __attribute__((always_inline)) void* alloc(size_t n) {
  if (n > kWindow) return huge(n);
  const unsigned c = class_of(n);
  Free* f = t_free[c];
  if (f == nullptr) return refill(c);
  t_free[c] = f->next;
  return f;
}

inline __attribute__((always_inline)) void dealloc(void* p) {
  const unsigned c = class_at(p);
  if (c == kHuge) {
    char* a = huge_start(p);
    g_table.load()[reinterpret_cast<uintptr_t>(a) >> kWindowShift] = 0;
    munmap(a, *reinterpret_cast<size_t*>(a));
  } else if (c != 0) {  // 0: nullptr, or memory from before the preload
    auto* f = static_cast<Free*>(p);
    f->next = t_free[c];
    t_free[c] = f;
  }
}

size_t usable(const void* p) {
  const unsigned c = class_at(p);
  if (c == kHuge) {
    const char* a = huge_start(p);
    return *reinterpret_cast<const size_t*>(a) - static_cast<size_t>(static_cast<const char*>(p) - a);
  }
  return c == 0 ? 0 : class_size(c);
}

// Power-of-two classes of at least 1 KiB are aligned to their size.
void* alloc_aligned(size_t align, size_t n) {
  if (align <= 16) return alloc(n);
  size_t want = n < align ? align : n;
  if (want > kWindow) return huge(want, align);
  return alloc(want <= 1024 ? 1024 : size_t{1} << (64 - __builtin_clzll(want - 1)));
}

}  // namespace

#define FLOOR_API extern "C" __attribute__((visibility("default")))

FLOOR_API void* malloc(size_t n) noexcept { return alloc(n); }
FLOOR_API void free(void* p) noexcept { dealloc(p); }
FLOOR_API size_t malloc_usable_size(void* p) noexcept { return usable(p); }

FLOOR_API void* calloc(size_t k, size_t size) noexcept {
  size_t n;
  if (__builtin_mul_overflow(k, size, &n)) {
    errno = ENOMEM;
    return nullptr;
  }
  void* p = alloc(n);
  if (p != nullptr) memset(p, 0, n);
  return p;
}

FLOOR_API void* realloc(void* p, size_t n) noexcept {
  if (p == nullptr) return alloc(n);
  const size_t old = usable(p);
  if (old == 0) abort();  // not ours: its size is unknown (not seen in the benchmarks)
  if (n <= old && n >= old / 2) return p;
  void* q = alloc(n);
  if (q == nullptr) return nullptr;
  memcpy(q, p, n < old ? n : old);
  dealloc(p);
  return q;
}

FLOOR_API int posix_memalign(void** out, size_t align, size_t n) noexcept {
  if (align == 0 || (align & (align - 1)) != 0 || align % sizeof(void*) != 0) return EINVAL;
  void* p = alloc_aligned(align, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}
FLOOR_API void* aligned_alloc(size_t align, size_t n) noexcept { return alloc_aligned(align, n); }
FLOOR_API void* memalign(size_t align, size_t n) noexcept { return alloc_aligned(align, n); }
FLOOR_API void* valloc(size_t n) noexcept { return alloc_aligned(4096, n); }
FLOOR_API void* pvalloc(size_t n) noexcept {
  if (n > SIZE_MAX - 4095) {
    errno = ENOMEM;
    return nullptr;
  }
  return alloc_aligned(4096, (n + 4095) & ~size_t{4095});
}
