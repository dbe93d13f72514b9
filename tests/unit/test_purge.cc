// Giving memory back: ebb_trim, partly used spans, the idle purger, stats.
#include <gtest/gtest.h>
#include <malloc.h>
#include <string.h>
#include <time.h>

#include <atomic>
#include <thread>
#include <vector>

#include "delays.h"
#include "ebb.h"
#include "heap.h"
#include "os.h"
#include "rss.h"

namespace {

constexpr size_t MiB = 1 << 20;

void sleep_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
  nanosleep(&ts, nullptr);
}

// Allocates `total` bytes in objects of `size`, touching each.
std::vector<void*> fill(size_t total, size_t size) {
  std::vector<void*> v;
  v.reserve(total / size);
  for (size_t i = 0; i < total / size; i++) {
    void* p = malloc(size);
    memset(p, static_cast<int>(i), size);
    v.push_back(p);
  }
  return v;
}

TEST(Purge, TrimGivesFreedSmallObjectsBack) {
  // Long delays keep the purger out of the way (it would give back the spans
  // that went cold while they were filled), so that what ebb_trim() reports
  // is all of it.
  Delays long_delays(60000);
  auto v = fill(64 * MiB, 256);
  size_t full = rss_bytes();
  for (void* p : v) free(p);
  size_t released = ebb_trim();
  size_t after = rss_bytes();
  EXPECT_GE(released, 56 * MiB);
  EXPECT_LE(after + 56 * MiB, full) << "rss " << full / MiB << " MiB -> " << after / MiB << " MiB";
}

// One word of a segment's purged-page bits holds the pages of four slices,
// which may be spans of different classes, each updated under its own bin's
// lock: two threads updating their own spans' bits at once must not undo
// each other's (a live page left marked purged would be given back).
TEST(Purge, SpansSharingAPurgedWordKeepTheirBits) {
  std::vector<ebb::Span*> spans;
  ebb::Span* pair[2] = {nullptr, nullptr};
  auto word = [](const ebb::Span* s) {
    return std::make_pair(ebb::segment_of_span(s), s->slice * ebb::kPagesPerSlice / 64);
  };
  // Spans come from the oldest segments' free slices first: on a heap with
  // one free slice in each group of four, it takes a few dozen to reach a
  // fresh segment, where consecutive slices share a word.
  for (int i = 0; i < 4096 && pair[1] == nullptr; i++) {
    ebb::Span* s = ebb::segment_alloc_span(1);
    ASSERT_NE(s, nullptr);
    for (ebb::Span* t : spans)
      if (pair[1] == nullptr && word(t) == word(s)) {
        pair[0] = t;
        pair[1] = s;
      }
    spans.push_back(s);
  }
  ASSERT_NE(pair[1], nullptr) << "no two new spans share a word of purged bits";
  std::atomic<int> lost{0};
  auto flip = [&lost](ebb::Span* s) {
    for (int i = 0; i < 2000000; i++) {
      const size_t page = static_cast<size_t>(i) % ebb::kPagesPerSlice;
      ebb::span_set_purged(s, page);
      if (!ebb::span_page_purged(s, page)) lost++;
      ebb::span_clear_purged(s, page);
      if (ebb::span_page_purged(s, page)) lost++;
    }
  };
  std::thread a(flip, pair[0]);
  std::thread b(flip, pair[1]);
  a.join();
  b.join();
  EXPECT_EQ(lost.load(), 0);
  for (ebb::Span* s : spans) ebb::segment_free_span(s);
}

// Every slot of the class's spans is either out (live or thread-cached) or
// free (in the bitmap, parked on a purged page, or not carved yet): the
// counters that purging and parking move objects between add up.
void expect_counters_add_up(size_t size) {
  ebb_class_stats_t c;
  ASSERT_EQ(ebb_class_stats(ebb::size_to_class(size), &c, sizeof c), 0);
  EXPECT_EQ(c.objects_out + c.objects_free, c.spans * (c.span_bytes / c.object_size)) << size << " B";
}

// Index of the first survivor (object i of v for i % keep_every == 0, filled
// with i & 0xff) whose bytes changed; v.size() when every one is intact.
size_t first_damaged_survivor(const std::vector<char*>& v, size_t size, size_t keep_every) {
  for (size_t i = 0; i < v.size(); i += keep_every)
    for (size_t b = 0; b < size; b++)
      if (v[i][b] != static_cast<char>(i & 0xff)) return i;
  return v.size();
}

