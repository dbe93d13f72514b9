// fork(): every allocator lock is taken before the fork, so the child never
// inherits a lock held by a thread that does not exist there. The child then
// touches only lock words and a few globals, never the heap itself: pages
// inherited from the parent stay shared copy-on-write.
#include <pthread.h>

#include "heap.h"

namespace ebb {

namespace {

// Order: thread-cache registry, bins by class, segments, large blocks. Nothing
// takes these in another order.
void prepare() {
  g_tcache_lock.lock();
  for (unsigned cls = 1; cls <= kNumClasses; cls++) g_bins[cls].lock.lock();
  g_segment_lock.lock();
  g_large_lock.lock();
  profile_before_fork();  // never held while another is taken: last
}

void parent() {
  profile_after_fork_parent();
  g_large_lock.unlock();
  g_segment_lock.unlock();
  for (unsigned cls = kNumClasses; cls >= 1; cls--) g_bins[cls].lock.unlock();
  g_tcache_lock.unlock();
}

void child() {
  g_large_lock.reset_after_fork();
  g_segment_lock.reset_after_fork();
  for (unsigned cls = 1; cls <= kNumClasses; cls++) g_bins[cls].lock.reset_after_fork();
  // Other threads' caches are gone with their threads: drop them from the
  // registry (their few cached objects are lost to the child, by design).
  ThreadCache* self = &t_cache;
  g_tcaches = self->state == 1 ? self : nullptr;
  if (g_tcaches != nullptr) self->next = self->prev = nullptr;
  g_tcache_lock.reset_after_fork();
  threads_after_fork_child(self->state == 1);
  telemetry_after_fork_child();
  purger_after_fork_child();
  profile_after_fork_child();
}

}  // namespace

void fork_register() {
  static bool done = false;
  if (!done) done = pthread_atfork(prepare, parent, child) == 0;
}

}  // namespace ebb
