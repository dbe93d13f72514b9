// Per-thread caches. malloc and free touch only the calling thread's cache;
// a free from another thread simply lands in the freeing thread's cache, so
// cross-thread frees need no lock until a batch is flushed to the bin.
#include <errno.h>
#include <pthread.h>

#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

__thread ThreadCache t_cache __attribute__((tls_model("initial-exec")));
Lock g_tcache_lock;
ThreadCache* g_tcaches = nullptr;

namespace {

constexpr uint16_t kColdCalls = 8;

pthread_key_t g_exit_key;
bool g_exit_key_ok = false;

// Takes tc out of the registry and adds its counts to the released ones,
// in one step for ebb_stats(), which reads both under the same lock.
void tcache_unregister(ThreadCache* tc) {
  LockGuard guard(g_tcache_lock);
  g_counters.released_allocs.fetch_add(tc->allocs, std::memory_order_relaxed);
  g_counters.released_bytes.fetch_add(tc->alloc_bytes, std::memory_order_relaxed);
  tc->allocs = tc->alloc_bytes = 0;
  if (tc->prev != nullptr)
    tc->prev->next = tc->next;
  else if (g_tcaches == tc)
    g_tcaches = tc->next;
  if (tc->next != nullptr) tc->next->prev = tc->prev;
  tc->next = tc->prev = nullptr;
}

constexpr size_t kStacksBytes = (kCacheSlots * kSlotSize + kPageSize - 1) & ~(kPageSize - 1);

// The stacks of a thread that has none (before its first allocation, after
// it exits, or if mapping them failed): every bin empty and full at once.
FreeObj* g_no_slots[1];

void no_cache(ThreadCache* tc) {
  for (CacheBin& cb : tc->bins) {  // one object at a time
    cb.top = g_no_slots;
    cb.low = cb.high = lo16(g_no_slots);
    cb.batch = cb.cold = 0;
  }
}

// Thread exit: hand every cached object back and serve later calls (from
// other destructors) straight from the bins.
void on_thread_exit(void* arg) {
  auto* tc = static_cast<ThreadCache*>(arg);
  tcache_flush_all(tc);
  // Out of the registry before the stacks change: ebb_stats() reads another
  // thread's `top` and `low` one after the other, and a new top with an old
  // low would count thousands of objects that are not there.
  tcache_unregister(tc);
  tc->state = 2;
  no_cache(tc);
  if (tc->slots != nullptr) os::unmap(tc->slots, kStacksBytes);
  tc->slots = nullptr;
  threads_exited();
}

void tcache_init(ThreadCache* tc) {
  ensure_init();
  tc->state = 1;  // first: what follows may allocate and must not recurse here
  // Pages of the stacks become resident only for the classes in use.
  tc->slots = static_cast<FreeObj**>(os::map_aligned(kStacksBytes, kPageSize));
  if (tc->slots == nullptr) {
    no_cache(tc);  // no memory for the stacks: this thread goes to the bins for every object
  } else {
    size_t at = 0;
    for (unsigned cls = 1; cls <= kNumClasses; cls++) {
      CacheBin& cb = tc->bins[cls];
      cb.top = &tc->slots[at];
      cb.low = cb.high = lo16(cb.top);
      at += cache_capacity(cls);
    }
  }
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    // A class gets its cache only once it is in use: its first kColdCalls
    // allocations and frees go straight to the bin (max 0). Most classes a
    // program touches are used a few times (a growing list passes through
    // dozens of classes once), and what sits in a cache stays resident and
    // is never purged: an idle CPython held ~300 KB in its cache that way.
    tc->bins[cls].batch = 0;
    tc->bins[cls].cold = tc->slots != nullptr ? kColdCalls : 0;
  }
  {
    LockGuard guard(g_tcache_lock);
    if (!g_exit_key_ok) g_exit_key_ok = pthread_key_create(&g_exit_key, on_thread_exit) == 0;
    tc->prev = nullptr;
    tc->next = g_tcaches;
    if (g_tcaches != nullptr) g_tcaches->prev = tc;
    g_tcaches = tc;
  }
  if (g_exit_key_ok) pthread_setspecific(g_exit_key, tc);
  threads_started();
}