// Allocates `n` objects of `size` bytes, frees all but one in `keep_every`,
// trims, and checks that most of the memory went back, that the survivors
// are intact, and that allocating again (which refaults purged pages and
// hands out their parked slots) never gives out a survivor's memory.
// `released`: the share of the freed objects' bytes that must leave RSS.
void partly_used_spans(size_t size, size_t n, size_t keep_every, double released) {
  std::vector<char*> v(n);
  for (size_t i = 0; i < n; i++) {
    v[i] = static_cast<char*>(malloc(size));
    memset(v[i], static_cast<int>(i & 0xff), size);
  }
  size_t full = rss_bytes();
  for (size_t i = 0; i < n; i++)
    if (i % keep_every != 0) free(v[i]);
  ebb_trim();
  size_t after = rss_bytes();
  const size_t data = n * size;
  EXPECT_LE(after + static_cast<size_t>(static_cast<double>(data) * released), full)
      << size << " B: rss " << full / MiB << " MiB -> " << after / MiB << " MiB";
  std::vector<char*> again(n);
  for (size_t i = 0; i < n; i++) {
    again[i] = static_cast<char*>(malloc(size));
    memset(again[i], 0x5a, size);
  }
  ASSERT_EQ(first_damaged_survivor(v, size, keep_every), n) << size << " B";
  expect_counters_add_up(size);
  // Again on a heap where survivors sit between purged pages: free runs of
  // the new objects, purge, and check what stayed (a live object taken for
  // free would have its page purged, and read back as zeros).
  const size_t run = size_t{64} * 1024 / size;
  for (size_t i = 0; i < n; i++)
    if ((i / run) % 2 == 0) {
      free(again[i]);
      again[i] = nullptr;
    }
  ebb_trim();
  for (size_t i = 0; i < n; i++) {
    if (again[i] == nullptr) continue;
    for (size_t b = 0; b < size; b++) ASSERT_EQ(again[i][b], 0x5a) << size << " B, new object " << i;
  }
  ASSERT_EQ(first_damaged_survivor(v, size, keep_every), n) << size << " B";
  expect_counters_add_up(size);
  for (size_t i = 0; i < n; i += keep_every) free(v[i]);
  for (char* p : again) free(p);
  ebb_trim();
  expect_counters_add_up(size);
}

TEST(Purge, PartlyUsedSpansGiveBackTheirEmptyPages) {
  // 64-byte objects, 64 per page; keep one in 512, i.e. one page in eight.
  partly_used_spans(64, 400000, 512, 0.75);
  // Objects that straddle page boundaries: a purged page parks the free
  // slots on both of its edges.
  partly_used_spans(80, 300000, 400, 0.75);
  partly_used_spans(3008, 12000, 16, 0.6);
}

TEST(Purge, IdleProcessGivesMemoryBackWithoutAllocating) {
  auto v = fill(64 * MiB, 1000);
  auto big = fill(32 * MiB, 2 * MiB);
  size_t full = rss_bytes();
  for (void* p : v) free(p);
  for (void* p : big) free(p);
  // From here on the test allocates nothing: only the purger can lower RSS.
  size_t after = full;
  for (int i = 0; i < 100 && after + 88 * MiB > full; i++) {
    sleep_ms(50);
    after = rss_bytes();
  }
  EXPECT_LE(after + 88 * MiB, full) << "rss " << full / MiB << " MiB -> " << after / MiB << " MiB";
}

TEST(Stats, FollowLiveBytesAndPurging) {
  ebb_stats_t before, during, after;
  ASSERT_EQ(ebb_stats(&before, sizeof before), 0);
  EXPECT_EQ(before.version, EBB_STATS_VERSION);
  EXPECT_EQ(before.size, sizeof before);
  auto v = fill(16 * MiB, 512);
  void* large = malloc(8 * MiB);
  ASSERT_EQ(ebb_stats(&during, sizeof during), 0);
  EXPECT_GE(during.live_bytes, before.live_bytes + 24 * MiB - MiB);
  EXPECT_GE(during.allocs_total, before.allocs_total + v.size());
  EXPECT_GE(during.requested_total, before.requested_total + 24 * MiB);
  EXPECT_GE(during.large_live_bytes, 8 * MiB);
  EXPECT_GE(during.resident_bytes, 24 * MiB);
  EXPECT_GE(during.mapped_bytes, during.resident_bytes);
  for (void* p : v) free(p);
  free(large);
  ebb_trim();
  ASSERT_EQ(ebb_stats(&after, sizeof after), 0);
  EXPECT_LE(after.live_bytes + 16 * MiB, during.live_bytes);
  EXPECT_GE(after.purged_total, during.purged_total + 15 * MiB);
  EXPECT_GT(after.purge_calls, during.purge_calls);
  EXPECT_LE(after.resident_bytes + 16 * MiB, during.resident_bytes);
  EXPECT_EQ(ebb_stats(nullptr, sizeof after), -1);
}

