// Threads and fork: cross-thread frees, thread churn, fork while other
// threads allocate, and copy-on-write sharing after fork.
#include <gtest/gtest.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "ebb.h"
#include "rss.h"

namespace {

constexpr size_t MiB = 1 << 20;

struct Queue {
  std::mutex m;
  std::condition_variable cv;
  std::deque<std::pair<unsigned char*, size_t>> items;
  int producers_left = 0;
};

TEST(Threads, ProducerConsumerCrossThreadFrees) {
  Queue q;
  const int producers = 3, consumers = 2, per_producer = 100000;
  q.producers_left = producers;
  std::atomic<long> freed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < producers; t++)
    threads.emplace_back([&, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      for (int i = 0; i < per_producer; i++) {
        size_t size = 1 + rng() % (i % 100 == 0 ? 200000 : 600);
        auto* p = static_cast<unsigned char*>(malloc(size));
        memset(p, static_cast<int>(size & 0xff), size);
        std::lock_guard<std::mutex> lock(q.m);
        q.items.emplace_back(p, size);
        q.cv.notify_one();
      }
      std::lock_guard<std::mutex> lock(q.m);
      q.producers_left--;
      q.cv.notify_all();
    });
  std::atomic<bool> corrupt{false};
  for (int t = 0; t < consumers; t++)
    threads.emplace_back([&] {
      for (;;) {
        std::unique_lock<std::mutex> lock(q.m);
        q.cv.wait(lock, [&] { return !q.items.empty() || q.producers_left == 0; });
        if (q.items.empty()) return;
        auto [p, size] = q.items.front();
        q.items.pop_front();
        lock.unlock();
        if (p[0] != static_cast<unsigned char>(size & 0xff) || p[size - 1] != p[0]) corrupt = true;
        free(p);
        freed++;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_FALSE(corrupt);
  EXPECT_EQ(freed, long{producers} * per_producer);
}

TEST(Threads, ManyThreadsStartAndExit) {
  std::vector<void*> handed_over(400);
  for (int round = 0; round < 20; round++) {
    std::vector<std::thread> threads;
    for (int t = 0; t < 20; t++)
      threads.emplace_back([&, round, t] {
        std::vector<void*> mine;
        for (int i = 0; i < 2000; i++) mine.push_back(malloc(16 + static_cast<size_t>(i % 300)));
        for (size_t i = 1; i < mine.size(); i++) free(mine[i]);
        handed_over[static_cast<size_t>(round) * 20 + static_cast<size_t>(t)] =
            mine[0];  // freed later by the main thread
      });
    for (auto& th : threads) th.join();
  }
  for (void* p : handed_over) free(p);
  ebb_stats_t s;
  ASSERT_EQ(ebb_stats(&s, sizeof s), 0);
  // Exited threads flushed their caches: what is still cached belongs to live threads.
  EXPECT_LT(s.thread_cached_bytes, 4 * MiB);
}

// Growing a large block may move it (mremap) while other threads map and
// register blocks: none may be lost from the registry on the way, or its
// free() would not find it and it would stay mapped and counted live.
TEST(Threads, LargeBlocksThatMoveOnReallocAreAllFreed) {
  ebb_trim();
  ebb_stats_t before;
  ASSERT_EQ(ebb_stats(&before, sizeof before), 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; t++)
    threads.emplace_back([t] {
      std::mt19937 rng(static_cast<unsigned>(t) + 1);
      // Many blocks, so that a block's neighbour is often mapped and growing
      // it must move it.
      std::vector<std::pair<unsigned char*, size_t>> blocks(200, {nullptr, 0});
      for (int i = 0; i < 20000; i++) {
        auto& [b, size] = blocks[rng() % blocks.size()];
        if (b != nullptr && rng() % 3 == 0) {
          free(b);
          b = nullptr;
          continue;
        }
        size = b != nullptr && rng() % 2 == 0 ? size * 3 : size_t{130} * 1024 + rng() % (size_t{300} * 1024);
        auto* q = static_cast<unsigned char*>(realloc(b, size));
        ASSERT_NE(q, nullptr);
        q[0] = q[size - 1] = static_cast<unsigned char>(i);
        b = q;
      }
      for (auto& [b, size] : blocks) free(b);
    });
  for (auto& th : threads) th.join();
  ebb_trim();
  ebb_stats_t after;
  ASSERT_EQ(ebb_stats(&after, sizeof after), 0);
  EXPECT_EQ(after.large_live_bytes, before.large_live_bytes);
  EXPECT_LE(after.mapped_bytes, before.mapped_bytes);
}

// glibc carves a thread's thread-local block out of its stack: libebb's
// must leave room in the smallest stacks (16 KiB, and Python's minimum 32).
TEST(Threads, ThreadsWithSmallStacksStartAndAllocate) {
  for (size_t stack : {size_t{16384}, size_t{32768}}) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    ASSERT_EQ(pthread_attr_setstacksize(&attr, stack), 0);
    pthread_t t;
    int rc = pthread_create(
        &t, &attr,
        [](void*) -> void* {
          void* p[200];
          for (void*& q : p) q = malloc(64);
          for (void* q : p) free(q);
          return nullptr;
        },
        nullptr);
    pthread_attr_destroy(&attr);
    ASSERT_EQ(rc, 0) << "stack " << stack << ": " << strerror(rc);
    pthread_join(t, nullptr);
  }
}

// The child allocates, frees and forks again; exit code 0 means all went well.
int child_work(int depth) {
  std::vector<char*> v;
  for (int i = 0; i < 20000; i++) {
    char* p = static_cast<char*>(malloc(static_cast<size_t>(8 + i % 1000)));
    if (p == nullptr) return 3;
    p[0] = static_cast<char>(i);
    v.push_back(p);
  }
  for (size_t i = 0; i < v.size(); i++)
    if (v[i][0] != static_cast<char>(i)) return 4;
  for (char* p : v) free(p);
  void* big = malloc(4 * MiB);
  free(big);
  if (depth > 0) {
    pid_t pid = fork();
    if (pid < 0) return 5;
    if (pid == 0) _exit(child_work(depth - 1));
    int status = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return 6;
  }
  return 0;
}

uint64_t thread_cached_bytes() {
  ebb_stats_t s;
  return ebb_stats(&s, sizeof s) == 0 ? s.thread_cached_bytes : 0;
}

// In a new thread (whose caches start cold): after a class has been used a
// few times, a freed object of up to 32 KiB stays in the thread's cache (one
// slot above 8 KiB), and a bigger one goes straight back to its bin.
void* cache_one_large_object(void*) {
  std::vector<std::pair<size_t, uint64_t>> held;  // size -> bytes cached by its first free
  for (size_t size : {size_t{20000}, size_t{32768}, size_t{40000}}) {
    for (int i = 0; i < 20; i++) free(malloc(size));  // warm: 8 trips to the bin give a class its cache
    void* a = malloc(size);
    void* b = malloc(size);
    const uint64_t before = thread_cached_bytes();
    free(a);
    const uint64_t one = thread_cached_bytes();
    free(b);  // the slot is taken: b goes to the bin
    const uint64_t two = thread_cached_bytes();
    held.emplace_back(size, one - before);
    EXPECT_EQ(two, one) << size;
  }
  EXPECT_EQ(held[0].second, 20480u);  // 20000 B are a 20 KiB object
  EXPECT_EQ(held[1].second, 32768u);
  EXPECT_EQ(held[2].second, 0u);
  return nullptr;
}

TEST(ThreadCache, ClassesUpTo32KiBKeepOneObject) {
  pthread_t t;
  ASSERT_EQ(pthread_create(&t, nullptr, cache_one_large_object, nullptr), 0);
  pthread_join(t, nullptr);
}

TEST(Fork, WhileOtherThreadsAllocate) {
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < 2; t++)
    workers.emplace_back([&] {
      std::vector<void*> v;
      unsigned i = 0;
      while (!stop) {
        v.push_back(malloc(16 + (i++ % 5000)));
        if (v.size() > 500) {
          for (void* p : v) free(p);
          v.clear();
          ebb_trim();  // hold bin and segment locks now and then
        }
      }
      for (void* p : v) free(p);
    });
  for (int i = 0; i < 30; i++) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) _exit(child_work(1));
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << "child killed by signal " << WTERMSIG(status);
    ASSERT_EQ(WEXITSTATUS(status), 0);
  }
  stop = true;
  for (auto& th : workers) th.join();
}

