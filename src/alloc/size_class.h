// Size classes.
//
// Up to 512 bytes classes are 16 bytes apart (16, 32, ..., 512): that is
// pymalloc's spacing, and where almost every Python object falls. Above, four
// classes per power of two (640, 768, 896, 1024, 1280, ...) up to 128 KiB keep
// the internal waste under 25% (12.5% on average).
#pragma once

#include <array>

#include "config.h"

namespace ebb {

constexpr unsigned kFineClasses = 32;                // 16 .. 512 step 16
constexpr unsigned kNumClasses = kFineClasses + 32;  // .. 128 KiB; class 0 is unused
constexpr size_t kFineMax = size_t{kFineClasses} * 16;

constexpr unsigned floor_log2(size_t x) { return 63u - static_cast<unsigned>(__builtin_clzll(x)); }

// Class index (1..kNumClasses) of a request of `size` bytes (size <= kMaxSmallSize).
EBB_INLINE constexpr unsigned size_to_class(size_t size) {
  if (size <= kFineMax) return size == 0 ? 1u : static_cast<unsigned>((size + 15) >> 4);
  size_t s = size - 1;
  unsigned b = floor_log2(s);  // >= 9
  return kFineClasses + (b - 9) * 4 + static_cast<unsigned>((s >> (b - 2)) & 3) + 1;
}

constexpr size_t class_to_size_calc(unsigned cls) {
  if (cls <= kFineClasses) return size_t{cls} * 16;
  unsigned k = cls - kFineClasses - 1;
  unsigned b = 9 + k / 4;
  return (size_t{1} << b) + size_t{(k % 4) + 1} * (size_t{1} << (b - 2));
}

// Slices per span: the fewest that hold at least 8 objects (so a span is not
// one object) with at most 1/16 of the span lost to the tail.
constexpr unsigned span_slices_calc(unsigned cls) {
  size_t size = class_to_size_calc(cls);
  for (unsigned n = 1; n < kMaxSpanSlices; n++) {
    size_t bytes = n * kSliceSize;
    size_t cap = bytes / size;
    if (cap >= 8 && bytes - cap * size <= bytes / 16) return n;
  }
  return kMaxSpanSlices;
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
static_assert(size_to_class(513) == kFineClasses + 1 && class_to_size_calc(kFineClasses + 1) == 640);

EBB_INLINE size_t class_size(unsigned cls) { return kClasses[cls].size; }

}  // namespace ebb
