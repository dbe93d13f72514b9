// The allocation fast paths, shared by the C API (malloc.cc) and operator
// new/delete (new_delete.cc).
#pragma once

#include <errno.h>

#include "heap.h"
#include "os.h"

namespace ebb {

// Allocates from size class `cls` (request `size`, for stats).
EBB_INLINE void* alloc_class(unsigned cls, size_t size) {
  ThreadCache& tc = t_cache;
  tc.allocs++;
  tc.alloc_bytes += size;
  CacheBin& cb = tc.bins[cls];
  FreeObj* o = cb.head;
  if (EBB_LIKELY(o != nullptr)) {
    cb.head = o->next;
    cb.count--;
    o->key = 0;  // live now: a later free must not look like a double free
    return o;
  }
  return tcache_alloc_slow(cls);
}

EBB_INLINE void* alloc(size_t size) {
  if (EBB_LIKELY(size <= kMaxSmallSize)) return alloc_class(size_to_class(size), size);
  t_cache.allocs++;
  t_cache.alloc_bytes += size;
  return large_alloc(size, kMinAlign, false);
}

// The span holding small object p, after checking that p is the start of an
// object libebb handed out; aborts with a message naming `what` otherwise.
EBB_INLINE Span* checked_span(SegmentHeader* h, const void* p, const char* what) {
  Span* s = span_of(h, p);
  if (EBB_UNLIKELY(s->cls == 0)) os::fatal_pointer(what, "invalid pointer", p);
  const ClassInfo& ci = kClasses[s->cls];
  uint64_t off = static_cast<uint64_t>(static_cast<const uint8_t*>(p) - s->start);
  uint64_t idx = (off * ci.recip) >> 40;
  if (EBB_UNLIKELY(idx * ci.size != off || idx >= s->bump)) os::fatal_pointer(what, "invalid pointer", p);
  return s;
}

void check_double_free(Span* s, FreeObj* o, const char* what);

EBB_INLINE void free_small(SegmentHeader* h, void* p, const char* what) {
  Span* s = checked_span(h, p, what);
  unsigned cls = s->cls;
  auto* o = static_cast<FreeObj*>(p);
  if (EBB_UNLIKELY(o->key == g_free_key)) check_double_free(s, o, what);
  o->key = g_free_key;
  CacheBin& cb = t_cache.bins[cls];
  if (EBB_LIKELY(cb.count < cb.max)) {
    o->next = cb.head;
    cb.head = o;
    cb.count++;
    return;
  }
  tcache_free_slow(cls, o);
}

EBB_INLINE void dealloc(void* p, const char* what) {
  if (p == nullptr) return;
  SegmentHeader* h = segment_of(p);
  if (EBB_UNLIKELY(h == nullptr)) return;  // not ours (e.g. from the loader before libebb): leave it
  if (EBB_LIKELY(h->kind == kSmallSegment)) {
    free_small(h, p, what);
    return;
  }
  large_free(h, p);
}

void* alloc_aligned(size_t align, size_t size);  // align: a power of two

}  // namespace ebb
