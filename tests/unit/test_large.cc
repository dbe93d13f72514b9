// Large objects (> 128 KiB): the cache of freed blocks, and the slack of a
// cached block handed out whole, which realloc grows into and the purger
// unmaps after the purge delay.
#include <gtest/gtest.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "delays.h"
#include "ebb.h"
#include "heap.h"

namespace {

constexpr size_t KiB = 1024;
constexpr size_t MiB = 1024 * KiB;

void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
  nanosleep(&ts, nullptr);
}

uint64_t mapped_bytes() {
  ebb_stats_t s;
  if (ebb_stats(&s, sizeof s) != 0) return 0;
  return s.mapped_bytes;
}

void fill(void* p, size_t n, unsigned seed) {
  auto* b = static_cast<unsigned char*>(p);
  for (size_t i = 0; i < n; i++) b[i] = static_cast<unsigned char>((i * 7 + seed) & 0xff);
}

// Offset of the first byte of p[0..n) that fill(p, n, seed) did not write; n if none.
size_t first_wrong(const void* p, size_t n, unsigned seed) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < n; i++)
    if (b[i] != static_cast<unsigned char>((i * 7 + seed) & 0xff)) return i;
  return n;
}

TEST(Large, CachedBlockIsHandedOutWholeAndReallocGrowsIntoIt) {
  Delays long_delays(60000);  // the purger must not unmap the slack meanwhile
  ebb_trim();                 // empty the cache: the block below is the only one
  void* big = malloc(4 * MiB);
  ASSERT_NE(big, nullptr);
  memset(big, 1, 4 * MiB);
  free(big);
  void* p = malloc(256 * KiB);
  ASSERT_EQ(p, big) << "the cached block is reused";
  // The slack is not usable: the purger may unmap it.
  EXPECT_EQ(malloc_usable_size(p), 256 * KiB);
  fill(p, 256 * KiB, 3);
  const uint64_t mapped = mapped_bytes();
  void* q = realloc(p, 3 * MiB);
  ASSERT_EQ(q, p) << "grows in place, into the slack";
  EXPECT_EQ(mapped_bytes(), mapped) << "without mapping anything";
  EXPECT_EQ(first_wrong(q, 256 * KiB, 3), 256 * KiB);
  EXPECT_EQ(malloc_usable_size(q), 3 * MiB);
  memset(static_cast<char*>(q) + 256 * KiB, 2, 3 * MiB - 256 * KiB);
  free(q);
}

TEST(Large, PurgerUnmapsSlackAfterTheDelay) {
  void* p = nullptr;
  {
    Delays long_delays(60000);  // the cached block must still be there for malloc
    ebb_trim();
    void* big = malloc(8 * MiB);
    ASSERT_NE(big, nullptr);
    memset(big, 1, 8 * MiB);
    free(big);
    p = malloc(256 * KiB);
    ASSERT_EQ(p, big) << "the cached block is reused, with 7.75 MiB of slack";
  }
  Delays short_delays(20);
  fill(p, 256 * KiB, 5);
  // From here on nothing is allocated: only the purger can unmap the slack
  // (and the cache is empty, so nothing else of this size goes).
  uint64_t mapped = mapped_bytes();
  const uint64_t start = mapped;
  for (int i = 0; i < 200 && mapped + 7 * MiB > start; i++) {
    sleep_ms(10);
    mapped = mapped_bytes();
  }
  EXPECT_LE(mapped + 7 * MiB, start) << "mapped " << start / MiB << " MiB -> " << mapped / MiB << " MiB";
  EXPECT_EQ(first_wrong(p, 256 * KiB, 5), 256 * KiB);
  // With its slack gone, the block grows the usual way.
  void* q = realloc(p, 4 * MiB);
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(first_wrong(q, 256 * KiB, 5), 256 * KiB);
  memset(static_cast<char*>(q) + 256 * KiB, 2, 4 * MiB - 256 * KiB);
  free(q);
}

TEST(Large, ShrinkingLeavesSlackThatTrimGivesBack) {
  Delays long_delays(60000);
  ebb_trim();
  void* p = malloc(8 * MiB);
  fill(p, 8 * MiB, 9);
  ASSERT_EQ(realloc(p, 200 * KiB), p);
  EXPECT_EQ(malloc_usable_size(p), 200 * KiB);
  const uint64_t before = mapped_bytes();
  EXPECT_GE(ebb_trim(), 7 * MiB);
  EXPECT_LE(mapped_bytes() + 7 * MiB, before);
  EXPECT_EQ(first_wrong(p, 200 * KiB, 9), 200 * KiB);
  free(p);
}

TEST(Large, SlackIsUnmappedAtOnceWithoutAPurgerOrBeyondTheCacheBudget) {
  Delays long_delays(60000);
  ebb_trim();
  // Without a purger, nothing would unmap slack until malloc_trim().
  ebb::g_options.background = false;
  void* p = malloc(8 * MiB);
  fill(p, 8 * MiB, 13);
  uint64_t before = mapped_bytes();
  ASSERT_EQ(realloc(p, 200 * KiB), p);
  EXPECT_LE(mapped_bytes() + 7 * MiB, before) << "without a purger";
  ebb::g_options.background = true;
  EXPECT_EQ(first_wrong(p, 200 * KiB, 13), 200 * KiB);
  free(p);
  // EBB_LARGE_CACHE_MB=0: no cache, no slack.
  const uint32_t saved_cache = ebb::g_options.large_cache_mb;
  ebb::g_options.large_cache_mb = 0;
  p = malloc(8 * MiB);
  fill(p, 8 * MiB, 14);
  before = mapped_bytes();
  ASSERT_EQ(realloc(p, 200 * KiB), p);
  EXPECT_LE(mapped_bytes() + 7 * MiB, before) << "no slack with EBB_LARGE_CACHE_MB=0";
  EXPECT_EQ(first_wrong(p, 200 * KiB, 14), 200 * KiB);
  before = mapped_bytes();
  free(p);
  EXPECT_LT(mapped_bytes(), before) << "nor a cache";
  ebb::g_options.large_cache_mb = saved_cache;
}

