// Large objects (> 128 KiB): each gets its own mapping, aligned like a segment
// so free() finds its header by masking, with the object one page in.
// Freed blocks wait in a cache for the purge delay, so a program that
// allocates and frees big buffers in a loop does not pay mmap + page faults
// every time; then they are unmapped. The cache is sized by use: it holds at
// most as many bytes as the program had live in large blocks at its recent
// peak (at least EBB_LARGE_CACHE_MB), so a loop over twenty 25 MB buffers
// reuses them all, and an idle process still gives them back.
//
// A cached block is handed out whole, even when it is bigger than asked
// for: its pages are resident already, and a buffer that then grows by
// realloc (a list or a string being built, as CPython does each round of a
// loop) grows into them with no page faults and no syscall. Such a tail
// beyond the request is *slack*; so is what a shrinking realloc leaves. The
// purger unmaps slack once it has waited the purge delay, as it unmaps
// cached blocks. malloc_usable_size() never counts slack: the program must
// not write where the purger may unmap. When no cached block is big enough,
// the biggest one grows with mremap: its resident pages move, they are not
// faulted again, and only the new part is.
#include <errno.h>
#include <sys/mman.h>

#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

Lock g_large_lock;

namespace {

constexpr unsigned kCacheSlots = 32;
struct CacheEntry {
  SegmentHeader* seg;
  uint32_t since;  // now_ms() when it was freed (cache) or got its slack (g_slack)
  size_t bytes;    // g_slack: the slack counted in g_slack_bytes
};
CacheEntry g_cache[kCacheSlots];
unsigned g_cached = 0;
// Live blocks with slack, under g_large_lock like the cache, within the
// budget the cache counts against too, and only while a purger can unmap it. A block that does
// not fit here gets its tail unmapped at once.
CacheEntry g_slack[kCacheSlots];
unsigned g_slacks = 0;
size_t g_slack_bytes = 0;
// The most bytes live in large objects since the purger last emptied the
// cache: the cache's budget (with EBB_LARGE_CACHE_MB as its floor).
std::atomic<uint64_t> g_live_peak{0};

void note_live(uint64_t live) {
  uint64_t peak = g_live_peak.load(std::memory_order_relaxed);
  while (live > peak && !g_live_peak.compare_exchange_weak(peak, live, std::memory_order_relaxed)) {
  }
}

// Bytes the cache and the slack may hold together; 0 (EBB_LARGE_CACHE_MB=0):
// no cache and no slack at all.
uint64_t budget() {
  const uint64_t floor = uint64_t{g_options.large_cache_mb} << 20;
  // Without a purger nothing would reset the peak or unmap the cache:
  // the floor only, as a fixed cache.
  if (floor == 0 || !purger_available()) return floor;
  // Each block maps up to two pages more than its object: header, rounding.
  const uint64_t peak = g_live_peak.load(std::memory_order_relaxed) + uint64_t{2} * kCacheSlots * kPageSize;
  return peak > floor ? peak : floor;
}

size_t round_page(size_t n) { return (n + kPageSize - 1) & ~(kPageSize - 1); }

// The part of a live block's mapping that the object uses: header page(s)
// and the request, in whole pages. The rest of map_size is slack.
size_t used_size(const SegmentHeader* h) { return round_page(h->offset + h->request); }

// Unmaps block h's mapping from `keep` bytes on. map_size is stored
// atomically: free() of another block reads it without the lock
// (segment_of_large) while the purger trims slack.
void unmap_tail(SegmentHeader* h, size_t keep) {
  if (h->map_size <= keep) return;
  os::unmap(reinterpret_cast<char*>(h) + keep, h->map_size - keep);
  g_counters.mapped.fetch_sub(h->map_size - keep, std::memory_order_relaxed);
  g_counters.unmapped_total.fetch_add(h->map_size - keep, std::memory_order_relaxed);
  __atomic_store_n(&h->map_size, keep, __ATOMIC_RELAXED);
}

// Slack table operations; the caller holds g_large_lock. h's offset and
// request must be those of its current object: the purger keeps that much.
void slack_drop(unsigned i) {
  g_slack_bytes -= g_slack[i].bytes;
  g_slack[i] = g_slack[--g_slacks];
}

// Enters (or counts again) h's slack; false if it does not fit, and then h
// is not in the table.
bool slack_add(SegmentHeader* h) {
  const size_t bytes = h->map_size - used_size(h);
  const uint64_t limit = budget();
  auto since = static_cast<uint32_t>(os::now_ms());
  for (unsigned i = 0; i < g_slacks; i++) {
    if (g_slack[i].seg == h) {  // already waiting: keeps its time
      since = g_slack[i].since;
      slack_drop(i);
      break;
    }
  }
  const uint64_t held = g_slack_bytes + g_counters.large_cached.load(std::memory_order_relaxed);
  if (g_slacks == kCacheSlots || held + bytes > limit || !purger_available()) return false;
  g_slack[g_slacks++] = {h, since, bytes};
  g_slack_bytes += bytes;
  return true;
}

void slack_remove(SegmentHeader* h) {
  for (unsigned i = 0; i < g_slacks; i++) {
    if (g_slack[i].seg == h) {
      slack_drop(i);
      return;
    }
  }
}

// Registers or unregisters a large block under the chunk free() will mask to.
void register_block(SegmentHeader* h, bool on) {
  auto at = reinterpret_cast<uintptr_t>(h);
  if ((at & kSegmentMask) == 0)
    registry_set_large(at, on);
  else
    registry_set_shifted(at + h->offset, on);
}

void unmap_block(SegmentHeader* h) {
  size_t size = h->map_size;
  register_block(h, false);
  os::unmap(h, size);
  g_counters.mapped.fetch_sub(size, std::memory_order_relaxed);
  g_counters.unmapped_total.fetch_add(size, std::memory_order_relaxed);
}

// free() and realloc() read a block's state without the lock, to reject a
// pointer that is not live; the changes are made under g_large_lock.
LargeState state_of(const SegmentHeader* h) {
  return static_cast<LargeState>(__atomic_load_n(&h->large_state, __ATOMIC_RELAXED));
}
void set_state(SegmentHeader* h, LargeState state) { __atomic_store_n(&h->large_state, state, __ATOMIC_RELAXED); }

// Grows block h's mapping to `need` bytes without copying: in place if the
// address space after it is free, else its pages move (mremap, no copy) to a
// new segment-aligned address. Returns h's new header, or nullptr (h is
// unchanged). No other thread can reach h meanwhile: it is out of the cache,
// or kLargeMoving.
SegmentHeader* grow_mapping(SegmentHeader* h, size_t need) {
  const size_t old_size = h->map_size;
  void* r = mremap(h, old_size, need, 0);
  if (r == MAP_FAILED && (reinterpret_cast<uintptr_t>(h) & kSegmentMask) == 0) {
    void* dest = os::map_aligned(need, kSegmentSize);
    if (dest != nullptr) {
      registry_set_large(reinterpret_cast<uintptr_t>(dest), true);
      // The old address leaves the registry before mremap unmaps it: from
      // then on another thread may map a block there and register it.
      registry_set_large(reinterpret_cast<uintptr_t>(h), false);
      r = mremap(h, old_size, need, MREMAP_MAYMOVE | MREMAP_FIXED, dest);
      if (r == MAP_FAILED) {
        registry_set_large(reinterpret_cast<uintptr_t>(h), true);
        registry_set_large(reinterpret_cast<uintptr_t>(dest), false);
        os::unmap(dest, need);
      }
    }
  }
  if (r == MAP_FAILED) return nullptr;
  auto* nh = static_cast<SegmentHeader*>(r);
  nh->map_size = need;
  g_counters.mapped.fetch_add(need - old_size, std::memory_order_relaxed);
  return nh;
}

// A cached block for an object of `size` bytes at `offset`, `need` bytes in
// all: the best-fitting one of at least `need`, whole if the slack table
// takes its tail (then *slack is set), else trimmed to `need`; failing that,
// the biggest one, grown. *dirty: how many bytes from the block's start may
// hold old data (calloc zeroes those only: the rest is fresh from the
// kernel). The object's offset and size are set under the lock: the purger
// may trim the slack at once.
SegmentHeader* cache_take(size_t need, size_t offset, size_t size, bool* slack, size_t* dirty) {
  SegmentHeader* h;
  {
    LockGuard guard(g_large_lock);
    int best = -1, biggest = -1;
    for (unsigned i = 0; i < g_cached; i++) {
      const size_t bytes = g_cache[i].seg->map_size;
      if (bytes >= need && (best < 0 || bytes < g_cache[best].seg->map_size)) best = static_cast<int>(i);
      if (biggest < 0 || bytes > g_cache[biggest].seg->map_size) biggest = static_cast<int>(i);
    }
    const int pick = best >= 0 ? best : biggest;
    if (pick < 0) return nullptr;
    h = g_cache[pick].seg;
    g_cache[pick] = g_cache[--g_cached];
    g_counters.large_cached.fetch_sub(h->map_size, std::memory_order_relaxed);
    *dirty = h->map_size;
    if (best >= 0) {
      h->offset = offset;
      h->request = size;
      set_state(h, kLargeLive);
      if (h->map_size >= need + 16 * kPageSize && slack_add(h))
        *slack = true;
      else
        unmap_tail(h, need);
      return h;
    }
    set_state(h, kLargeMoving);
  }
  SegmentHeader* grown = grow_mapping(h, need);  // outside the lock: it may move pages for a while
  if (grown == nullptr) {
    unmap_block(h);
    *dirty = 0;  // a fresh mapping follows: nothing of it to zero
    return nullptr;
  }
  grown->offset = offset;
  grown->request = size;
  set_state(grown, kLargeLive);
  return grown;
}

// Block h (object p) was freed: takes it out of the slack table and puts it
// in the cache if `cacheable` and there is room (returns true), whole.
// Otherwise the caller unmaps it.
bool retire(SegmentHeader* h, const void* p, bool cacheable) {
  LockGuard guard(g_large_lock);
  // Two threads freeing p at once both passed check_large_pointer(); only
  // the first gets here while p is live, or both would cache or unmap it.
  if (EBB_UNLIKELY(state_of(h) != kLargeLive)) os::fatal_pointer("free", "double free", p);
  slack_remove(h);
  if (!cacheable || g_cached == kCacheSlots ||
      g_counters.large_cached.load(std::memory_order_relaxed) + g_slack_bytes + h->map_size > budget()) {
    set_state(h, kLargeGoing);
    return false;
  }
  set_state(h, kLargeCached);
  g_cache[g_cached++] = {h, static_cast<uint32_t>(os::now_ms()), 0};
  g_counters.large_cached.fetch_add(h->map_size, std::memory_order_relaxed);
  return true;
}

}  // namespace

