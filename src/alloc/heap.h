// libebb's internal structures and the functions that connect them.
//
//   thread cache (tcache.cc)   per thread, per class: a short free list; no locks.
//        | refill / flush in batches
//   bins (bin.cc)              per class: a lock and the spans that have free objects.
//        | spans
//   spans (span.cc)            objects of one class in 64 KiB..1 MiB; purge free pages.
//        | slices
//   segments (segment.cc)      4 MiB aligned mappings cut into 64 KiB slices.
//   large (large.cc)           objects > 128 KiB: a mapping each, small cache.
//   purger (purge.cc)          background thread: gives idle free pages back.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "config.h"
#include "lock.h"
#include "size_class.h"

// Everything declared here is internal to libebb. Hidden visibility also on
// the declarations (-fvisibility=hidden covers definitions only) lets the
// fast paths load globals such as g_free_key directly instead of through the GOT.
#pragma GCC visibility push(hidden)

namespace ebb {

// A free object's first 16 bytes. The key marks it free, so that a second
// free of the same object is recognised cheaply; it sits in the second word,
// which a late write to a freed object's first word (a reference count) leaves.
struct FreeObj {
  uint64_t unused;
  uint64_t key;
};

constexpr size_t kSpanBitmapWords = 4096 / 64;  // one bit per slot: 4096 slots at most

// A span's descriptor lives in its segment's header page, next to those of
// the other spans of the segment: 56 bytes, so that all of them, with the
// rest of the header, fit one page. The free bitmap and the purged-page bits
// are in the segment too (Segment::free_bits, Segment::purged).
struct Span {
  uint8_t* start;  // the first object (the span's first slice)
  Span* next;      // in the bin's list of spans with free objects
  Span* prev;
  uint32_t used;     // objects out: with the program or in a thread cache
  uint32_t bump;     // slots carved so far; slots [bump, capacity) are neither in use nor listed
  uint16_t high;     // highest bump since the span was made: pages below it may be resident
  uint16_t hint;     // free bitmap words below this one are zero
  uint32_t nfree;    // bits set in the free bitmap
  uint32_t parked;   // free slots left out of the bitmap because they overlap purged pages
  uint32_t touched;  // low 32 bits of now_ms() when objects last came back (decay clock)
  uint32_t taken;    // low 32 bits of now_ms() when objects were last taken out (see cold())
  uint8_t cls;       // size class; 0 while the slices are not a span
  uint8_t slice;     // index of the span's first slice in its segment
  uint8_t nslices;
  bool in_list : 1;  // in the bin's list
  bool dirty : 1;    // objects came back since the last purge
  bool cold : 1;     // became (almost) empty while cold since the last purge (bin.cc)
  bool sampled : 1;  // holds (or held) an object sampled by the profiler: frees go to profile_free