// The cache holds as much as was live at the recent peak, not a fixed
// 32 MiB: twenty 6 MiB buffers freed at once are all kept, and reused.
TEST(Large, CacheIsSizedByTheRecentPeakOfLiveBlocks) {
  Delays long_delays(60000);
  ebb_trim();
  constexpr int kBlocks = 20;
  void* p[kBlocks];
  for (auto& b : p) {
    b = malloc(6 * MiB);
    ASSERT_NE(b, nullptr);
    memset(b, 1, 6 * MiB);
  }
  const uint64_t mapped = mapped_bytes();
  for (auto* b : p) free(b);
  EXPECT_EQ(mapped_bytes(), mapped) << "120 MiB kept, above the 32 MiB floor";
  for (auto& b : p) {
    b = malloc(6 * MiB);
    ASSERT_NE(b, nullptr);
  }
  EXPECT_EQ(mapped_bytes(), mapped) << "and all reused";
  for (auto* b : p) free(b);
  ebb_trim();
  EXPECT_LE(mapped_bytes() + 100 * MiB, mapped) << "trim empties the cache";
}

// No cached block is big enough: the biggest grows (mremap), so its resident
// pages are reused, and calloc still returns zeroes in the old part and the
// new.
TEST(Large, BiggestCachedBlockGrowsWhenNoneIsBigEnough) {
  Delays long_delays(60000);
  ebb_trim();
  void* a = malloc(4 * MiB);
  ASSERT_NE(a, nullptr);
  memset(a, 0xab, 4 * MiB);
  free(a);
  const uint64_t mapped = mapped_bytes();
  const uint64_t unmapped = ebb::g_counters.unmapped_total.load();
  auto* c = static_cast<unsigned char*>(calloc(1, 10 * MiB));
  ASSERT_NE(c, nullptr);
  EXPECT_LE(mapped_bytes(), mapped + 6 * MiB + 64 * KiB) << "the 4 MiB block grew by 6 MiB";
  EXPECT_EQ(ebb::g_counters.unmapped_total.load(), unmapped) << "grown, not unmapped and mapped anew";
  size_t nonzero = 0;
  for (size_t i = 0; i < 10 * MiB; i++) nonzero += c[i] != 0;
  EXPECT_EQ(nonzero, 0u);
  EXPECT_EQ(malloc_usable_size(c), 10 * MiB);
  fill(c, 10 * MiB, 9);
  EXPECT_EQ(first_wrong(c, 10 * MiB, 9), 10 * MiB);
  free(c);
}

TEST(Large, BlocksAlignedTo4MiBCanShrinkAndBeFreed) {
  // Blocks aligned to 4 MiB or more are never cached; one that shrank has
  // slack, and must leave the slack table when it is freed (the purger would
  // otherwise unmap part of a block that no longer exists).
  Delays long_delays(60000);
  void* p = aligned_alloc(4 * MiB, 8 * MiB);
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % (4 * MiB), 0u);
  fill(p, 8 * MiB, 11);
  ASSERT_EQ(realloc(p, 300 * KiB), p);
  EXPECT_EQ(first_wrong(p, 300 * KiB, 11), 300 * KiB);
  free(p);
  // Something else may now be mapped where the block was.
  void* q = malloc(6 * MiB);
  fill(q, 6 * MiB, 12);
  ebb_trim();
  EXPECT_EQ(first_wrong(q, 6 * MiB, 12), 6 * MiB);
  free(q);
}

// Threads that free big blocks and grow small ones by realloc, so that most
// growth goes into slack, while the purger (no delay) unmaps slack as fast
// as it can: whatever interleaving, a block's contents survive.
void* grow_while_purging(void* arg) {
  auto seed = static_cast<unsigned>(reinterpret_cast<uintptr_t>(arg));
  size_t bad = 0;
  for (int round = 0; round < 60; round++) {
    size_t big_size = (1 + (round + seed) % 6) * MiB;
    void* big = malloc(big_size);
    memset(big, 1, big_size);
    free(big);
    size_t size = 160 * KiB;
    auto* p = static_cast<char*>(malloc(size));
    fill(p, size, seed + round);
    while (size < 3 * MiB) {
      size_t next = size + size / 4;
      p = static_cast<char*>(realloc(p, next));
      if (p == nullptr) return reinterpret_cast<void*>(uintptr_t{1} << 40);
      if (first_wrong(p, size, seed + round) != size) bad++;
      fill(p, next, seed + round);
      size = next;
    }
    free(p);
  }
  return reinterpret_cast<void*>(bad);
}

TEST(Large, ReallocGrowsSafelyWhileThePurgerUnmapsSlack) {
  Delays no_delay(0);
  constexpr int kThreads = 4;
  pthread_t t[kThreads];
  for (int i = 0; i < kThreads; i++)
    ASSERT_EQ(pthread_create(&t[i], nullptr, grow_while_purging, reinterpret_cast<void*>(uintptr_t(i * 13))), 0);
  for (int i = 0; i < kThreads; i++) {
    void* bad = nullptr;
    pthread_join(t[i], &bad);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(bad), 0u) << "thread " << i;
  }
}

}  // namespace
