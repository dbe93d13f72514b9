// A randomized model test: long random sequences of malloc, calloc, realloc,
// memalign and free, each block filled with a pattern and checked against a
// model of what it should hold. Reproduce a failure with EBB_TEST_SEED=<seed>.
#include <gtest/gtest.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <random>
#include <vector>

#include "ebb.h"

namespace {

struct Block {
  unsigned char* p;
  size_t size;
  size_t align;
  unsigned char fill;
};

size_t random_size(std::mt19937_64& rng) {
  switch (rng() % 10) {
    case 0:
      return rng() % 16;  // tiny, 0 included
    case 1:
    case 2:
    case 3:
      return rng() % 512;  // the Python range
    case 4:
    case 5:
      return rng() % 8192;
    case 6:
      return rng() % 140000;  // up to just above the small limit
    case 7:
      return 131072 + rng() % 8;  // the small/large boundary
    case 8:
      return rng() % 2048;
    default:
      return rng() % (3 << 20) * (rng() % 8 == 0);  // large now and then
  }
}

void check(const Block& b, uint64_t seed, size_t step) {
  ASSERT_EQ(reinterpret_cast<uintptr_t>(b.p) % b.align, 0u) << "seed " << seed << " step " << step;
  ASSERT_GE(malloc_usable_size(b.p), b.size) << "seed " << seed << " step " << step;
  for (size_t i = 0; i < b.size; i++)
    if (b.p[i] != static_cast<unsigned char>(b.fill + i)) {
      FAIL() << "seed " << seed << " step " << step << ": byte " << i << " of a " << b.size << "-byte block";
    }
}

void fill(Block& b, unsigned char f) {
  b.fill = f;
  for (size_t i = 0; i < b.size; i++) b.p[i] = static_cast<unsigned char>(f + i);
}

void run_model(uint64_t seed, size_t steps) {
  std::mt19937_64 rng(seed);
  std::vector<Block> live;
  for (size_t step = 0; step < steps; step++) {
    unsigned op = rng() % 100;
    if (op < 40 || live.empty()) {
      Block b{nullptr, random_size(rng), 16, 0};
      unsigned kind = rng() % 10;
      if (kind == 0) {
        b.p = static_cast<unsigned char*>(calloc(1, b.size));
        ASSERT_NE(b.p, nullptr);
        for (size_t i = 0; i < b.size; i++) ASSERT_EQ(b.p[i], 0) << "seed " << seed << " step " << step;
      } else if (kind == 1) {
        b.align = size_t{1} << (3 + rng() % 14);  // 8 .. 64 KiB
        b.p = static_cast<unsigned char*>(memalign(b.align, b.size));
      } else if (kind == 2) {
        b.align = size_t{1} << (4 + rng() % 9);
        void* p = nullptr;
        ASSERT_EQ(posix_memalign(&p, b.align, b.size), 0);
        b.p = static_cast<unsigned char*>(p);
      } else {
        b.p = static_cast<unsigned char*>(malloc(b.size));
      }
      ASSERT_NE(b.p, nullptr) << "seed " << seed << " step " << step;
      fill(b, static_cast<unsigned char>(rng()));
      live.push_back(b);
    } else if (op < 75) {
      size_t i = rng() % live.size();
      check(live[i], seed, step);
      free(live[i].p);
      live[i] = live.back();
      live.pop_back();
    } else if (op < 98) {
      size_t i = rng() % live.size();
      Block& b = live[i];
      check(b, seed, step);
      size_t size = random_size(rng);
      if (size == 0) size = 1;  // realloc(p, 0) frees: covered elsewhere
      auto* q = static_cast<unsigned char*>(realloc(b.p, size));
      ASSERT_NE(q, nullptr);
      size_t kept = size < b.size ? size : b.size;
      for (size_t k = 0; k < kept; k++)
        ASSERT_EQ(q[k], static_cast<unsigned char>(b.fill + k)) << "seed " << seed << " step " << step;
      b.p = q;
      b.size = size;
      b.align = 16;
      fill(b, static_cast<unsigned char>(rng()));
    } else {
      ebb_trim();  // purging in the middle must not disturb anything live
    }
  }
  for (const Block& b : live) {
    check(b, seed, steps);
    free(b.p);
  }
}

TEST(Model, RandomSequencesMatchTheModel) {
  if (const char* s = getenv("EBB_TEST_SEED")) {
    run_model(strtoull(s, nullptr, 10), 200000);
    return;
  }
  for (uint64_t seed = 1; seed <= 6; seed++) run_model(seed, 60000);
}

}  // namespace
