// A futex lock: one atomic int, no allocation, usable before libc is ready.
// Uncontended lock/unlock are one atomic instruction each; waiters sleep in
// the kernel instead of spinning (two cores are easy to oversubscribe).
#pragma once

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>

#include "config.h"

namespace ebb {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Lock {
 public:
  void lock() {
    int expected = 0;
    if (EBB_LIKELY(state_.compare_exchange_strong(expected, 1, std::memory_order_acquire))) return;
    lock_slow();
  }
  void unlock() {
    if (EBB_UNLIKELY(state_.exchange(0, std::memory_order_release) == 2)) wake_one(&state_);
  }
  // After fork() only the forking thread exists: whoever held the lock is gone.
  void reset_after_fork() { state_.store(0, std::memory_order_relaxed); }

  static void wait(std::atomic<int>* word, int value, const struct timespec* timeout) {
    syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAIT_PRIVATE, value, timeout, nullptr, 0);
  }
  static void wake_one(std::atomic<int>* word) {
    syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  }

 private:
  void lock_slow() {
    // 0 free, 1 locked, 2 locked with waiters.
    for (int spin = 0; spin < 64; spin++) {
      int expected = 0;
      if (state_.load(std::memory_order_relaxed) == 0 &&
          state_.compare_exchange_weak(expected, 1, std::memory_order_acquire))
        return;
      cpu_relax();
    }
    while (state_.exchange(2, std::memory_order_acquire) != 0) wait(&state_, 2, nullptr);
  }

  std::atomic<int> state_{0};
};

class LockGuard {
 public:
  explicit LockGuard(Lock& l) : l_(l) { l_.lock(); }
  ~LockGuard() { l_.unlock(); }
  LockGuard(const LockGuard&) = delete;
  LockGuard& operator=(const LockGuard&) = delete;

 private:
  Lock& l_;
};

}  // namespace ebb
