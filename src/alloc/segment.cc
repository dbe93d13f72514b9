// Segments: 4 MiB aligned mappings, and the registry that tells libebb's
// memory from anybody else's.
#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

// One bit per 4 MiB of address space: set where a small segment starts. 8 MiB
// of zero-filled .bss, of which only the pages for addresses in use ever
// become resident. A pointer whose bit is clear in all three registries was
// not handed out by libebb (it may come from the dynamic loader before libebb
// was in place) and is left alone. Small segments have a registry of their
// own so that free() needs no look at the header to know what it has.
std::atomic<uint64_t> g_registry[kRegistryWords];
// The same for large blocks whose header starts a 4 MiB chunk.
static std::atomic<uint64_t> g_registry_large[kRegistryWords];
// Chunks that start with a large object whose header is in the page before.
// Rare (alignments of 4 MiB or more), so a small sorted table would do too;
// a bitmap keeps the lookup trivially correct and costs only address space.
static std::atomic<uint64_t> g_registry_shifted[kRegistryWords];

Lock g_segment_lock;
Segment* g_segments = nullptr;  // small segments, in creation order
static Segment* g_segments_tail = nullptr;

static void bitmap_set(std::atomic<uint64_t>* map, uintptr_t chunk, bool on) {
  size_t bit = chunk >> kSegmentShift;
  uint64_t mask = uint64_t{1} << (bit & 63);
  if (on)
    map[bit >> 6].fetch_or(mask, std::memory_order_release);
  else
    map[bit >> 6].fetch_and(~mask, std::memory_order_release);
}

static bool bitmap_has(const std::atomic<uint64_t>* map, uintptr_t chunk) {
  size_t bit = chunk >> kSegmentShift;
  if (EBB_UNLIKELY(bit >> 6 >= kRegistryWords)) return false;
  return (map[bit >> 6].load(std::memory_order_acquire) >> (bit & 63)) & 1;
}

void registry_set(uintptr_t seg, bool on) { bitmap_set(g_registry, seg, on); }
void registry_set_large(uintptr_t seg, bool on) { bitmap_set(g_registry_large, seg, on); }
void registry_set_shifted(uintptr_t chunk, bool on) { bitmap_set(g_registry_shifted, chunk, on); }

SegmentHeader* segment_of_large(const void* p) {
  uintptr_t chunk = reinterpret_cast<uintptr_t>(p) & ~kSegmentMask;
  SegmentHeader* h;
  if (bitmap_has(g_registry_large, chunk))
    h = reinterpret_cast<SegmentHeader*>(chunk);
  else if (bitmap_has(g_registry_shifted, chunk))
    h = reinterpret_cast<SegmentHeader*>(chunk - kPageSize);
  else
    return nullptr;
  // map_size shrinks when the purger trims a block's slack (large.cc).
  if (reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(h) >=
      __atomic_load_n(&h->map_size, __ATOMIC_RELAXED))
    return nullptr;
  return h;
}

static uint64_t run_mask(unsigned first, unsigned n) {
  uint64_t ones = n >= 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
  return ones << first;
}

// Index of the first run of n set bits in `free`, or -1.
static int find_run(uint64_t free, unsigned n) {
  uint64_t m = free;
  for (unsigned k = 1; k < n && m; k++) m &= free >> k;
  return m ? __builtin_ctzll(m) : -1;
}

static Segment* segment_new() {
  void* mem = os::map_aligned(kSegmentSize, kSegmentSize);
  if (mem == nullptr) return nullptr;
  auto* seg = static_cast<Segment*>(mem);
  // Fresh mappings read as zero: only set what is not.
  seg->h.magic = kSegmentMagic;
  seg->h.kind = kSmallSegment;
  seg->h.map_size = kSegmentSize;
  seg->free_slices = run_mask(kFirstSpanSlice, kSlicesPerSegment - kFirstSpanSlice);
  seg->prev = g_segments_tail;
  if (g_segments_tail != nullptr)
    g_segments_tail->next = seg;
  else
    g_segments = seg;
  g_segments_tail = seg;
  registry_set(reinterpret_cast<uintptr_t>(seg), true);
  g_counters.mapped.fetch_add(kSegmentSize, std::memory_order_relaxed);
  g_counters.segments.fetch_add(1, std::memory_order_relaxed);
  return seg;
}

