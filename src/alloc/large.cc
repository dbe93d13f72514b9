// Large objects (> 128 KiB): each gets its own mapping, aligned like a segment
// so free() finds its header by masking, with the object one page in.
// Freed blocks wait in a small cache (bounded in count and bytes) for the
// purge delay, so a program that allocates and frees big buffers in a loop
// does not pay mmap + page faults every time; then they are unmapped.
//
// A cached block is handed out whole, even when it is bigger than asked
// for: its pages are resident already, and a buffer that then grows by
// realloc (a list or a string being built, as CPython does each round of a
// loop) grows into them with no page faults and no syscall. Such a tail
// beyond the request is *slack*; so is what a shrinking realloc leaves. The
// purger unmaps slack once it has waited the purge delay, as it unmaps
// cached blocks. malloc_usable_size() never counts slack: the program must
// not write where the purger may unmap.
#include <errno.h>
#include <sys/mman.h>

#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

Lock g_large_lock;

namespace {

constexpr unsigned kCacheSlots = 8;
struct CacheEntry {
  SegmentHeader* seg;
  uint32_t since;  // now_ms() when it was freed (cache) or got its slack (g_slack)
  size_t bytes;    // g_slack: the slack counted in g_slack_bytes
};
CacheEntry g_cache[kCacheSlots];
unsigned g_cached = 0;
// Live blocks with slack, under g_large_lock like the cache, at most
// EBB_LARGE_CACHE_MB of it in all, and only while a purger can unmap it.
// A block that does not fit here gets its tail unmapped at once.
CacheEntry g_slack[kCacheSlots];
unsigned g_slacks = 0;
size_t g_slack_bytes = 0;

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
  const size_t limit = size_t{g_options.large_cache_mb} << 20;
  auto since = static_cast<uint32_t>(os::now_ms());
  for (unsigned i = 0; i < g_slacks; i++) {
    if (g_slack[i].seg == h) {  // already waiting: keeps its time
      since = g_slack[i].since;
      slack_drop(i);
      break;
    }
  }
  if (g_slacks == kCacheSlots || g_slack_bytes + bytes > limit || !purger_available()) return false;
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

// Best-fitting cached block of at least `need` bytes, for an object of
// `size` bytes at `offset`: whole if the slack table takes its tail (then
// *slack is set), else trimmed to `need`. The object's offset and size are
// set here, under the lock: the purger may trim the slack at once.
SegmentHeader* cache_take(size_t need, size_t offset, size_t size, bool* slack) {
  LockGuard guard(g_large_lock);
  int best = -1;
  for (unsigned i = 0; i < g_cached; i++)
    if (g_cache[i].seg->map_size >= need && (best < 0 || g_cache[i].seg->map_size < g_cache[best].seg->map_size))
      best = static_cast<int>(i);
  if (best < 0) return nullptr;
  SegmentHeader* h = g_cache[best].seg;
  g_cache[best] = g_cache[--g_cached];
  g_counters.large_cached.fetch_sub(h->map_size, std::memory_order_relaxed);
  h->offset = offset;
  h->request = size;
  set_state(h, kLargeLive);
  if (h->map_size >= need + 16 * kPageSize && slack_add(h))
    *slack = true;
  else
    unmap_tail(h, need);
  return h;
}

// Block h (object p) was freed: takes it out of the slack table and puts it
// in the cache if `cacheable` and there is room (returns true), whole.
// Otherwise the caller unmaps it.
bool retire(SegmentHeader* h, const void* p, bool cacheable) {
  const uint64_t limit = uint64_t{g_options.large_cache_mb} << 20;
  LockGuard guard(g_large_lock);
  // Two threads freeing p at once both passed check_large_pointer(); only
  // the first gets here while p is live, or both would cache or unmap it.
  if (EBB_UNLIKELY(state_of(h) != kLargeLive)) os::fatal_pointer("free", "double free", p);
  slack_remove(h);
  if (!cacheable || g_cached == kCacheSlots ||
      g_counters.large_cached.load(std::memory_order_relaxed) + h->map_size > limit) {
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
  SegmentHeader* h = shifted ? nullptr : cache_take(need, offset, size, &slack);
  const bool fresh = h == nullptr;
  if (fresh) {
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
  g_counters.large_live.fetch_add(size, std::memory_order_relaxed);
  void* p = reinterpret_cast<char*>(h) + offset;
  if (zero && !fresh) memset(p, 0, size);
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
      g_counters.large_live.fetch_add(size - h->request, std::memory_order_relaxed);
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
  // Grow: in place if the address space after us is free, else move the pages
  // (no copy) to a new segment-aligned address with mremap.
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
  if (r == MAP_FAILED) {
    // No room to grow or move the mapping: copy.
    set_state(h, kLargeLive);
    void* q = large_alloc(size, kMinAlign, false);
    if (q == nullptr) return nullptr;
    memcpy(q, p, used_size(h) - h->offset);  // all the old block's usable bytes
    large_free(h, p);
    return q;
  }
  auto* nh = static_cast<SegmentHeader*>(r);
  nh->map_size = need;
  set_state(nh, kLargeLive);
  g_counters.mapped.fetch_add(need - old_size, std::memory_order_relaxed);
  g_counters.large_live.fetch_add(size - nh->request, std::memory_order_relaxed);
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
  return bytes;
}

}  // namespace ebb
