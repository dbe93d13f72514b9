// The C allocation API, with glibc's conventions for errno and edge cases.
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "ebb.h"
#include "page.h"

#define EBB_API extern "C" __attribute__((visibility("default")))

namespace ebb {

void free_suspect(Span* s, FreeObj* o, const char* what) {
  // The key says "probably free". Confirm before accusing: look in this
  // thread's cache, then in the span's free slots. A live object whose bytes
  // happen to match the key costs this search and is then freed as usual.
  unsigned cls = s->cls;
  const CacheBin& cb = t_cache.bins[cls];
  for (FreeObj** c = cb.base(); c != cb.top; c++)
    if (*c == o) os::fatal_pointer(what, "double free", o);
  bool found;
  {
    LockGuard guard(g_bins[cls].lock);
    found = span_is_free_slot(s, o);
  }
  if (found) os::fatal_pointer(what, "double free", o);
  cache_push(cls, o);
}

void dealloc_other(void* p, const char* what) {
  if (p == nullptr) return;
  SegmentHeader* h = segment_of_large(p);                // not in a small segment: dealloc() looked
  if (h == nullptr) return check_foreign_free(p, what);  // the loader's, left alone, or a bug
  if (EBB_UNLIKELY(g_profile_on)) profile_free(p);
  large_free(h, p);
}

void* alloc_large(size_t size, size_t align, bool zero) {
  ThreadCache& tc = t_cache;
  tc.allocs++;
  tc.alloc_bytes += size;
  void* p = large_alloc(size, align, zero);
  if (EBB_UNLIKELY(tc.alloc_bytes >= tc.sample_at)) profile_alloc(p, size);
  return p;
}

void free_small_sampled(Span* s, FreeObj* o, const char* what) {
  profile_free_small(s, o);
  if (EBB_UNLIKELY(o->key == g_free_key)) return free_suspect(s, o, what);
  cache_push(s->cls, o);
}

void* alloc_class_sampled(unsigned cls, size_t size) {
  CacheBin& cb = t_cache.bins[cls];
  void* p;
  if (lo16(cb.top) != cb.low) {
    FreeObj* o = *--cb.top;
    o->key = 0;
    p = o;
  } else {
    p = tcache_alloc_slow(cls);
  }
  profile_alloc(p, size);
  return p;
}

static bool is_pow2(size_t a) { return a != 0 && (a & (a - 1)) == 0; }

void* alloc_aligned(size_t align, size_t size) {
  if (align <= kMinAlign) return alloc(size);
  // Spans start on a 64 KiB boundary, so an object of a class whose size is a
  // multiple of `align` is aligned to `align`.
  if (align <= kSliceSize && size <= kMaxSmallSize) {
    size_t want = size < align ? align : size;
    for (unsigned cls = size_to_class(want); cls <= kNumClasses; cls++)
      if (class_size(cls) % align == 0) return alloc_class(cls, size);
  }
  return alloc_large(size, align, false);
}

static size_t usable_size(const void* p) {
  if (p == nullptr) return 0;
  SegmentHeader* h = segment_of(p);
  if (h == nullptr) return 0;
  if (h->kind != kSmallSegment) return large_usable(h, p);
  return class_size(checked_span(h, p, "malloc_usable_size")->cls);
}

// realloc of memory libebb did not hand out: its size is unknown, so copy
// what can be read up to the new size, and leave the old block alone.
static void* realloc_foreign(void* p, size_t size) {
  void* q = alloc(size);
  if (q != nullptr) os::copy_readable(q, p, size);
  return q;
}

static void* reallocate(void* p, size_t size) {
  if (p == nullptr) return alloc(size);
  if (size == 0) {  // glibc frees and returns NULL
    dealloc(p, "realloc");
    return nullptr;
  }
  SegmentHeader* h = segment_of(p);
  if (h == nullptr) return realloc_foreign(p, size);
  size_t old;
  if (h->kind == kSmallSegment) {
    old = class_size(checked_span(h, p, "realloc")->cls);
    // Stay in place while the object fits and wastes less than a quarter.
    if (size <= old && size >= old - old / 4) return p;
  } else {
    if (size > kMaxSmallSize) {
      // In place or moved, the old block is gone: to the profiler, a free
      // and a new allocation. The free is recorded first (once the block
      // is given up, another thread may get its address); if the realloc
      // then fails, the capture counts a block still live as freed.
      if (EBB_UNLIKELY(g_profile_on)) profile_free(p);
      void* q = large_realloc(h, p, size);
      ThreadCache& tc = t_cache;
      tc.allocs++;
      tc.alloc_bytes += size;
      if (EBB_UNLIKELY(tc.alloc_bytes >= tc.sample_at) && q != nullptr) profile_alloc(q, size);
      return q;
    }
    old = large_usable(h, p);
    if (old == 0) os::fatal_pointer("realloc", "invalid pointer", p);
  }
  void* q = alloc(size);
  if (q == nullptr) return nullptr;  // errno is ENOMEM; p is untouched
  memcpy(q, p, size < old ? size : old);
  dealloc(p, "realloc");
  return q;
}

}  // namespace ebb