static void segment_delete(Segment* seg) {
  if (seg->prev != nullptr)
    seg->prev->next = seg->next;
  else
    g_segments = seg->next;
  if (seg->next != nullptr)
    seg->next->prev = seg->prev;
  else
    g_segments_tail = seg->prev;
  registry_set(reinterpret_cast<uintptr_t>(seg), false);
  os::unmap(seg, kSegmentSize);
  g_counters.mapped.fetch_sub(kSegmentSize, std::memory_order_relaxed);
  g_counters.unmapped_total.fetch_add(kSegmentSize, std::memory_order_relaxed);
  g_counters.segments.fetch_sub(1, std::memory_order_relaxed);
}

Span* segment_alloc_span(unsigned nslices) {
  LockGuard guard(g_segment_lock);
  // Oldest segments first: new spans fill the low, long-lived part of the heap
  // and leave younger segments a chance to empty out and be unmapped.
  Segment* seg = g_segments;
  int first = -1;
  for (; seg != nullptr; seg = seg->next) {
    first = find_run(seg->free_slices, nslices);
    if (first >= 0) break;
  }
  if (seg == nullptr) {
    seg = segment_new();
    if (seg == nullptr) return nullptr;
    first = static_cast<int>(kFirstSpanSlice);
  }
  seg->free_slices &= ~run_mask(static_cast<unsigned>(first), nslices);
  Span* span = &seg->spans[first];
  span->start = reinterpret_cast<uint8_t*>(seg) + (static_cast<size_t>(first) << kSliceShift);
  span->slice = static_cast<uint8_t>(first);
  span->nslices = static_cast<uint8_t>(nslices);
  // free() reads span_at and the descriptor without a lock. Until span_init
  // runs, the descriptor is that of a freed span (class 0, nothing carved:
  // span_reset ran before it was freed) or zero, and rejects every pointer.
  for (unsigned i = 0; i < nslices; i++) seg->span_at[first + i] = span_offset(first);
  return span;
}

void segment_free_span(Span* span) {
  auto* seg = reinterpret_cast<Segment*>(reinterpret_cast<uintptr_t>(span) & ~kSegmentMask);
  unsigned first = span->slice;
  LockGuard guard(g_segment_lock);
  for (unsigned i = 0; i < span->nslices; i++) seg->span_at[first + i] = 0;
  seg->free_slices |= run_mask(first, span->nslices);
  span->cls = 0;
  if (seg->free_slices == run_mask(kFirstSpanSlice, kSlicesPerSegment - kFirstSpanSlice))
    seg->empty_since = static_cast<uint32_t>(os::now_ms());
}

// Unmaps segments that have been empty for the purge delay, keeping one
// spare so a program that oscillates around a segment boundary does not pay
// an mmap/munmap pair each time. Their pages are already purged, so the spare
// costs address space only (its header page aside).
size_t segments_release(uint64_t now, bool force) {
  const uint64_t all_free = run_mask(kFirstSpanSlice, kSlicesPerSegment - kFirstSpanSlice);
  size_t released = 0;
  bool keep_spare = !force;  // ebb_trim() keeps nothing
  LockGuard guard(g_segment_lock);
  for (Segment* seg = g_segments; seg != nullptr;) {
    Segment* next = seg->next;
    if (seg->free_slices == all_free) {
      bool old = os::elapsed_ms(now, seg->empty_since) >= g_options.purge_delay_ms;
      if (keep_spare) {
        keep_spare = false;
      } else if (force || old) {
        segment_delete(seg);
        released += kPageSize;  // the header page was the only resident part
      }
    }
    seg = next;
  }
  return released;
}

}  // namespace ebb
