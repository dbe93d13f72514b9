// ebb_stats() and ebb_class_stats(): read the heap. One pass over the
// segments gives every class's figures; the bins and the segment list are
// locked for that pass (in the fork handler's order), so the spans hold still.
#include <cstring>

#include "ebb.h"
#include "heap.h"

namespace ebb {

namespace {

struct ClassTotals {
  uint64_t spans = 0, out = 0, free = 0, resident_pages = 0;
};

using AllTotals = ClassTotals[kNumClasses + 1];

void class_totals(AllTotals& t) {
  for (unsigned cls = 1; cls <= kNumClasses; cls++) g_bins[cls].lock.lock();
  g_segment_lock.lock();
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    t[cls].spans = g_bins[cls].spans;
    t[cls].out = g_bins[cls].out;
  }
  for (Segment* seg = g_segments; seg != nullptr; seg = seg->next)
    for (unsigned i = kFirstSpanSlice; i < kSlicesPerSegment; i++) {
      Span* s = &seg->spans[i];
      if (seg->span_at[i] != span_offset(i) || s->cls == 0) continue;
      ClassTotals& c = t[s->cls];
      c.free += s->nfree + s->parked + (kClasses[s->cls].capacity - s->bump);
      c.resident_pages += span_resident_pages(s);
    }
  g_segment_lock.unlock();
  for (unsigned cls = kNumClasses; cls >= 1; cls--) g_bins[cls].lock.unlock();
}

// What the threads' caches hold and have served, exited threads included.
struct ThreadTotals {
  uint64_t allocs = 0, requested = 0, cached_objects = 0, cached_bytes = 0;
};

ThreadTotals thread_totals() {
  ThreadTotals t;
  LockGuard guard(g_tcache_lock);
  t.allocs = g_counters.released_allocs.load(std::memory_order_relaxed);
  t.requested = g_counters.released_bytes.load(std::memory_order_relaxed);
  for (ThreadCache* tc = g_tcaches; tc != nullptr; tc = tc->next) {
    t.allocs += __atomic_load_n(&tc->allocs, __ATOMIC_RELAXED);
    t.requested += __atomic_load_n(&tc->alloc_bytes, __ATOMIC_RELAXED);
    for (unsigned cls = 1; cls <= kNumClasses; cls++) {
      const CacheBin& cb = tc->bins[cls];
      const uint64_t n = cb.count_at(__atomic_load_n(&cb.top, __ATOMIC_RELAXED));
      t.cached_objects += n;
      t.cached_bytes += n * class_size(cls);
    }
  }
  return t;
}

}  // namespace

}  // namespace ebb

using namespace ebb;

extern "C" __attribute__((visibility("default"))) int ebb_stats(ebb_stats_t* out, size_t size) noexcept {
  if (out == nullptr || size < 8) return -1;
  ensure_init();
  ebb_stats_t s;
  memset(&s, 0, sizeof s);
  s.version = EBB_STATS_VERSION;
  s.size = static_cast<uint32_t>(size < sizeof s ? size : sizeof s);
  uint64_t small_out_bytes = 0;
  AllTotals totals;
  class_totals(totals);
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    small_out_bytes += totals[cls].out * class_size(cls);
    s.active_pages += totals[cls].resident_pages;
  }
  const ThreadTotals threads = thread_totals();
  s.allocs_total = threads.allocs;
  s.requested_total = threads.requested;
  s.thread_cached_bytes = threads.cached_bytes;
  s.large_live_bytes = g_counters.large_live.load(std::memory_order_relaxed);
  s.large_cached_bytes = g_counters.large_cached.load(std::memory_order_relaxed);
  uint64_t small_live = small_out_bytes > s.thread_cached_bytes ? small_out_bytes - s.thread_cached_bytes : 0;
  s.live_bytes = small_live + s.large_live_bytes;
  s.segments = g_counters.segments.load(std::memory_order_relaxed);
  s.mapped_bytes = g_counters.mapped.load(std::memory_order_relaxed);
  s.purged_total = g_counters.purged_total.load(std::memory_order_relaxed);
  s.unmapped_total = g_counters.unmapped_total.load(std::memory_order_relaxed);
  s.purge_calls = g_counters.purge_calls.load(std::memory_order_relaxed);
  s.page_size = kPageSize;
  // Segment headers: about two pages each; large blocks: resident as mapped.
  // The two counters are read one after the other while the purger may be
  // unmapping a segment (it lowers `mapped` first): never below zero.
  const uint64_t small_mapped = s.segments * kSegmentSize;
  const uint64_t large_mapped = s.mapped_bytes > small_mapped ? s.mapped_bytes - small_mapped : 0;
  s.resident_bytes = s.active_pages * kPageSize + s.segments * 2 * kPageSize + large_mapped;
  memcpy(out, &s, s.size);
  return 0;
}

extern "C" __attribute__((visibility("default"))) int ebb_counts(ebb_counts_t* out, size_t size) noexcept {
  if (out == nullptr || size == 0) return -1;
  ensure_init();
  ebb_counts_t c{};
  const ThreadTotals threads = thread_totals();
  c.allocs_total = threads.allocs;
  c.requested_total = threads.requested;
  const uint64_t cached_objects = threads.cached_objects, cached_bytes = threads.cached_bytes;
  // The bins' counts without their locks: each is one word, and a count a
  // refill is changing at this moment is as good as the one after it.
  uint64_t out_objects = 0, out_bytes = 0;
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    const uint64_t n = __atomic_load_n(&g_bins[cls].out, __ATOMIC_RELAXED);
    out_objects += n;
    out_bytes += n * class_size(cls);
  }
  c.live_objects = (out_objects > cached_objects ? out_objects - cached_objects : 0) +
                   g_counters.large_objects.load(std::memory_order_relaxed);
  c.live_bytes =
      (out_bytes > cached_bytes ? out_bytes - cached_bytes : 0) + g_counters.large_live.load(std::memory_order_relaxed);
  memcpy(out, &c, size < sizeof c ? size : sizeof c);
  return 0;
}

extern "C" __attribute__((visibility("default"))) unsigned ebb_class_count(void) noexcept { return kNumClasses; }

extern "C" __attribute__((visibility("default"))) int ebb_class_stats(unsigned cls, ebb_class_stats_t* out,
                                                                      size_t size) noexcept {
  if (cls < 1 || cls > kNumClasses || out == nullptr || size == 0) return -1;
  AllTotals totals;
  class_totals(totals);
  const ClassTotals& t = totals[cls];
  ebb_class_stats_t c;
  c.object_size = kClasses[cls].size;
  c.span_bytes = static_cast<uint32_t>(kClasses[cls].slices * kSliceSize);
  c.spans = t.spans;
  c.objects_out = t.out;
  c.objects_free = t.free;
  c.resident_pages = t.resident_pages;
  memcpy(out, &c, size < sizeof c ? size : sizeof c);
  return 0;
}
