// Spans: the objects of one size class in 1..16 slices, and giving back the
// pages inside a span that hold no live object.
//
// A span keeps its free slots in a bitmap (in the segment header), not in a
// list threaded through the objects: giving an object back touches only the
// bitmap, and taking a batch out scans bits in address order and writes each
// object's link once, with no chain of dependent loads through cold memory.
//
// Fresh slots are carved lazily (`bump`), so a new span touches only the
// pages it hands out. A purged page's free slots are "parked": left out of
// the bitmap until the span runs out of other free slots, which is when
// refaulting the page is worth it.
//
// Purged pages are of two kinds: inside the carved part (their slots are
// parked), or wholly above it (nothing there was carved since the last
// reset; carving clears their bit). The page that straddles the carve line
// is never purged, so the two kinds never mix.

#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

namespace {

// A span's purged-page bits are its pages' range of the segment's bitmap.
// One word holds the bits of four slices, which may belong to spans of
// different classes, each changed under its own bin's lock: every update of
// a word is an atomic read-modify-write, or two spans' updates could undo
// each other (a page of live objects left marked purged, or a purged page's
// slots left parked with no bit to say so). A span's own bits change only
// under its lock, so relaxed order is enough.
size_t page_base(const Span* s) { return size_t{s->slice} * kPagesPerSlice; }
uint64_t* purged_word(const Span* s, size_t i) { return &segment_of_span(s)->purged[i >> 6]; }

}  // namespace

bool span_page_purged(const Span* s, size_t page) {
  size_t i = page_base(s) + page;
  return (__atomic_load_n(purged_word(s, i), __ATOMIC_RELAXED) >> (i & 63)) & 1;
}
void span_set_purged(Span* s, size_t page) {
  size_t i = page_base(s) + page;
  __atomic_fetch_or(purged_word(s, i), uint64_t{1} << (i & 63), __ATOMIC_RELAXED);
}
void span_clear_purged(Span* s, size_t page) {
  size_t i = page_base(s) + page;
  __atomic_fetch_and(purged_word(s, i), ~(uint64_t{1} << (i & 63)), __ATOMIC_RELAXED);
}

namespace {

// Calls f(word, mask) for the words of the segment's purged bitmap that hold
// the span's pages (f must access *word atomically); mask selects the span's
// bits. Spans start on a slice boundary (16 pages), so a word holds bits of
// at most four spans.
template <typename F>
EBB_INLINE void for_purged_words(const Span* s, F f) {
  const size_t first = page_base(s);
  const size_t end = first + size_t{s->nslices} * kPagesPerSlice;
  uint64_t* bits = segment_of_span(s)->purged;
  for (size_t w = first >> 6; w << 6 < end; w++) {
    size_t lo = w << 6 < first ? first - (w << 6) : 0;
    size_t hi = (w + 1) << 6 > end ? end - (w << 6) : 64;
    uint64_t mask = (hi - lo == 64 ? ~uint64_t{0} : ((uint64_t{1} << (hi - lo)) - 1)) << lo;
    f(&bits[w], mask);
  }
}

bool any_purged(const Span* s) {
  bool any = false;
  for_purged_words(s, [&](uint64_t* w, uint64_t m) { any |= (__atomic_load_n(w, __ATOMIC_RELAXED) & m) != 0; });
  return any;
}

size_t count_purged(const Span* s) {
  size_t n = 0;
  for_purged_words(s, [&](uint64_t* w, uint64_t m) {
    n += static_cast<size_t>(__builtin_popcountll(__atomic_load_n(w, __ATOMIC_RELAXED) & m));
  });
  return n;
}

// Pages [first, last] that slot `idx` overlaps.
EBB_INLINE size_t first_page(size_t idx, size_t size) { return idx * size >> kPageShift; }
EBB_INLINE size_t last_page(size_t idx, size_t size) { return (idx * size + size - 1) >> kPageShift; }

bool overlaps_purged(const Span* s, size_t idx, size_t size) {
  for (size_t p = first_page(idx, size); p <= last_page(idx, size); p++)
    if (span_page_purged(s, p)) return true;
  return false;
}

// Sets bits [lo, hi] of a bitmap.
void set_range(uint64_t* bits, size_t lo, size_t hi) {
  for (size_t w = lo >> 6; w <= hi >> 6; w++) {
    size_t a = w == lo >> 6 ? lo & 63 : 0;
    size_t b = w == hi >> 6 ? hi & 63 : 63;
    bits[w] |= (b - a == 63 ? ~uint64_t{0} : ((uint64_t{1} << (b - a + 1)) - 1)) << a;
  }
}

// ORs into `map` the carved slots that overlap a purged page (the parked
// slots, when they are free): page by page, not slot by slot.
void purged_slots(const Span* s, size_t size, uint64_t* map) {
  if (s->bump == 0) return;
  const size_t pages = last_page(s->bump - 1u, size) + 1;
  for (size_t p = 0; p < pages; p++) {
    if (!span_page_purged(s, p)) continue;
    size_t lo = (p << kPageShift) / size;
    size_t hi = (((p + 1) << kPageShift) - 1) / size;
    if (hi >= s->bump) hi = s->bump - 1u;
    if (lo <= hi) set_range(map, lo, hi);
  }
}

EBB_INLINE bool test_bit(const uint64_t* bits, size_t i) { return (bits[i >> 6] >> (i & 63)) & 1; }

size_t bitmap_words(uint32_t slots) { return (size_t{slots} + 63) / 64; }

void clear_bitmap(Span* s, uint32_t slots) {
  const SpanBitmap bits(s);
  for (size_t w = 0; w < bitmap_words(slots); w++) bits[w] = 0;
}

uint16_t first_nonzero_word(const Span* s) {
  const SpanBitmap bits(s);
  size_t words = bitmap_words(s->bump);
  for (size_t w = 0; w < words; w++)
    if (bits[w] != 0) return static_cast<uint16_t>(w);
  return static_cast<uint16_t>(words);
}

// Decommits pages [first, end) of the span; returns bytes.
size_t decommit_pages(Span* s, size_t first, size_t end) {
  if (end <= first) return 0;
  size_t bytes = (end - first) << kPageShift;
  if (!os::decommit(s->start + (first << kPageShift), bytes)) return 0;
  g_counters.purge_calls.fetch_add(1, std::memory_order_relaxed);
  g_counters.purged_total.fetch_add(bytes, std::memory_order_relaxed);
  return bytes;
}

// Puts the parked slots back in the bitmap; their pages fault back in on use.
void unpark(Span* s) {
  const size_t size = class_size(s->cls);
  const size_t carved_pages = (size_t{s->bump} * size) >> kPageShift;
  uint64_t parked[kSpanBitmapWords] = {};
  purged_slots(s, size, parked);
  const SpanBitmap bits(s);
  for (size_t w = 0; w < bitmap_words(s->bump); w++) bits[w] |= parked[w];
  for (size_t p = 0; p < carved_pages; p++) span_clear_purged(s, p);
  s->nfree += s->parked;
  s->parked = 0;
  s->hint = first_nonzero_word(s);
}

}  // namespace