// A child forked from a thread other than main has that thread only; when it
// calls pthread_exit the process must end, as it does without libebb (the
// purger thread must not keep it alive). CPython's test_threading does this.
TEST(Fork, ChildOfANonMainThreadEndsWhenItsThreadExits) {
  pid_t pid = -1;
  std::thread forker([&] {
    pid = fork();
    if (pid == 0) {
      std::vector<void*> v;
      for (int i = 0; i < 50000; i++) v.push_back(malloc(64));
      for (void* p : v) free(p);  // starts the child's purger
      struct timespec ts = {0, 300L * 1000 * 1000};
      nanosleep(&ts, nullptr);
      pthread_exit(nullptr);
    }
  });
  forker.join();
  ASSERT_GT(pid, 0);
  int status = 0;
  pid_t got = 0;
  for (int i = 0; i < 200 && got == 0; i++) {  // up to 10 s
    got = waitpid(pid, &status, WNOHANG);
    if (got == 0) usleep(50 * 1000);
  }
  if (got == 0) kill(pid, SIGKILL);
  ASSERT_EQ(got, pid) << "the child did not end after its only thread exited";
  EXPECT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
}

// Private_Dirty of this process, in bytes, from smaps_rollup.
size_t private_dirty() {
  FILE* f = fopen("/proc/self/smaps_rollup", "r");
  if (f == nullptr) return 0;
  char line[256];
  size_t kb = 0;
  while (fgets(line, sizeof line, f))
    if (strncmp(line, "Private_Dirty:", 14) == 0) kb = strtoull(line + 14, nullptr, 10);
  fclose(f);
  return kb * 1024;
}