// The cache a class gets once warm: tcache_bytes of objects, at most 128,
// one for classes up to 32 KiB (cache_objects); bigger classes are not
// cached: an idle thread's cache cannot be purged, and two 100 KiB buffers
// kept per class and thread would cost more resident memory than the lock
// they save is worth. The first refill takes one object and the batch
// doubles from there.
void warm_up(unsigned cls, CacheBin& cb) {
  const uint32_t n = cache_objects(class_size(cls), g_options.tcache_bytes);
  cb.set_max(n < cache_capacity(cls) ? n : cache_capacity(cls));  // the stack's size: never more
  cb.batch = static_cast<uint16_t>(cb.max() >= 2 ? 1 : 0);
}

// Counts a slow-path call of a class that has no cache yet.
EBB_INLINE void count_cold(ThreadCache* tc, unsigned cls, CacheBin& cb) {
  if (EBB_UNLIKELY(cb.cold != 0) && tc->state == 1 && --cb.cold == 0) warm_up(cls, cb);
}

// Flushes all but the `keep` most recently freed objects of a cache bin.
void flush_oldest(unsigned cls, CacheBin& cb, uint32_t keep) {
  const uint32_t count = cb.count();
  if (count <= keep) return;
  const uint32_t n = count - keep;
  FreeObj** base = cb.base();
  const Flushed f = bin_flush(cls, base, n);
  memmove(static_cast<void*>(base), base + n, keep * kSlotSize);
  cb.top = base + keep;
  purge_notify(f.emptied, f.cold);  // the stack is whole again (see Flushed)
}

}  // namespace

void* tcache_alloc_slow(unsigned cls) {
  if (cls == 0) cls = 1;  // malloc(0) (see alloc)
  ThreadCache* tc = &t_cache;
  if (tc->state == 0) tcache_init(tc);
  CacheBin& cb = tc->bins[cls];
  count_cold(tc, cls, cb);
  if (lo16(cb.top) == cb.low) {
    // A class used once should not cost a whole batch of touched memory: the
    // refill size starts at a few objects and doubles with use up to max/2.
    uint32_t want = cb.batch > 0 ? cb.batch : 1;
    const uint32_t max = cb.max();
    if (want < max / 2) cb.batch = static_cast<uint16_t>(want * 2 < max / 2 ? want * 2 : max / 2);
    if (max == 0) {  // no cache (cold class, exiting thread, EBB_TCACHE_BYTES=0): one object
      FreeObj* o = nullptr;
      if (bin_refill(cls, 1, &o) == 0) {
        errno = ENOMEM;
        return nullptr;
      }
      o->key = 0;
      return o;
    }
    uint32_t got = bin_refill(cls, want, cb.top);
    if (got == 0) {
      errno = ENOMEM;
      return nullptr;
    }
    cb.top += got;
  }
  FreeObj* o = *--cb.top;
  o->key = 0;
  return o;
}

void tcache_free_slow(unsigned cls, FreeObj* obj) {
  ThreadCache* tc = &t_cache;
  if (tc->state == 0) tcache_init(tc);
  CacheBin& cb = tc->bins[cls];
  count_cold(tc, cls, cb);
  if (lo16(cb.top) == cb.high) {
    // No room, and no point in flushing half: a one-slot class keeps the
    // object it holds; with no cache at all (cold class, exiting thread,
    // EBB_TCACHE_BYTES=0) this object goes straight to its bin.
    if (cb.max() <= 1) {
      const Flushed f = bin_flush(cls, &obj, 1);
      purge_notify(f.emptied, f.cold);
      return;
    }
    // Keep the most recently freed half: they are the ones still in the CPU cache.
    flush_oldest(cls, cb, cb.max() / 2);
  }
  *cb.top++ = obj;
}

void tcache_flush_all(ThreadCache* tc) {
  for (unsigned cls = 1; cls <= kNumClasses; cls++) flush_oldest(cls, tc->bins[cls], 0);
}

}  // namespace ebb
