// Spans: the objects of one size class in 1..16 slices, and giving back the
// pages inside a span that hold no live object.
//
// Fresh slots are carved lazily (`bump`), so a new span touches only the
// pages it hands out. A purged page's free slots are "parked": kept out of
// the free list, because their links were in the page the kernel just
// zeroed. They come back (unparked) only when the span runs out of other free
// slots, which is when refaulting the page is worth it.
#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

namespace {

EBB_INLINE uint32_t slot_index(const Span* s, const void* p) {
  uint64_t off = static_cast<uint64_t>(static_cast<const uint8_t*>(p) - s->start);
  return static_cast<uint32_t>((off * kClasses[s->cls].recip) >> 40);
}

bool page_purged(const Span* s, size_t page) { return (s->purged[page >> 6] >> (page & 63)) & 1; }
void set_purged(Span* s, size_t page) { s->purged[page >> 6] |= uint64_t{1} << (page & 63); }
bool any_purged(const Span* s) {
  for (uint64_t w : s->purged)
    if (w != 0) return true;
  return false;
}

// Pages [first, last] that slot `idx` overlaps.
EBB_INLINE size_t first_page(size_t idx, size_t size) { return idx * size >> kPageShift; }
EBB_INLINE size_t last_page(size_t idx, size_t size) { return (idx * size + size - 1) >> kPageShift; }

bool overlaps_purged(const Span* s, size_t idx, size_t size) {
  for (size_t p = first_page(idx, size); p <= last_page(idx, size); p++)
    if (page_purged(s, p)) return true;
  return false;
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

// Puts the parked slots back on the free list (which is empty when called).
void unpark(Span* s) {
  const size_t size = class_size(s->cls);
  const size_t pages = s->bytes() >> kPageShift;
  FreeObj* head = nullptr;
  FreeObj** tail = &head;
  size_t next_slot = 0;
  uint32_t n = 0;
  for (size_t p = 0; p < pages; p++) {
    if (!page_purged(s, p)) continue;
    size_t first = (p << kPageShift) / size;
    size_t last = (((p + 1) << kPageShift) - 1) / size;
    if (last >= s->bump) last = s->bump - 1;
    for (size_t i = first > next_slot ? first : next_slot; i <= last; i++) {
      auto* o = reinterpret_cast<FreeObj*>(s->start + i * size);
      *tail = o;
      tail = &o->next;
      n++;
    }
    next_slot = last + 1;
  }
  *tail = s->free;
  s->free = head;
  s->nfree += n;
  s->parked = 0;
  memset(s->purged, 0, sizeof s->purged);
}

}  // namespace

void span_init(Span* s, unsigned cls) {
  s->free = nullptr;
  s->next = s->prev = nullptr;
  s->used = s->bump = s->nfree = s->parked = 0;
  s->touched = 0;
  s->cls = static_cast<uint16_t>(cls);
  s->in_list = false;
  s->dirty = false;
  memset(s->purged, 0, sizeof s->purged);
}

uint32_t span_take(Span* s, uint32_t want, FreeObj** head) {
  const uint32_t size = kClasses[s->cls].size;
  const uint32_t cap = kClasses[s->cls].capacity;
  if (s->nfree == 0 && s->bump == cap && s->parked > 0) unpark(s);
  uint32_t got = 0;
  if (s->nfree > 0) {
    // Cut the first `want` objects off the free list, keeping their order.
    FreeObj* first = s->free;
    FreeObj* last = first;
    got = 1;
    while (got < want && last->next != nullptr) {
      last = last->next;
      got++;
    }
    s->free = last->next;
    s->nfree -= got;
    last->next = *head;
    *head = first;
  }
  if (got < want && s->bump < cap) {
    uint32_t n = want - got;
    if (n > cap - s->bump) n = cap - s->bump;
    // Carve slots bump .. bump+n-1, linked in address order.
    uint8_t* p = s->start + size_t{s->bump} * size;
    FreeObj* first = reinterpret_cast<FreeObj*>(p);
    for (uint32_t i = 0; i + 1 < n; i++, p += size)
      reinterpret_cast<FreeObj*>(p)->next = reinterpret_cast<FreeObj*>(p + size);
    reinterpret_cast<FreeObj*>(p)->next = *head;
    *head = first;
    s->bump += n;
    got += n;
  }
  s->used += got;
  return got;
}

size_t span_purge(Span* s) {
  const size_t size = class_size(s->cls);
  const size_t carved_bytes = size_t{s->bump} * size;
  s->dirty = false;
  if (s->used == 0) {
    // Nothing live: every touched page goes, then the slices go back to the segment.
    size_t end = (carved_bytes + kPageSize - 1) >> kPageShift;
    size_t bytes = 0;
    size_t run = 0;
    for (size_t p = 0; p <= end; p++) {
      bool skip = p == end || page_purged(s, p);
      if (skip) {
        bytes += decommit_pages(s, run, p);
        run = p + 1;
      }
    }
    return bytes;
  }
  if (s->nfree == 0) return 0;

  // Which slots are free: the free list plus the parked slots.
  uint64_t free_bits[4096 / 64];
  const size_t words = (s->bump + 63) / 64;
  memset(free_bits, 0, words * sizeof(uint64_t));
  for (FreeObj* o = s->free; o != nullptr; o = o->next) {
    uint32_t i = slot_index(s, o);
    free_bits[i >> 6] |= uint64_t{1} << (i & 63);
  }
  const bool had_purged = any_purged(s);
  if (had_purged) {
    for (size_t i = 0; i < s->bump; i++)
      if (overlaps_purged(s, i, size)) free_bits[i >> 6] |= uint64_t{1} << (i & 63);
  }
  auto is_free = [&](size_t i) { return (free_bits[i >> 6] >> (i & 63)) & 1; };

  // A page can go when it lies wholly in the carved part (so carving never
  // runs into it) and every slot touching it is free.
  const size_t full_pages = carved_bytes >> kPageShift;
  size_t bytes = 0;
  size_t run = 0;
  bool run_open = false;
  for (size_t p = 0; p <= full_pages; p++) {
    bool take = false;
    if (p < full_pages && !page_purged(s, p)) {
      take = true;
      size_t first = (p << kPageShift) / size;
      size_t last = (((p + 1) << kPageShift) - 1) / size;
      for (size_t i = first; i <= last && take; i++) take = is_free(i);
    }
    if (take && !run_open) {
      run = p;
      run_open = true;
    } else if (!take && run_open) {
      size_t got = decommit_pages(s, run, p);
      if (got != 0)
        for (size_t q = run; q < p; q++) set_purged(s, q);
      bytes += got;
      run_open = false;
    }
  }
  if (bytes == 0) return 0;

  // Rebuild the free list from the slots that do not touch a purged page, in
  // address order (reads no purged page: the links are written fresh).
  FreeObj* head = nullptr;
  FreeObj** tail = &head;
  uint32_t nfree = 0;
  uint32_t total = 0;
  for (size_t i = 0; i < s->bump; i++) {
    if (!is_free(i)) continue;
    total++;
    if (overlaps_purged(s, i, size)) continue;
    auto* o = reinterpret_cast<FreeObj*>(s->start + i * size);
    *tail = o;
    tail = &o->next;
    nfree++;
  }
  *tail = nullptr;
  s->free = head;
  s->nfree = nfree;
  s->parked = total - nfree;
  return bytes;
}

bool span_is_free_slot(Span* s, const void* p) {
  for (FreeObj* o = s->free; o != nullptr; o = o->next)
    if (o == p) return true;
  return s->parked > 0 && overlaps_purged(s, slot_index(s, p), class_size(s->cls));
}

size_t span_resident_pages(const Span* s) {
  size_t carved = (size_t{s->bump} * class_size(s->cls) + kPageSize - 1) >> kPageShift;
  size_t purged = 0;
  for (uint64_t w : s->purged) purged += static_cast<size_t>(__builtin_popcountll(w));
  return carved > purged ? carved - purged : 0;
}

}  // namespace ebb