TEST(Stats, PerClassFigures) {
  ASSERT_GT(ebb_class_count(), 32u);
  ebb_class_stats_t c;
  EXPECT_EQ(ebb_class_stats(0, &c, sizeof c), -1);
  EXPECT_EQ(ebb_class_stats(ebb_class_count() + 1, &c, sizeof c), -1);
  ASSERT_EQ(ebb_class_stats(4, &c, sizeof c), 0);  // 64-byte objects
  EXPECT_EQ(c.object_size, 64u);
  uint64_t out_before = c.objects_out;
  auto v = fill(MiB, 64);
  ASSERT_EQ(ebb_class_stats(4, &c, sizeof c), 0);
  EXPECT_GE(c.objects_out, out_before + v.size() - 200);  // minus what thread caches held
  EXPECT_GE(c.spans, 16u);
  for (void* p : v) free(p);
}

TEST(Stats, ShortBufferGetsAPrefix) {
  ebb_stats_t s;
  memset(&s, 0xee, sizeof s);
  ASSERT_EQ(ebb_stats(&s, 16), 0);
  EXPECT_EQ(s.size, 16u);
  EXPECT_EQ(s.live_bytes, 0xeeeeeeeeeeeeeeeeull);  // untouched past the prefix
}

}  // namespace

// A span with no live object left decays after the short delay; partly used
// spans (the working set) wait for the long one.
TEST(Purge, EmptySpansGoBackSoonerThanTheWorkingSet) {
  Delays delays(60000, 20);
  ebb_trim();

  // Partly used: keep one object in 8 (every span keeps 1/8 of its objects,
  // more than the sparse threshold of 1/16).
  auto part = fill(32 * MiB, 512);
  size_t full = rss_bytes();
  for (size_t i = 0; i < part.size(); i++)
    if (i % 8 != 0) free(part[i]);
  sleep_ms(500);
  size_t after_part = rss_bytes();
  EXPECT_GT(after_part + 8 * MiB, full) << "partly used spans purged before the long delay: " << full / MiB
                                        << " MiB -> " << after_part / MiB << " MiB";

  // Emptied (another size class, so the survivors above are not in its
  // spans): everything freed; the purger gives it back within a few short delays.
  auto all = fill(32 * MiB, 768);
  full = rss_bytes();
  for (void* p : all) free(p);
  size_t after_all = full;
  for (int i = 0; i < 40 && after_all + 24 * MiB > full; i++) {
    sleep_ms(25);
    after_all = rss_bytes();
  }
  EXPECT_LE(after_all + 24 * MiB, full) << "rss " << full / MiB << " MiB -> " << after_all / MiB << " MiB";

  // Sparse (a third class): one object in 64 survives a burst. Those spans
  // are (almost) empty and go back after the short delay too, but for the
  // pages that hold the survivors.
  auto sparse = fill(32 * MiB, 1024);
  full = rss_bytes();
  for (size_t i = 0; i < sparse.size(); i++)
    if (i % 64 != 0) free(sparse[i]);
  size_t after_sparse = full;
  for (int i = 0; i < 40 && after_sparse + 16 * MiB > full; i++) {
    sleep_ms(25);
    after_sparse = rss_bytes();
  }
  EXPECT_LE(after_sparse + 16 * MiB, full) << "rss " << full / MiB << " MiB -> " << after_sparse / MiB << " MiB";
  for (size_t i = 0; i < sparse.size(); i += 64) free(sparse[i]);

  for (size_t i = 0; i < part.size(); i += 8) free(part[i]);
  ebb_trim();
}

TEST(Purge, OnlyABigBurstGetsTheShortDelay) {
  // The bins are asked at a time `now` one short delay ahead, when the
  // bursts below have waited it and are not cold yet (that takes two); long
  // delays keep the purger from acting on them meanwhile.
  Delays delays(60000, 5000);
  ebb_trim();
  auto working_set = fill(64 * MiB, 256);  // stays live
  auto small = fill(8 * MiB, 2048);        // an eighth of it
  for (void* p : small) free(p);
  EXPECT_FALSE(ebb::bins_big_burst(ebb::os::now_ms() + 5000)) << "8 MiB free against 64 MiB live";
  auto big = fill(32 * MiB, 3072);  // with the small one, more than a quarter
  for (void* p : big) free(p);
  EXPECT_TRUE(ebb::bins_big_burst(ebb::os::now_ms() + 5000)) << "40 MiB free against 64 MiB live";
  for (void* p : working_set) free(p);
  ebb_trim();
}
