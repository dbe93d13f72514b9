// Bins: per size class, the spans that have free objects, behind one lock.
// Threads come here only in batches (refill, flush), so the lock is taken
// once per several dozen malloc/free calls, never on the fast path.
#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

Bin g_bins[kNumClasses + 1];

namespace {

// A span with at most this many objects live is "sparse": (almost) all that
// a burst left behind is free, so it is purged after the short delay.
uint32_t sparse_max(unsigned cls) { return kClasses[cls].capacity / 16u; }

// A span nothing was taken from for twice the short delay holds what the
// program built a while ago and is now letting go of (a `del` of a big
// structure). Once sparse it goes back at the purger's next look, with no
// delay: waiting would keep its freed pages resident, on top of the peak
// and of the free-bitmap pages its frees touch, while the `del` runs.
// Spans the program allocates from keep their delay against refaults; a
// span reused more than the short delay after it emptied would have been
// purged anyway.
bool cold(const Span* s, uint64_t now) {
  return os::elapsed_ms(now, s->taken) >= 2 * uint64_t{g_options.empty_delay_ms};
}

void list_push(Bin& b, Span* s) {
  s->prev = nullptr;
  s->next = b.head;
  if (b.head != nullptr) b.head->prev = s;
  b.head = s;
  s->in_list = true;
}

void list_remove(Bin& b, Span* s) {
  if (s->prev != nullptr)
    s->prev->next = s->next;
  else
    b.head = s->next;
  if (s->next != nullptr) s->next->prev = s->prev;
  s->next = s->prev = nullptr;
  s->in_list = false;
}

}  // namespace

uint32_t bin_refill(unsigned cls, uint32_t want, FreeObj** out) {
  Bin& b = g_bins[cls];
  const auto now = static_cast<uint32_t>(os::now_ms());
  uint32_t got = 0;
  {
    LockGuard guard(b.lock);
    while (got < want) {
      Span* s = b.head;
      if (s == nullptr) {
        s = segment_alloc_span(kClasses[cls].slices);
        if (s == nullptr) break;
        span_init(s, cls);
        list_push(b, s);
        b.spans++;
      }
      got += span_take(s, want - got, out + want - got);
      s->taken = now;
      s->cold = false;
      if (s->full()) list_remove(b, s);
    }
    b.out += got;
    b.taken_bytes.store(b.taken_bytes.load(std::memory_order_relaxed) + uint64_t{got} * class_size(cls),
                        std::memory_order_relaxed);
  }
  // Out of memory: what was found is at the top of out[]; move it down.
  if (got < want) memmove(static_cast<void*>(out), out + (want - got), got * kSlotSize);
  return got;
}

namespace {

enum : unsigned { kEmptied = 1, kCold = 2 };

// `k` objects of span s came back (their bits are set; the bitmap words
// below `hint` are zero): the span's counters, once per run of neighbours.
// Returns kEmptied when the span became empty or sparse, with kCold if it
// is cold.
unsigned span_returned(Bin& b, Span* s, uint32_t k, size_t hint, uint32_t now, uint32_t sparse) {
  const uint32_t before = s->used;
  // More back than out: the batch held an object of s twice, and an earlier
  // run of the batch emptied s, which cleared its bitmap (span_reset).
  if (EBB_UNLIKELY(k > before)) os::fatal_pointer("free", "double free of an object in the span at", s->start);
  s->hint = static_cast<uint16_t>(hint);
  s->nfree += k;
  s->used -= k;
  s->touched = now;
  s->dirty = true;
  bool emptied = false;
  if (s->used == 0) {
    span_reset(s);
    emptied = true;
  } else if (before > sparse && s->used <= sparse) {
    emptied = true;  // now mostly free: the short delay applies (bins_purge)
  }
  if (!s->in_list) list_push(b, s);
  if (!emptied) return 0;
  if (!cold(s, now)) return kEmptied;
  s->cold = true;
  return kEmptied | kCold;
}

}  // namespace

namespace {

// The object in slot `slot` of span s came back while already free.
[[noreturn]] EBB_NOINLINE void double_free(const Span* s, size_t slot) {
  os::fatal_pointer("free", "double free", s->start + slot * class_size(s->cls));
}

// Aborts if one of the slots `add` of bitmap word w overlaps a purged page:
// that object was already free (see span_slot_parked).
EBB_NOINLINE void check_parked(const Span* s, size_t w, uint64_t add) {
  for (; add != 0; add &= add - 1) {
    const size_t slot = w * 64 + static_cast<size_t>(__builtin_ctzll(add));
    if (span_slot_parked(s, slot)) double_free(s, slot);
  }
}

// Sets the bits `add` in word w of a span's free bitmap, which were clear
// unless an object was freed twice; lowers the span's hint to w if needed.
EBB_INLINE void bitmap_add(const Span* s, const SpanBitmap& bits, size_t w, uint64_t add, size_t* hint) {
  uint64_t& word = bits[w];
  if (EBB_UNLIKELY(word & add)) double_free(s, w * 64 + static_cast<size_t>(__builtin_ctzll(word & add)));
  if (EBB_UNLIKELY(s->parked != 0)) check_parked(s, w, add);
  word |= add;
  if (w < *hint) *hint = w;
}

}  // namespace