void* large_alloc(size_t size, size_t align, bool zero) {
  ensure_init();
  if (size > (PTRDIFF_MAX >> 1) || align > (PTRDIFF_MAX >> 2)) {
    errno = ENOMEM;
    return nullptr;
  }
  // The object sits `offset` into a segment-aligned mapping, after the header
  // page. From 4 MiB alignment on it starts a chunk itself, and the mapping
  // starts at its header, one page before ("shifted").
  const bool shifted = align >= kSegmentSize;
  const size_t offset = align > kPageSize && !shifted ? align : kPageSize;
  const size_t need = round_page(offset + size);
  bool slack = false;
  size_t dirty = 0;
  SegmentHeader* h = shifted ? nullptr : cache_take(need, offset, size, &slack, &dirty);
  if (h == nullptr) {
    void* mem;
    if (shifted) {
      auto* base = static_cast<char*>(os::map_aligned(align + need - kPageSize, align));
      mem = base == nullptr ? nullptr : base + align - kPageSize;
      if (base != nullptr) os::unmap(base, align - kPageSize);
    } else {
      mem = os::map_aligned(need, kSegmentSize);
    }
    if (mem == nullptr) {
      errno = ENOMEM;
      return nullptr;
    }
    h = static_cast<SegmentHeader*>(mem);
    h->magic = kSegmentMagic;
    h->kind = kLargeSegment;
    h->map_size = need;
    h->offset = offset;
    h->request = size;
    h->large_state = kLargeLive;  // before register_block publishes h
    g_counters.mapped.fetch_add(need, std::memory_order_relaxed);
    register_block(h, true);
  }
  note_live(g_counters.large_live.fetch_add(size, std::memory_order_relaxed) + size);
  g_counters.large_objects.fetch_add(1, std::memory_order_relaxed);
  void* p = reinterpret_cast<char*>(h) + offset;
  if (zero && dirty > offset) memset(p, 0, dirty - offset < size ? dirty - offset : size);
  if (slack) purge_notify();  // the purger will unmap the slack unless realloc uses it
  return p;
}