  bool full() const { return nfree == 0 && parked == 0 && bump == kClasses[cls].capacity; }
};
static_assert(sizeof(Span) == 56, "64 span descriptors and the segment header share one page");
static_assert(sizeof(Span) % sizeof(uint64_t) == 0, "spare descriptors hold whole bitmap words");

enum SegmentKind : uint32_t { kSmallSegment = 1, kLargeSegment = 2 };
// SegmentHeader::large_state, read by free() without a lock (atomically).
enum LargeState : uint32_t {
  kLargeLive = 1,
  kLargeCached = 2,
  kLargeGoing = 3,   // being unmapped
  kLargeMoving = 4,  // realloc is growing or moving its mapping
};
constexpr uint64_t kSegmentMagic = 0x65626273656730ull;  // "ebbseg0"

// Common to both kinds, at the very start of the mapping.
struct SegmentHeader {
  uint64_t magic;
  SegmentKind kind;
  uint32_t large_state;  // large: a LargeState
  size_t map_size;       // bytes mapped from the segment start
  size_t offset;         // large: the object starts at segment + offset
  size_t request;        // large: bytes asked for (for stats)
};

constexpr size_t kPagesPerSlice = kSliceSize / kPageSize;
constexpr size_t kPagesPerSegment = kSegmentSize / kPageSize;

// The header of a small segment, in its slice 0. Everything but the free
// bitmaps fits the first page; the bitmaps start on the second. A segment of
// one busy class then keeps two or three header pages resident (0.2% of 4 MiB).
struct Segment {
  SegmentHeader h;
  Segment* next;  // all small segments, oldest first
  Segment* prev;
  uint64_t free_slices;  // bit i: slice i belongs to no span (and is not resident)
  uint32_t empty_since;  // now_ms() when the last span left (all slices free)
  // Where the descriptor of the span covering slice i is: its byte offset
  // from spans[0] (56 times the span's first slice; 0: none). spans[0] is
  // never a span (slice 0 is this header) and stays all zero (start, size
  // class and carved slots 0), which is what makes free() reject a pointer
  // into a slice of no span (checked_span). Offsets rather than slice
  // numbers spare free() a multiply.
  uint16_t span_at[kSlicesPerSegment];
  uint64_t purged[kPagesPerSegment / 64];  // pages given back to the OS while their span lives
  // Sampled objects still live per span, by the span's first slice (the
  // profiler's; 255 sticks): the span's `sampled` bit goes when it is 0.
  uint8_t sampled_live[kSlicesPerSegment];
  Span spans[kSlicesPerSegment];  // the descriptor of the span starting at slice i
  // The spans' free bitmaps, stored by cache line: line 0 (words 0-7) of every
  // span, then line 1 of every span, and so on. A class that needs few words
  // per span (all but the smallest) then touches one page of bitmap per
  // segment instead of eight.
  alignas(kPageSize) uint64_t free_bits[kSpanBitmapWords / 8][kSlicesPerSegment][8];
  // The profiler's filter, by the span's first slice: bit (slot % 64) is set
  // for each live sampled object, so that most frees from a span holding one
  // skip the table lookup. After the bitmaps: its page is touched only while
  // profiling.
  uint64_t sampled_slots[kSlicesPerSegment];
};
static_assert(offsetof(Segment, free_bits) == kPageSize, "the header but the bitmaps fits one page");
static_assert(sizeof(Segment) <= kSliceSize * kFirstSpanSlice, "segment header must fit its slices");
static_assert(kFirstSpanSlice >= 1, "spans[0] must never be a span: free() relies on it being zero");
static_assert((kSlicesPerSegment - 1) * sizeof(Span) <= UINT16_MAX, "Segment::span_at holds byte offsets");
// Segment::span_at's value for a span starting at `slice`.
constexpr uint16_t span_offset(size_t slice) { return static_cast<uint16_t>(slice * sizeof(Span)); }

EBB_INLINE Segment* segment_of_span(const Span* s) {
  return reinterpret_cast<Segment*>(reinterpret_cast<uintptr_t>(s) & ~kSegmentMask);
}

struct Bin {
  Lock lock;
  Span* head = nullptr;  // spans with free objects
  uint64_t out = 0;      // objects handed to threads (live or thread-cached)
  uint32_t spans = 0;    // spans of this class
  // Bytes refills ever took from this bin's spans: the recent allocation
  // demand the purger weighs (purge.cc). Written under `lock` with a plain
  // store; read by the purger without it.
  std::atomic<uint64_t> taken_bytes{0};
} __attribute__((aligned(64)));

// ---- global state -----------------------------------------------------------
struct Counters {
  std::atomic<uint64_t> mapped{0};          // bytes mapped (segments + large)
  std::atomic<uint64_t> purged_total{0};    // bytes given back with madvise, ever
  std::atomic<uint64_t> purge_calls{0};     // madvise calls
  std::atomic<uint64_t> unmapped_total{0};  // bytes given back with munmap, ever
  std::atomic<uint64_t> large_live{0};      // bytes of live large objects (requested)
  std::atomic<uint64_t> large_objects{0};   // live large objects
  std::atomic<uint64_t> large_cached{0};    // bytes mapped by cached large blocks
  std::atomic<uint64_t> segments{0};
  std::atomic<uint64_t> released_allocs{0};  // allocations/bytes of exited threads
  std::atomic<uint64_t> released_bytes{0};
};

extern Bin g_bins[kNumClasses + 1];
extern Counters g_counters;
extern uint64_t g_free_key;  // random; marks free objects

// ---- init and options (init.cc, options.cc) ---------------------------------
struct Options {
  uint32_t purge_delay_ms = 250;  // EBB_PURGE_DELAY_MS: free pages idle this long go back
  uint32_t empty_delay_ms = 30;   // EBB_EMPTY_DELAY_MS: the same for spans with at most 1/16 live
  bool background = true;         // EBB_BACKGROUND=0: no purger thread (purge on activity only)
  uint32_t tcache_bytes = 16384;  // EBB_TCACHE_BYTES: per class and thread, at most 16384 (0: no thread cache)
  uint32_t large_cache_mb = 32;   // EBB_LARGE_CACHE_MB: freed large blocks kept for reuse
  uint32_t busy_window_ms = 500;  // EBB_BUSY_WINDOW_MS: free spans up to what was allocated this recently stay
  bool verbose = false;           // EBB_VERBOSE=1: print the options at start
  // Read at start-up like the rest: the purger opens the page later, from
  // inside some free(), and that free() may be setenv() replacing the very
  // array getenv() would read.
  bool telemetry = false;          // EBB_TELEMETRY=1
  char telemetry_dir[200] = {};    // EBB_TELEMETRY_DIR ("" if unset; too long: telemetry stays off)
  char profile_prefix[200] = {};   // EBB_PROFILE: capture files <prefix>.<pid>.ebbprof ("": profiling off)
  uint32_t profile_rate = 524288;  // EBB_PROFILE_RATE: mean bytes between samples (0 or 1: every allocation)
  bool profile_native = false;     // EBB_PROFILE_NATIVE=1: native stacks too
};
extern Options g_options;
void options_load();
void ensure_init();

// ---- segments (segment.cc) --------------------------------------------------
// One bit per 4 MiB of address space, set where a small segment starts
// (segment.cc); large blocks have registries of their own.
constexpr size_t kRegistryWords = size_t{1} << (kAddressBits - kSegmentShift - 6);
extern std::atomic<uint64_t> g_registry[kRegistryWords];
void registry_set(uintptr_t seg, bool on);
EBB_INLINE bool registry_has(uintptr_t seg) {
  size_t bit = seg >> kSegmentShift;
  if (EBB_UNLIKELY(bit >> 6 >= kRegistryWords)) return false;
  return (g_registry[bit >> 6].load(std::memory_order_acquire) >> (bit & 63)) & 1;
}
// Large blocks: those whose header starts a 4 MiB chunk, and those aligned to
// 4 MiB or more, which start a chunk themselves with their header in the page
// before ("shifted").
void registry_set_large(uintptr_t seg, bool on);
void registry_set_shifted(uintptr_t chunk, bool on);
SegmentHeader* segment_of_large(const void* p);
// The segment header for p if p lies inside memory libebb mapped, else nullptr.
EBB_INLINE SegmentHeader* segment_of(const void* p) {
  uintptr_t s = reinterpret_cast<uintptr_t>(p) & ~kSegmentMask;
  if (EBB_LIKELY(registry_has(s))) return reinterpret_cast<SegmentHeader*>(s);  // small: maps all 4 MiB
  return segment_of_large(p);
}
Span* segment_alloc_span(unsigned nslices);  // clean (non-resident) slices
void segment_free_span(Span* span);          // the span's pages must already be purged
size_t segments_release(uint64_t now, bool force);
extern Lock g_segment_lock;
extern Segment* g_segments;

// ---- spans (span.cc) --------------------------------------------------------
void span_init(Span* s, unsigned cls);
// Takes up to `want` free objects from s into the slots below `end`, the
// lowest address at end[-1] (a cache hands out its top slot first); returns
// how many: they are end[-got .. -1].
uint32_t span_take(Span* s, uint32_t want, FreeObj** end);
// Gives pages that hold no live object back to the OS; returns bytes purged.
size_t span_purge(Span* s);
// The last object came back: start carving from the first slot again, so the
// span is reused in address order instead of in the order it was freed.
void span_reset(Span* s);
// Page `page` of span s was given back while the span lives (Segment::purged).
bool span_page_purged(const Span* s, size_t page);
void span_set_purged(Span* s, size_t page);
void span_clear_purged(Span* s, size_t page);
bool span_is_free_slot(Span* s, const void* p);  // for double-free reports (slow)
// Whether slot idx overlaps a purged page. A live object never does (a page
// is purged only when every slot on it is free), so an object coming back
// on one was already free: its key, which a double free would have shown,
// went with the page.
bool span_slot_parked(const Span* s, size_t idx);
size_t span_resident_pages(const Span* s);
// Where a span's free bitmap lives. A span of n slices uses only the first of
// its n descriptors: the other n - 1 (7 words each, in the header page that
// is resident anyway) hold the bitmap's first words, which for every class
// above ~300 bytes is the whole bitmap. The rest is in Segment::free_bits,
// whose pages are then touched only by small classes in one-slice spans.
constexpr size_t kSpareWords = sizeof(Span) / sizeof(uint64_t);
// Span s's bitmap words, their places computed once (in a loop, a store to a
// word could alias the descriptor, and the compiler would reload it).
struct SpanBitmap {
  uint64_t* spare = nullptr;  // words [0, nspare): the spare descriptors, s + 1 onwards
  size_t nspare = 0;
  uint64_t* lines = nullptr;  // the others: line w / 8 of Segment::free_bits for this span
  SpanBitmap() = default;
  explicit SpanBitmap(const Span* s)
      : spare(reinterpret_cast<uint64_t*>(const_cast<Span*>(s) + 1)),
        nspare(kSpareWords * (s->nslices - 1u)),
        lines(&segment_of_span(s)->free_bits[0][0][0] + size_t{s->slice} * 8) {}
  EBB_INLINE uint64_t& operator[](size_t w) const {
    if (w < nspare) return spare[w];
    return lines[(w / 8) * kSlicesPerSegment * 8 + w % 8];
  }
};

// Slot index of object p in span s.
EBB_INLINE size_t span_slot(const Span* s, const void* p) {
  uint64_t off = static_cast<uint64_t>(static_cast<const uint8_t*>(p) - s->start);
  return static_cast<size_t>((off * kClasses[s->cls].recip) >> 40);
}
// The span covering p; a slice in no span gives spans[0], whose class is 0.
EBB_INLINE Span* span_of(SegmentHeader* h, const void* p) {
  auto* seg = reinterpret_cast<Segment*>(h);
  size_t slice = (reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(h)) >> kSliceShift;
  return reinterpret_cast<Span*>(reinterpret_cast<uint8_t*>(seg->spans) + seg->span_at[slice]);
}

// ---- bins (bin.cc) ----------------------------------------------------------
// Puts up to `want` objects in out[0..got), the lowest address last (the
// cache hands out its last slot first). Returns got.
uint32_t bin_refill(unsigned cls, uint32_t want, FreeObj** out);
// What a flush must tell the purger: call purge_notify(emptied, cold) once
// the caller's cache is consistent again (it may start the purger thread,
// and creating a thread allocates, perhaps from that very cache).
struct Flushed {
  bool emptied;
  bool cold;
};
// Gives the n objects objs[0..n) back to their spans.
[[nodiscard]] Flushed bin_flush(unsigned cls, FreeObj* const* objs, uint32_t n);
// *pending: a dirty span waits for its delay; *empty_pending: a sparse one
// may go after the short delay (the purger then looks again sooner).
// *cold_purged: a span that went cold and (almost) empty since the last pass
// gave pages back (more may follow soon: see cold() in bin.cc).
size_t bins_purge(uint64_t now, bool force, uint64_t warm, bool* pending, bool* empty_pending, bool* cold_purged,
                  bool* kept_warm);
uint64_t bins_taken();  // the sum of the bins' taken_bytes
// Whether the (almost) empty spans whose short delay has passed at `now`
// hold a big enough share of the heap for that delay to apply (bin.cc).
bool bins_big_burst(uint64_t now);

// ---- large objects (large.cc) -----------------------------------------------
void* large_alloc(size_t size, size_t align, bool zero);
void large_free(SegmentHeader* h, void* p);
void* large_realloc(SegmentHeader* h, void* p, size_t size);
size_t large_usable(SegmentHeader* h, const void* p);
size_t large_release(uint64_t now, bool force, bool* pending);
extern Lock g_large_lock;

// ---- thread caches (tcache.cc) ----------------------------------------------
// Each class's cache is a stack of pointers (in ThreadCache::slots, a
// mapping per thread): malloc and free touch the stack, never the objects' memory (a list would
// make every malloc read the next object, often a cache miss). Capacity per
// class: `budget` bytes of objects (kMaxTcacheBytes; EBB_TCACHE_BYTES lowers
// it), at most 128, and at least one object up to kOneSlotMax: a string
// rebuilt by `s = s + t` frees an object of the very class it allocates
// next, and one slot turns that pair of trips to the bin into a pop and a
// push. Bigger classes get nothing: an idle thread's cache cannot be purged.
constexpr size_t kMaxTcacheBytes = 16384;
constexpr uint32_t kMaxCacheObjects = 128;
constexpr size_t kOneSlotMax = 32768;
constexpr uint32_t cache_objects(size_t size, size_t budget) {
  if (budget == 0) return 0;
  const size_t n = budget / size;
  if (n == 0) return size <= kOneSlotMax ? 1 : 0;
  return static_cast<uint32_t>(n > kMaxCacheObjects ? kMaxCacheObjects : n);
}
constexpr uint32_t cache_capacity(unsigned cls) {
  return cls == 0 ? 0 : cache_objects(class_to_size_calc(cls), kMaxTcacheBytes);
}
constexpr size_t cache_slots_total() {
  size_t n = 0;
  for (unsigned cls = 1; cls <= kNumClasses; cls++) n += cache_capacity(cls);
  return n;
}
constexpr size_t kCacheSlots = cache_slots_total();

// Bytes of one slot of a cache stack (a FreeObj*).
constexpr size_t kSlotSize = sizeof(void*);

// The low 16 bits of an address. A class's stack is under 64 KiB, so they
// tell its slots apart.
EBB_INLINE uint16_t lo16(const void* p) { return static_cast<uint16_t>(reinterpret_cast<uintptr_t>(p)); }

// A class's stack: its part of ThreadCache::slots, oldest object first. The
// fast paths read only `top` and compare its low bits with `low` (empty) or
// `high` (full), as jemalloc's cache bins do: no count to load and store.
struct CacheBin {
  FreeObj** top;   // one past the newest object
  uint16_t low;    // lo16 of the first slot: empty when lo16(top) == low
  uint16_t high;   // lo16 of the slot past the last usable one: full when lo16(top) == high
  uint16_t batch;  // objects the next refill asks for: starts small, doubles up to max/2
  uint16_t cold;   // slow-path calls left before this class gets a cache (0: it has one)

