// The allocation fast paths, shared by the C API (malloc.cc) and operator
// new/delete (new_delete.cc).
#pragma once

#include <errno.h>

#include "heap.h"
#include "os.h"

namespace ebb {

// Allocates from size class `cls` (request `size`, for stats).
EBB_NOINLINE void* alloc_class_sampled(unsigned cls, size_t size);

EBB_INLINE void* alloc_class(unsigned cls, size_t size) {
  ThreadCache& tc = t_cache;
  tc.allocs++;
  tc.alloc_bytes += size;
  // Never true while profiling is off (sample_at is UINT64_MAX after a
  // thread's first allocation): the one extra branch of profile.cc.
  if (EBB_UNLIKELY(tc.alloc_bytes >= tc.sample_at)) return alloc_class_sampled(cls, size);
  CacheBin& cb = tc.bins[cls];
  FreeObj** top = cb.top;
  if (EBB_LIKELY(lo16(top) != cb.low)) {
    FreeObj* o = *--top;
    cb.top = top;
    o->key = 0;  // live now: a later free must not look like a double free
    return o;
  }
  return tcache_alloc_slow(cls);
}

// A large object (own mapping), counted and offered to the profiler. Out
// of line: malloc's fast path saves no register for it.
EBB_NOINLINE void* alloc_large(size_t size, size_t align, bool zero);

EBB_INLINE void* alloc(size_t size) {
  // malloc(0) lands in class 0, whose cache is always empty: the slow path
  // serves it from class 1, and the common sizes skip a test for zero.
  if (EBB_LIKELY(size <= kFineMax)) return alloc_class(static_cast<unsigned>((size + 15) >> 4), size);
  if (EBB_LIKELY(size <= kMaxSmallSize)) return alloc_class(size_to_class(size), size);
  return alloc_large(size, kMinAlign, false);
}

// The span holding small object p, after checking that p is the start of an
// object libebb handed out; aborts with a message naming `what` otherwise.
// A slice in no span maps to spans[0], which is all zero (class 0, size 0,
// start 0, nothing carved): the same two comparisons reject it.
EBB_INLINE Span* checked_span(SegmentHeader* h, const void* p, const char* what) {
  Span* s = span_of(h, p);
  const ClassInfo& ci = kClasses[s->cls];
  uint64_t off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(s->start);
  uint64_t idx = (off * ci.recip) >> 40;
  if (EBB_UNLIKELY(idx * ci.size != off || idx >= s->bump)) os::fatal_pointer(what, "invalid pointer", p);
  return s;
}

// The slow halves of free, out of line so that the fast path saves no
// registers: a key that says "already free" (checked, then freed), and
// everything that is not a small object (nullptr, large, foreign pointers).
EBB_NOINLINE void free_suspect(Span* s, FreeObj* o, const char* what);
EBB_NOINLINE void dealloc_other(void* p, const char* what);
// p is in no segment and no large block: accepted, or aborts (foreign.cc).
void check_foreign_free(const void* p, const char* what);

// Marks o free and puts it in this thread's cache of class cls.
EBB_INLINE void cache_push(unsigned cls, FreeObj* o) {
  o->key = g_free_key;
  CacheBin& cb = t_cache.bins[cls];
  FreeObj** top = cb.top;
  if (EBB_LIKELY(lo16(top) != cb.high)) {
    *top = o;
    cb.top = top + 1;
    return;
  }
  tcache_free_slow(cls, o);
}

// free of an object of a span holding a sample: the profiler looks, then
// the free goes on (a tail call, so that free's fast path saves nothing).
EBB_NOINLINE void free_small_sampled(Span* s, FreeObj* o, const char* what);

EBB_INLINE void free_small(SegmentHeader* h, void* p, const char* what) {
  Span* s = checked_span(h, p, what);
  auto* o = static_cast<FreeObj*>(p);
  if (EBB_UNLIKELY(s->sampled)) return free_small_sampled(s, o, what);
  if (EBB_UNLIKELY(o->key == g_free_key)) return free_suspect(s, o, what);
  cache_push(s->cls, o);
}

EBB_INLINE void dealloc(void* p, const char* what) {
  // nullptr takes the slow way too: no segment starts at address 0. The
  // registry holds small segments only, and they map all 4 MiB, so a
  // registered one needs no bounds check and no look at its header.
  const uintptr_t seg = reinterpret_cast<uintptr_t>(p) & ~kSegmentMask;
  if (EBB_LIKELY(registry_has(seg))) return free_small(reinterpret_cast<SegmentHeader*>(seg), p, what);
  dealloc_other(p, what);
}

void* alloc_aligned(size_t align, size_t size);  // align: a power of two

}  // namespace ebb