void span_init(Span* s, unsigned cls) {
  s->next = s->prev = nullptr;
  s->used = s->bump = s->nfree = s->parked = 0;
  s->high = s->hint = 0;
  s->touched = 0;
  s->taken = 0;  // set by the refill that asked for the span
  s->cls = static_cast<uint8_t>(cls);
  s->in_list = false;
  s->dirty = false;
  s->cold = false;
  s->sampled = false;
  segment_of_span(s)->sampled_live[s->slice] = 0;
  if (g_profile_on) segment_of_span(s)->sampled_slots[s->slice] = 0;  // its page stays untouched otherwise
  // The bitmap is already zero: fresh segments are, and a span leaves only
  // through span_reset (its last object came back), which clears it. Not
  // touching it here keeps a span that is only ever carved from faulting in
  // bitmap pages.
  for_purged_words(s, [](uint64_t* w, uint64_t m) { __atomic_fetch_and(w, ~m, __ATOMIC_RELAXED); });
  // The spare descriptors hold bitmap words (SpanBitmap): one may have been
  // the descriptor of an earlier span. They are in the header page.
  Segment* seg = segment_of_span(s);
  memset(static_cast<void*>(&seg->spans[s->slice + 1]), 0, sizeof(Span) * (s->nslices - 1u));
}

uint32_t span_take(Span* s, uint32_t want, FreeObj** end) {
  const uint32_t size = kClasses[s->cls].size;
  const uint32_t cap = kClasses[s->cls].capacity;
  if (s->nfree == 0 && s->bump == cap && s->parked > 0) unpark(s);
  FreeObj** out = end;  // filled downwards: the lowest address ends up at end[-1]
  if (s->nfree > 0) {
    // Lowest addresses first: a batch lands on as few pages as possible.
    const SpanBitmap bits(s);
    const size_t words = bitmap_words(s->bump);
    FreeObj** const last = end - want;
    size_t w = s->hint;
    for (; w < words && out != last; w++) {
      uint64_t m = bits[w];
      while (m != 0 && out != last) {
        size_t i = w * 64 + static_cast<size_t>(__builtin_ctzll(m));
        m &= m - 1;
        *--out = reinterpret_cast<FreeObj*>(s->start + i * size);
      }
      bits[w] = m;
      if (m != 0) break;
    }
    s->hint = static_cast<uint16_t>(w);
    s->nfree -= static_cast<uint32_t>(end - out);
  }
  uint32_t got = static_cast<uint32_t>(end - out);
  if (got < want && s->bump < cap) {
    uint32_t n = want - got;
    if (n > cap - s->bump) n = cap - s->bump;
    if (any_purged(s)) {  // carving refaults these pages: they are no longer purged
      for (size_t pg = first_page(s->bump, size); pg <= last_page(s->bump + n - 1, size); pg++)
        span_clear_purged(s, pg);
    }
    uint8_t* p = s->start + size_t{s->bump} * size;
    for (uint32_t i = 0; i < n; i++, p += size) *--out = reinterpret_cast<FreeObj*>(p);
    s->bump += n;
    if (s->bump > s->high) s->high = static_cast<uint16_t>(s->bump);
    got += n;
  }
  s->used += got;
  return got;
}