  // Objects below `t`, a value of `top` (stats read another thread's).
  uint32_t count_at(const FreeObj* const* t) const { return static_cast<uint16_t>(lo16(t) - low) / kSlotSize; }
  uint32_t count() const { return count_at(top); }
  uint32_t max() const { return static_cast<uint16_t>(high - low) / kSlotSize; }
  FreeObj** base() const { return top - count(); }
  void set_max(uint32_t n) { high = static_cast<uint16_t>(low + n * kSlotSize); }
};
struct ThreadCache {
  CacheBin bins[kNumClasses + 1];
  uint64_t allocs;       // malloc-family calls served, for stats
  uint64_t alloc_bytes;  // bytes requested
  int state;             // 0 new, 1 active, 2 thread exiting: bypass the cache
  ThreadCache* next;     // registry of live caches, for stats
  ThreadCache* prev;
  // The stacks of all classes: kCacheSlots pointers, mapped when the thread
  // first allocates (tcache.cc). Not in the thread-local block itself: glibc
  // carves that from each thread's stack, and 24 KiB more would fail threads
  // made with small stacks (32 KiB is Python's threading.stack_size minimum).
  FreeObj** slots;
  // Profiling (profile.cc): the value of alloc_bytes at which the next
  // sampled byte falls. 0 at first, so that a thread's first allocation
  // asks; UINT64_MAX while profiling is off.
  uint64_t sample_at;
  uint64_t rng;       // the thread's sampling gaps (xorshift)
  uint32_t tid;       // gettid(), once
  bool sample_armed;  // sample_at is a real sample point
  bool in_profile;    // inside profile.cc: its own work is not sampled
};
extern __thread ThreadCache t_cache __attribute__((tls_model("initial-exec")));
void* tcache_alloc_slow(unsigned cls);
void tcache_free_slow(unsigned cls, FreeObj* obj);
void tcache_flush_all(ThreadCache* tc);
extern Lock g_tcache_lock;
extern ThreadCache* g_tcaches;

// ---- purging (purge.cc) -----------------------------------------------------
// Objects came back: make sure the purger will look within the delay (and
// start it if this process has none yet). Cheap enough for every flush.
// `emptied`: a span lost its last live object (it decays faster).
// `cold`: and nothing was taken from it for twice the short delay (it goes
// at once; see bin.cc).
void purge_notify(bool emptied = false, bool cold = false);
// One pass over everything that can hold free memory; `force` ignores the
// delay. Sets *pending when something stays for a later pass. Returns bytes.
size_t purge_all(bool force, bool* pending, bool* empty_pending = nullptr, bool* cold_purged = nullptr);
void purger_after_fork_child();
// The delays changed (tests set g_options): wake the purger, which may be
// sleeping out a tick computed from the old ones, so that it looks again.
void purger_options_changed();
// Whether a purger thread runs or will start (not EBB_BACKGROUND=0, and
// creating it did not fail): what waits for it is given back in time.
bool purger_available();

// Threads that have a thread cache and have not exited. When the last one
// leaves through pthread_exit, the purger must leave too: a process lives as
// long as any of its threads, and the purger must not be the one keeping it.
void threads_started();
void threads_exited();
void threads_after_fork_child(bool caller_has_cache);

// Starts the purger thread now if it is not running (and creates the
// telemetry page first when EBB_TELEMETRY=1).
void purger_start();

// ---- telemetry page (telemetry.cc, layout in src/telemetry/page.h) ----------
bool telemetry_wanted();
void telemetry_open();
void telemetry_publish(bool force);
void telemetry_serve();
// How long the purger may sleep: the purge tick when something is pending,
// capped by the next stats publication; 0 = no limit (telemetry off, idle).
uint32_t telemetry_wait_ms(bool pending, uint32_t tick_ms);
std::atomic<uint32_t>* telemetry_wake_word();  // nullptr when telemetry is off
bool telemetry_over_soft_limit();
void telemetry_count_pass();
void telemetry_after_fork_child();

// ---- profiling (profile.cc, format in src/profile/capture_format.h) ---------
extern bool g_profile_on;
void profile_start();  // EBB_PROFILE is set: open the capture (library constructor)
// Profiling turned on and off in a running process (telemetry commands, run
// by the purger thread): 0 or a telemetry::AckError / errno. path gets the
// capture file's name.
constexpr size_t kMaxProfilePrefix = 256;  // bytes, with its NUL
// follow_fork: children forked afterwards write their own capture.
int32_t profile_attach(const char* prefix, uint64_t rate, bool follow_fork, char* path, size_t cap);
int32_t profile_detach(char* path, size_t cap);
// The purger thread's call, each time it wakes: four times a second, the
// process's memory statistics go into the capture.
void profile_tick();
// Allocation p of `size` bytes reached its thread's sample point (alloc.h).
EBB_NOINLINE void profile_alloc(void* p, size_t size);
// A large object is being freed while profiling is on.
EBB_NOINLINE void profile_free(const void* p);
// Small object p of span s, which is marked `sampled`, is being freed.
EBB_NOINLINE void profile_free_small(Span* s, const void* p);
void profile_before_fork();
void profile_after_fork_parent();
void profile_after_fork_child();

// ---- fork (fork.cc) ---------------------------------------------------------
void fork_register();

}  // namespace ebb

#pragma GCC visibility pop