using namespace ebb;

EBB_API void* malloc(size_t size) noexcept { return alloc(size); }

EBB_API void free(void* p) noexcept { dealloc(p, "free"); }

EBB_API void cfree(void* p) noexcept { dealloc(p, "free"); }

EBB_API void free_sized(void* p, size_t) noexcept { dealloc(p, "free_sized"); }

EBB_API void free_aligned_sized(void* p, size_t, size_t) noexcept { dealloc(p, "free_aligned_sized"); }

EBB_API void* calloc(size_t n, size_t size) noexcept {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return nullptr;
  }
  if (total > kMaxSmallSize) return alloc_large(total, kMinAlign, true);
  void* p = alloc(total);
  if (p != nullptr) memset(p, 0, total);
  return p;
}

EBB_API void* realloc(void* p, size_t size) noexcept { return reallocate(p, size); }

EBB_API void* reallocarray(void* p, size_t n, size_t size) noexcept {
  size_t total;
  if (__builtin_mul_overflow(n, size, &total)) {
    errno = ENOMEM;
    return nullptr;
  }
  return reallocate(p, total);
}

EBB_API int posix_memalign(void** out, size_t align, size_t size) noexcept {
  if (!is_pow2(align) || align % sizeof(void*) != 0) return EINVAL;
  int saved = errno;
  void* p = alloc_aligned(align, size);
  if (p == nullptr) {
    errno = saved;
    return ENOMEM;
  }
  *out = p;
  return 0;
}

EBB_API void* aligned_alloc(size_t align, size_t size) noexcept {
  if (!is_pow2(align)) {
    errno = EINVAL;
    return nullptr;
  }
  return alloc_aligned(align, size);
}

EBB_API void* memalign(size_t align, size_t size) noexcept {
  // glibc: alignments above SIZE_MAX/2+1 are refused, others rounded up to a power of two.
  if (align > SIZE_MAX / 2 + 1) {
    errno = EINVAL;
    return nullptr;
  }
  if (!is_pow2(align)) align = align < kMinAlign ? kMinAlign : size_t{1} << (64 - __builtin_clzll(align));
  return alloc_aligned(align, size);
}

EBB_API void* valloc(size_t size) noexcept { return alloc_aligned(kPageSize, size); }

EBB_API void* pvalloc(size_t size) noexcept {
  size_t rounded;
  if (__builtin_add_overflow(size, kPageSize - 1, &rounded)) {
    errno = ENOMEM;
    return nullptr;
  }
  rounded &= ~(kPageSize - 1);
  return alloc_aligned(kPageSize, rounded == 0 ? kPageSize : rounded);
}

EBB_API size_t malloc_usable_size(void* p) noexcept { return usable_size(p); }

EBB_API int malloc_trim(size_t) noexcept { return ebb_trim() > 0 ? 1 : 0; }

EBB_API size_t ebb_trim(void) noexcept {
  ensure_init();
  if (t_cache.state == 1) tcache_flush_all(&t_cache);
  bool pending = false;
  return purge_all(true, &pending);
}

EBB_API int ebb_profile_start(const char* prefix, uint64_t rate) noexcept {
  if (prefix == nullptr || *prefix == 0 || strlen(prefix) >= ebb::kMaxProfilePrefix) return EINVAL;
  char path[8];
  const int32_t err = ebb::profile_attach(prefix, rate, true, path, sizeof path);
  if (err == 0) ebb::purger_options_changed();  // it writes the memory statistics: wake it to its new pace
  if (err == ebb::telemetry::kAckAlreadyProfiling) return EBUSY;
  if (err == ebb::telemetry::kAckFinalizing) return ECANCELED;
  return err;
}

EBB_API int ebb_profile_stop(void) noexcept {
  char path[8];
  return ebb::profile_detach(path, sizeof path) == 0 ? 0 : ENOENT;
}

EBB_API const char* ebb_version(void) noexcept { return "ebb " EBB_VERSION_STRING; }