static void check_large_pointer(SegmentHeader* h, const void* p, const char* what) {
  if (EBB_UNLIKELY(p != reinterpret_cast<char*>(h) + h->offset)) os::fatal_pointer(what, "invalid pointer", p);
  if (EBB_UNLIKELY(state_of(h) != kLargeLive)) os::fatal_pointer(what, "double free", p);
}

void large_free(SegmentHeader* h, void* p) {
  check_large_pointer(h, p, "free");
  g_counters.large_live.fetch_sub(h->request, std::memory_order_relaxed);
  g_counters.large_objects.fetch_sub(1, std::memory_order_relaxed);
  const bool shifted = (reinterpret_cast<uintptr_t>(h) & kSegmentMask) != 0;  // not reusable as-is
  if (retire(h, p, !shifted)) {
    purge_notify();
    return;
  }
  unmap_block(h);
}

size_t large_usable(SegmentHeader* h, const void* p) {
  if (p != reinterpret_cast<char*>(h) + h->offset || state_of(h) != kLargeLive) return 0;
  return used_size(h) - h->offset;  // not the slack (see the top of this file)
}

void* large_realloc(SegmentHeader* h, void* p, size_t size) {
  check_large_pointer(h, p, "realloc");
  if (size > (PTRDIFF_MAX >> 1)) {
    errno = ENOMEM;
    return nullptr;
  }
  const size_t need = round_page(h->offset + size);
  bool in_place, notify = false;
  {
    // Under the lock: the purger may be unmapping this block's slack.
    LockGuard guard(g_large_lock);
    // Checked again under the lock, as in retire(): a free() of p in another
    // thread may have passed check_large_pointer() at the same time.
    if (EBB_UNLIKELY(state_of(h) != kLargeLive)) os::fatal_pointer("realloc", "double free", p);
    in_place = need <= h->map_size;
    if (in_place) {
      // Grow into the slack, or shrink and leave slack behind: it waits for
      // the purger when it is worth a syscall and the table has room.
      note_live(g_counters.large_live.fetch_add(size - h->request, std::memory_order_relaxed) + size - h->request);
      h->request = size;
      if (h->map_size - need >= 16 * kPageSize) {
        notify = slack_add(h);
        if (!notify) unmap_tail(h, need);
      } else {
        slack_remove(h);  // a tail this small stays with the block, as always
      }
    } else {
      slack_remove(h);  // it outgrows its mapping: no slack left
      // While the mapping grows or moves, a free() or realloc() of p in
      // another thread fails its check instead of unmapping it under us.
      set_state(h, kLargeMoving);
    }
  }
  if (in_place) {
    if (notify) purge_notify();
    return p;
  }
  SegmentHeader* nh = grow_mapping(h, need);
  if (nh == nullptr) {
    // No room to grow or move the mapping: copy.
    set_state(h, kLargeLive);
    void* q = large_alloc(size, kMinAlign, false);
    if (q == nullptr) return nullptr;
    memcpy(q, p, used_size(h) - h->offset);  // all the old block's usable bytes
    large_free(h, p);
    return q;
  }
  set_state(nh, kLargeLive);
  note_live(g_counters.large_live.fetch_add(size - nh->request, std::memory_order_relaxed) + size - nh->request);
  nh->request = size;
  return reinterpret_cast<char*>(nh) + nh->offset;
}