void span_reset(Span* s) {
  // Parked slots become plain uncarved slots; purged pages keep their bit,
  // which now means "above the carve line and not resident".
  clear_bitmap(s, s->bump);
  s->nfree = 0;
  s->parked = 0;
  s->bump = 0;
  s->hint = 0;
}

size_t span_purge(Span* s) {
  const size_t size = class_size(s->cls);
  const size_t carved_bytes = size_t{s->bump} * size;
  const size_t touched_pages = (size_t{s->high} * size + kPageSize - 1) >> kPageShift;
  s->dirty = false;
  if (s->used == 0) {
    // Nothing live: every page that may be resident goes, then the slices go
    // back to the segment.
    size_t bytes = 0;
    size_t run = 0;
    for (size_t p = 0; p <= touched_pages; p++) {
      if (p == touched_pages || span_page_purged(s, p)) {
        bytes += decommit_pages(s, run, p);
        run = p + 1;
      }
    }
    return bytes;
  }
  if (s->nfree == 0 && s->high == s->bump) return 0;

  // Which slots are free: the bitmap plus the parked slots.
  uint64_t free_map[kSpanBitmapWords];
  const size_t words = bitmap_words(s->bump);
  const SpanBitmap bits(s);
  for (size_t w = 0; w < words; w++) free_map[w] = bits[w];
  if (s->parked > 0) purged_slots(s, size, free_map);

  // A page can go when it lies wholly in the carved part and every slot
  // touching it is free, or wholly above the carved part.
  const size_t full_pages = carved_bytes >> kPageShift;
  const size_t first_uncarved_page = (carved_bytes + kPageSize - 1) >> kPageShift;
  size_t bytes = 0;
  size_t run = 0;
  bool run_open = false;
  bool parked_more = false;
  for (size_t p = 0; p <= touched_pages; p++) {
    bool take = false;
    if (p < touched_pages && !span_page_purged(s, p)) {
      if (p < full_pages) {
        take = true;
        size_t first = (p << kPageShift) / size;
        size_t last = (((p + 1) << kPageShift) - 1) / size;
        for (size_t i = first; i <= last && take; i++) take = test_bit(free_map, i);
      } else {
        take = p >= first_uncarved_page;
      }
    }
    if (take && !run_open) {
      run = p;
      run_open = true;
    } else if (!take && run_open) {
      size_t got = decommit_pages(s, run, p);
      if (got != 0) {
        for (size_t q = run; q < p; q++) span_set_purged(s, q);
        parked_more |= run < full_pages;
      }
      bytes += got;
      run_open = false;
    }
  }

  if (parked_more) {
    // Free slots touching a purged page leave the bitmap: they are parked.
    uint64_t parked[kSpanBitmapWords] = {};
    purged_slots(s, size, parked);
    uint32_t nfree = 0, total = 0;
    for (size_t w = 0; w < words; w++) {
      total += static_cast<uint32_t>(__builtin_popcountll(free_map[w]));
      bits[w] = free_map[w] & ~parked[w];
      nfree += static_cast<uint32_t>(__builtin_popcountll(bits[w]));
    }
    s->nfree = nfree;
    s->parked = total - nfree;
    s->hint = first_nonzero_word(s);
  }
  return bytes;
}

bool span_slot_parked(const Span* s, size_t idx) {
  return s->parked > 0 && overlaps_purged(s, idx, class_size(s->cls));
}

bool span_is_free_slot(Span* s, const void* p) {
  size_t i = span_slot(s, p);
  return ((SpanBitmap(s)[i >> 6] >> (i & 63)) & 1) || span_slot_parked(s, i);
}

size_t span_resident_pages(const Span* s) {
  size_t touched = (size_t{s->high} * class_size(s->cls) + kPageSize - 1) >> kPageShift;
  size_t purged = count_purged(s);
  return touched > purged ? touched - purged : 0;
}

}  // namespace ebb
