// The purger: a background thread that gives idle free pages back to the OS,
// so a worker that freed its peak and went to sleep does not keep it.
//
// It sleeps on a futex while nothing is dirty: an idle process with nothing
// to purge costs no wake-ups. A free that makes a span dirty arms it; it then
// waits half a purge delay at a time until every dirty span has been idle for
// the full delay, purges it, and goes back to sleep. With telemetry on
// (telemetry.cc) it sleeps on the telemetry page instead, so that a command
// from ebb wakes it, and publishes the heap statistics once a second.
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "heap.h"
#include "os.h"

namespace ebb {

extern bool g_constructed;

namespace {

std::atomic<int> g_wake{0};          // futex word: bumped to wake the purger (telemetry off)
std::atomic<bool> g_pending{false};  // something may be waiting for its delay
std::atomic<bool> g_empty{false};    // ... and a sparse span may go after the short delay
std::atomic<bool> g_cold{false};     // a cold span emptied: look every kColdTickMs while they come
std::atomic<bool> g_warm{false};     // the busy window kept spans past their delay (purge_all)
// How often the purger looks while cold spans empty (a `del` of old data in
// progress): their pages go at once, and the passes follow the `del`.
constexpr uint32_t kColdTickMs = 2;
constexpr uint32_t kProfileTickMs = 250;  // the profiler writes the memory statistics 4 times a second
// 0 not started, 1 starting, 2 running, 3 failed or disabled.
std::atomic<int> g_state{0};
std::atomic<long> g_threads{0};  // see threads_started()
__thread bool t_is_purger = false;

// Wakes the purger wherever it sleeps.
void wake_purger();

// Sleeps on a futex word shared with other processes (the telemetry page);
// ms == 0: no time limit.
void wait_shared(std::atomic<uint32_t>* word, uint32_t seen, uint32_t ms) {
  struct timespec ts = {static_cast<time_t>(ms / 1000), static_cast<long>(ms % 1000) * 1000000L};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, seen, ms != 0 ? &ts : nullptr, nullptr, 0);
}

void wake_shared(std::atomic<uint32_t>* word) {
  word->fetch_add(1, std::memory_order_release);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

void* purger_main(void*) {
  t_is_purger = true;
  for (;;) {
    if (g_threads.load(std::memory_order_acquire) <= 0) {
      // Every program thread is gone: leave, so that the process can end as it
      // would without libebb. A later batch of frees (from a thread libebb did
      // not count) starts a new purger.
      g_state.store(0, std::memory_order_release);
      return nullptr;
    }
    const bool pending = g_pending.load(std::memory_order_acquire);
    // Look again after half the delay that applies to what waits.
    const uint32_t delay =
        g_empty.load(std::memory_order_acquire) ? g_options.empty_delay_ms : g_options.purge_delay_ms;
    uint32_t tick = g_cold.load(std::memory_order_acquire) ? kColdTickMs : delay / 2 < 5 ? 5 : delay / 2;
    const uint32_t window_step = g_options.busy_window_ms / 8 < 5 ? 5 : g_options.busy_window_ms / 8;
    if (g_warm.load(std::memory_order_acquire) && tick > window_step) tick = window_step;
    if (std::atomic<uint32_t>* word = telemetry_wake_word()) {
      uint32_t seen = word->load(std::memory_order_acquire);
      telemetry_serve();  // a command may have come before we looked
      uint32_t ms = telemetry_wait_ms(pending, tick);
      if (g_profile_on && (ms == 0 || ms > kProfileTickMs)) ms = kProfileTickMs;  // its statistics, 4 times a second
      wait_shared(word, seen, ms);
      telemetry_serve();
    } else {
      int seen = g_wake.load(std::memory_order_acquire);
      if (!pending) {
        g_cold.store(false, std::memory_order_relaxed);  // nothing to follow: the next cold span wakes us
        if (!g_profile_on) {
          Lock::wait(&g_wake, seen, nullptr);
          continue;
        }
        struct timespec quarter = {0, long{kProfileTickMs} * 1000000L};  // the profiler's statistics
        Lock::wait(&g_wake, seen, &quarter);
        profile_tick();
        continue;
      }
      // Let a burst of frees settle before looking. Only a span emptied
      // while we wait for the long delay cuts this short (purge_notify).
      struct timespec ts = {static_cast<time_t>(tick / 1000), static_cast<long>(tick % 1000) * 1000000L};
      Lock::wait(&g_wake, seen, &ts);
    }
    if (g_pending.load(std::memory_order_acquire)) {
      g_pending.store(false, std::memory_order_release);
      g_empty.store(false, std::memory_order_release);
      g_cold.store(false, std::memory_order_release);
      g_warm.store(false, std::memory_order_release);
      bool more = false, more_empty = false, cold = false;
      // Above the soft limit set through the telemetry page: no delay.
      purge_all(telemetry_over_soft_limit(), &more, &more_empty, &cold);
      telemetry_count_pass();
      // Keep the short tick while cold spans keep coming: notifying each
      // would wake the purger once per span.
      if (cold) g_cold.store(true, std::memory_order_release);
      if (more_empty) g_empty.store(true, std::memory_order_release);
      if (more) g_pending.store(true, std::memory_order_release);
    }
    telemetry_publish(false);
    profile_tick();
  }
  return nullptr;
}

}  // namespace

void purger_start() {
  if (g_threads.load(std::memory_order_acquire) <= 0) return;  // no program thread left to serve
  int expected = 0;
  if (!g_state.compare_exchange_strong(expected, 1)) return;
  telemetry_open();
  if (!g_options.background) {
    g_state.store(3);
    return;
  }
  // Block every signal in the purger: they belong to the program's threads
  // (CPython, for one, expects them on the main thread).
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, size_t{64} * 1024);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_t tid;
  int rc = pthread_create(&tid, &attr, purger_main, nullptr);
  pthread_attr_destroy(&attr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  if (rc != 0) {
    g_state.store(3);
    return;
  }
  pthread_setname_np(tid, "ebb-purge");
  g_state.store(2);
}

namespace {

void wake_purger() {
  if (std::atomic<uint32_t>* word = telemetry_wake_word()) {
    wake_shared(word);
  } else {
    g_wake.fetch_add(1, std::memory_order_release);
    if (g_state.load(std::memory_order_relaxed) == 2) Lock::wake_one(&g_wake);
  }
}

}  // namespace

void threads_started() {
  if (!t_is_purger) g_threads.fetch_add(1, std::memory_order_relaxed);
}

void threads_exited() {
  if (!t_is_purger && g_threads.fetch_sub(1, std::memory_order_acq_rel) == 1) wake_purger();
}

void threads_after_fork_child(bool caller_has_cache) { g_threads.store(caller_has_cache ? 1 : 0); }

void purge_notify(bool emptied, bool cold) {
  // The purger may be sleeping out the long delay: the first emptied span
  // since its last pass wakes it so that it looks again after the short one.
  // The first cold one wakes it to look at once, and every kColdTickMs
  // after that until no cold span is left.
  bool wake = emptied && !g_empty.load(std::memory_order_relaxed) && !g_empty.exchange(true);
  if (cold && !g_cold.load(std::memory_order_relaxed) && !g_cold.exchange(true)) wake = true;
  if (!g_pending.load(std::memory_order_relaxed)) {
    g_pending.store(true, std::memory_order_release);
    wake = true;
  }
  if (wake) wake_purger();
  // Start lazily, once the library constructor has run (libc is fully up), and
  // only in programs that free something: short-lived tools never get a thread.
  if (EBB_UNLIKELY(g_state.load(std::memory_order_relaxed) == 0) && g_constructed) purger_start();
}

namespace {

// The busy window. A program that frees a big structure and builds the next
// one at once (a worker between two tasks, a loop rebuilding its data)
// would have the freed pages purged and then faulted back in: a quarter of
// the time of such a loop went there. So free spans stay resident, delay
// or not, up to as many bytes as the program allocated (refills, all size
// classes) in the last EBB_BUSY_WINDOW_MS: none once it has stopped
// allocating for that long, which keeps the idle floor within about a
// second. Purger-only state: samples of bins_taken() taken at its passes,
// at most one per eighth of the window.
constexpr unsigned kSamples = 9;
struct Sample {
  uint64_t ms, taken;
};
Sample g_samples[kSamples];
unsigned g_nsamples = 0;

uint64_t busy_window_bytes(uint64_t now) {
  const uint64_t window = g_options.busy_window_ms;
  if (window == 0) return 0;
  const uint64_t taken = bins_taken();
  if (g_nsamples == 0 || now - g_samples[g_nsamples - 1].ms >= window / (kSamples - 1)) {
    if (g_nsamples == kSamples) {
      for (unsigned i = 1; i < kSamples; i++) g_samples[i - 1] = g_samples[i];
      g_nsamples--;
    }
    g_samples[g_nsamples++] = {now, taken};
  }
  // Since the newest sample at least a window old; the oldest if none is.
  const Sample* base = &g_samples[0];
  for (unsigned i = 0; i < g_nsamples; i++)
    if (now - g_samples[i].ms >= window) base = &g_samples[i];
  return taken - base->taken;
}

}  // namespace

size_t purge_all(bool force, bool* pending, bool* empty_pending, bool* cold_purged) {
  uint64_t now = os::now_ms();
  bool ignored = false, ignored_cold = false;
  const uint64_t warm = force ? 0 : busy_window_bytes(now);
  bool kept = false;
  size_t bytes = bins_purge(now, force, warm, pending, empty_pending != nullptr ? empty_pending : &ignored,
                            cold_purged != nullptr ? cold_purged : &ignored_cold, &kept);
  // What the window keeps is looked at again as the window moves.
  if (kept) g_warm.store(true, std::memory_order_release);
  bytes += segments_release(now, force);
  bytes += large_release(now, force, pending);
  return bytes;
}

void purger_options_changed() { wake_purger(); }

bool purger_available() { return g_options.background && g_state.load(std::memory_order_relaxed) != 3; }

void purger_after_fork_child() {
  // The purger thread does not exist in the child. The next batch of frees
  // starts a new one, which first looks at what the parent left dirty.
  g_state.store(0, std::memory_order_relaxed);
  g_pending.store(true, std::memory_order_relaxed);
  g_empty.store(false, std::memory_order_relaxed);
  g_cold.store(false, std::memory_order_relaxed);
  g_warm.store(false, std::memory_order_relaxed);
  g_nsamples = 0;  // the parent's allocations are not the child's
  g_wake.store(0, std::memory_order_relaxed);
}

}  // namespace ebb
