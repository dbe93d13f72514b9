// Size classes.
//
// Three ranges:
//  - up to 512 bytes, 16 bytes apart (16, 32, ..., 512): pymalloc's spacing,
//    and where almost every Python object falls;
//  - up to 8 KiB, 64 bytes apart (576, 640, ..., 8192). Under pymalloc these
//    sizes (medium strings and bytes, dict key tables, list item arrays) go
//    to glibc, which wastes under 16 bytes each; four classes per power of
//    two would waste 12.5% on average and lose to it on density;
//  - up to 128 KiB, four classes per power of two (10240, 12288, ...): few
//    objects per span, where a finer step would mostly add partly used spans.
#pragma once

#include <array>

#include "config.h"

namespace ebb {

constexpr unsigned kFineClasses = 32;  // 16 .. 512 step 16
constexpr size_t kFineMax = size_t{kFineClasses} * 16;
constexpr size_t kMediumMax = 8192;                                               // .. 8 KiB step 64
constexpr unsigned kMediumClasses = kFineClasses + (kMediumMax - kFineMax) / 64;  // 152
constexpr unsigned kNumClasses = kMediumClasses + 16;  // .. 128 KiB, 4 per doubling; class 0 is unused

constexpr unsigned floor_log2(size_t x) { return 63u - static_cast<unsigned>(__builtin_clzll(x)); }

// Class index (1..kNumClasses) of a request of `size` bytes (size <= kMaxSmallSize).
EBB_INLINE constexpr unsigned size_to_class(size_t size) {
  if (size <= kFineMax) return size == 0 ? 1u : static_cast<unsigned>((size + 15) >> 4);
  if (size <= kMediumMax) return kFineClasses + static_cast<unsigned>((size - kFineMax + 63) >> 6);
  size_t s = size - 1;
  unsigned b = floor_log2(s);  // >= 13
  return kMediumClasses + (b - 13) * 4 + static_cast<unsigned>((s >> (b - 2)) & 3) + 1;
}

constexpr size_t class_to_size_calc(unsigned cls) {
  if (cls <= kFineClasses) return size_t{cls} * 16;
  if (cls <= kMediumClasses) return kFineMax + size_t{cls - kFineClasses} * 64;
  unsigned k = cls - kMediumClasses - 1;
  unsigned b = 13 + k / 4;
  return (size_t{1} << b) + size_t{(k % 4) + 1} * (size_t{1} << (b - 2));
}

// Slices per span. The objects of a span end inside a page that is resident
// as soon as the last object is carved; the rest of that page is waste, and
// with one slice per span it reaches 6% for some classes between 1 and 8 KiB.
// So: the fewest slices (at least 8 objects, at most 4096 for the bitmap)
// whose resident tail is at most 1/2048 of the objects' bytes, else the
// count with the least waste (at most 0.2%, for a few classes). Untouched
// pages past the tail cost address space only.
constexpr size_t resident_tail(size_t bytes) { return ((bytes + kPageSize - 1) & ~(kPageSize - 1)) - bytes; }

constexpr unsigned span_slices_calc(unsigned cls) {
  const size_t size = class_to_size_calc(cls);
  unsigned best = 0;
  size_t best_waste = 0, best_bytes = 1;
  for (unsigned n = 1; n <= kMaxSpanSlices; n++) {
    size_t cap = n * kSliceSize / size;
    if (cap < 8 || cap > 4096) continue;
    size_t bytes = cap * size;
    size_t waste = resident_tail(bytes);
    if (waste * 2048 <= bytes) return n;
    if (best == 0 || waste * best_bytes < best_waste * bytes) {
      best = n;
      best_waste = waste;
      best_bytes = bytes;
    }
  }
  return best;
}

struct ClassInfo {
  uint32_t size;
  uint16_t slices;
  uint16_t capacity;  // objects per span
  uint64_t recip;     // ceil(2^40 / size): offset / size == (offset * recip) >> 40 for offsets < 2^20
};

constexpr std::array<ClassInfo, kNumClasses + 1> make_class_table() {
  std::array<ClassInfo, kNumClasses + 1> t{};
  for (unsigned c = 1; c <= kNumClasses; c++) {
    size_t size = class_to_size_calc(c);
    unsigned slices = span_slices_calc(c);
    t[c].size = static_cast<uint32_t>(size);
    t[c].slices = static_cast<uint16_t>(slices);
    t[c].capacity = static_cast<uint16_t>(slices * kSliceSize / size);
    t[c].recip = ((uint64_t{1} << 40) + size - 1) / size;
  }
  return t;
}

inline constexpr std::array<ClassInfo, kNumClasses + 1> kClasses = make_class_table();

static_assert(class_to_size_calc(kNumClasses) == kMaxSmallSize);
static_assert(size_to_class(kMaxSmallSize) == kNumClasses);
static_assert(size_to_class(513) == kFineClasses + 1 && class_to_size_calc(kFineClasses + 1) == 576);
static_assert(class_to_size_calc(kMediumClasses) == kMediumMax && class_to_size_calc(kMediumClasses + 1) == 10240);
static_assert(kNumClasses < 256, "Span::cls is one byte");

EBB_INLINE size_t class_size(unsigned cls) { return kClasses[cls].size; }

}  // namespace ebb