size_t large_release(uint64_t now, bool force, bool* pending) {
  size_t bytes = 0;
  LockGuard guard(g_large_lock);
  for (unsigned i = 0; i < g_slacks;) {
    SegmentHeader* h = g_slack[i].seg;
    if (force || os::elapsed_ms(now, g_slack[i].since) >= g_options.purge_delay_ms) {
      const size_t keep = used_size(h);
      if (h->map_size > keep) bytes += h->map_size - keep;
      unmap_tail(h, keep);
      slack_drop(i);
    } else {
      *pending = true;
      i++;
    }
  }
  for (unsigned i = 0; i < g_cached;) {
    SegmentHeader* h = g_cache[i].seg;
    if (force || os::elapsed_ms(now, g_cache[i].since) >= g_options.purge_delay_ms) {
      g_counters.large_cached.fetch_sub(h->map_size, std::memory_order_relaxed);
      bytes += h->map_size;
      unmap_block(h);
      g_cache[i] = g_cache[--g_cached];
    } else {
      *pending = true;
      i++;
    }
  }
  // Emptied: the budget follows what is live from now on.
  if (g_cached == 0)
    g_live_peak.store(g_counters.large_live.load(std::memory_order_relaxed), std::memory_order_relaxed);
  return bytes;
}

}  // namespace ebb