TEST(Fork, ChildKeepsCopyOnWriteSharingWhileItWorksAndPurges) {
  // 64 MiB of live small objects, plus a heap with holes for the child's purger.
  std::vector<void*> live, holes;
  for (size_t i = 0; i < 64 * MiB / 128; i++) live.push_back(malloc(128));
  for (void* p : live) memset(p, 1, 128);
  for (size_t i = 0; i < 8 * MiB / 256; i++) holes.push_back(malloc(256));
  for (void* p : holes) memset(p, 2, 256);
  for (size_t i = 0; i < holes.size(); i++)
    if (i % 16 != 0) free(holes[i]);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    size_t before = private_dirty();
    ebb_stats_t s0, s1;
    ebb_stats(&s0, sizeof s0);
    int code = child_work(0);  // allocates and frees: restarts the purger
    struct timespec ts = {1, 0};
    nanosleep(&ts, nullptr);  // let it purge what the parent left dirty
    ebb_stats(&s1, sizeof s1);
    size_t result[3] = {private_dirty() - before, s1.purged_total - s0.purged_total, static_cast<size_t>(code)};
    if (write(fds[1], result, sizeof result) != sizeof result) _exit(9);
    _exit(0);
  }
  close(fds[1]);
  size_t result[3] = {0, 0, 99};
  ASSERT_EQ(read(fds[0], result, sizeof result), static_cast<ssize_t>(sizeof result));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  EXPECT_EQ(result[2], 0u);
  // The child wrote far less than the 64 MiB it shares with the parent.
  EXPECT_LT(result[0], 12 * MiB) << "child dirtied " << result[0] / MiB << " MiB";
  EXPECT_GT(result[1], 0u) << "the child's purger did not run";
  for (void* p : live) free(p);
  for (size_t i = 0; i < holes.size(); i += 16) free(holes[i]);
}

}  // namespace