Flushed bin_flush(unsigned cls, FreeObj* const* objs, uint32_t n) {
  Bin& b = g_bins[cls];
  const auto now = static_cast<uint32_t>(os::now_ms());
  const uint32_t sparse = sparse_max(cls);
  const uintptr_t span_bytes = uintptr_t{kClasses[cls].slices} << kSliceShift;
  const uint64_t recip = kClasses[cls].recip;
  unsigned emptied = 0;
  {
    LockGuard guard(b.lock);
    // A flushed batch is mostly runs of objects from one span, and of
    // neighbours in its bitmap (they were carved together): the span is
    // looked up when the run changes, its counters are updated at the end of
    // the run, and the bits of one bitmap word are gathered in a register and
    // stored together.
    Span* s = nullptr;
    uintptr_t start = 0;
    SpanBitmap bits;
    uint32_t run = 0;
    size_t hint = 0;
    size_t w = 0;           // the bitmap word that `gathered` belongs to
    uint64_t gathered = 0;  // bits of word w freed by this batch, not stored yet
    for (uint32_t k = 0; k < n; k++) {
      FreeObj* o = objs[k];
      uintptr_t off = reinterpret_cast<uintptr_t>(o) - start;
      if (off >= span_bytes) {
        if (run != 0) {
          bitmap_add(s, bits, w, gathered, &hint);
          emptied |= span_returned(b, s, run, hint, now, sparse);
        }
        auto* h = reinterpret_cast<SegmentHeader*>(reinterpret_cast<uintptr_t>(o) & ~kSegmentMask);
        s = span_of(h, o);
        start = reinterpret_cast<uintptr_t>(s->start);
        off = reinterpret_cast<uintptr_t>(o) - start;
        bits = SpanBitmap(s);
        hint = s->hint;
        run = 0;
        gathered = 0;
      }
      const size_t i = static_cast<size_t>((off * recip) >> 40);
      if (i >> 6 != w) {
        if (gathered != 0) bitmap_add(s, bits, w, gathered, &hint);
        w = i >> 6;
        gathered = 0;
      }
      const uint64_t bit = uint64_t{1} << (i & 63);
      if (EBB_UNLIKELY(gathered & bit)) os::fatal_pointer("free", "double free", o);
      gathered |= bit;
      run++;
    }
    if (run != 0) {
      bitmap_add(s, bits, w, gathered, &hint);
      emptied |= span_returned(b, s, run, hint, now, sparse);
    }
    b.out -= n;
  }
  return Flushed{(emptied & kEmptied) != 0, (emptied & kCold) != 0};
}

namespace {

// A span with (almost) nothing live left is what a finished burst leaves
// behind: it goes back after the short delay, partly used spans (the
// working set) after the long one. "Almost": a few survivors of a burst
// (one object in a thousand kept) would otherwise hold the rest of their
// span's pages for the long delay.
bool is_sparse(const Span* s) { return s->used <= sparse_max(s->cls); }

// The short delay is for the end of a big burst: the (almost) empty spans
// it would purge must hold at least 1/kBurstShare of the bytes handed out.
// Fewer wait like the working set, for the long delay or until they go cold
// (cold() sends them at once): a program that frees and rebuilds a smaller
// part of its data every few tens of milliseconds (json_roundtrip: a fifth
// of it every ~50 ms) had it purged and faulted back in a loop.
constexpr size_t kBurstShare = 4;

}  // namespace

bool bins_big_burst(uint64_t now) {
  size_t due = 0, out = 0;
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    Bin& b = g_bins[cls];
    LockGuard guard(b.lock);
    const size_t size = class_size(cls);
    out += b.out * size;
    for (const Span* s = b.head; s != nullptr; s = s->next)
      if (s->dirty && is_sparse(s) && !cold(s, now) && os::elapsed_ms(now, s->touched) >= g_options.empty_delay_ms)
        due += size_t{s->high - s->used} * size;  // what may be resident and is free
  }
  return due * kBurstShare >= out;
}

uint64_t bins_taken() {
  uint64_t sum = 0;
  for (unsigned cls = 1; cls <= kNumClasses; cls++) sum += g_bins[cls].taken_bytes.load(std::memory_order_relaxed);
  return sum;
}

// `warm`: free bytes that may stay resident although their delay is over,
// because the program allocated that much just now and is likely to again
// (purge.cc: the busy window). Spans due for a purge keep their pages while
// the free bytes they hold fit in it.
size_t bins_purge(uint64_t now, bool force, uint64_t warm, bool* pending, bool* empty_pending, bool* cold_purged,
                  bool* kept_warm) {
  size_t bytes = 0;
  const bool short_delay = force || bins_big_burst(now);
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    Bin& b = g_bins[cls];
    LockGuard guard(b.lock);
    for (Span* s = b.head; s != nullptr;) {
      Span* next = s->next;
      if (s->dirty) {
        const bool empty = is_sparse(s);
        const bool at_once = empty && cold(s, now);
        const uint32_t delay = at_once ? 0 : empty && short_delay ? g_options.empty_delay_ms : g_options.purge_delay_ms;
        const bool due = force || os::elapsed_ms(now, s->touched) >= delay;
        const uint64_t free_bytes = uint64_t{s->high - s->used} * class_size(cls);
        if (due && !force && free_bytes <= warm) {
          warm -= free_bytes;  // the busy window keeps it, for now
          *pending = true;
          *kept_warm = true;
        } else if (due) {
          const size_t got = span_purge(s);
          // Only a span that just went cold and (almost) empty keeps the
          // purger on its short tick: a free into an old, already sparse
          // span is not the del of a big structure.
          if (s->cold && got != 0) *cold_purged = true;
          s->cold = false;
          bytes += got;
          if (s->used == 0) {
            list_remove(b, s);
            b.spans--;
            segment_free_span(s);
          }
        } else {
          *pending = true;
          // The short tick while a sparse span may still go after the short
          // delay: it has not waited it yet (it may be part of a big burst),
          // or it has and the burst is big. A small burst's spans wait for
          // the long delay, or to go cold, on the long tick.
          if (empty && (short_delay || os::elapsed_ms(now, s->touched) < g_options.empty_delay_ms))
            *empty_pending = true;
        }
      }
      s = next;
    }
  }
  return bytes;
}

}  // namespace ebb
