#include <gtest/gtest.h>

#include "size_class.h"

using namespace ebb;

TEST(SizeClass, EveryRequestFitsItsClassAndTheClassBelowIsTooSmall) {
  for (size_t size = 0; size <= kMaxSmallSize; size++) {
    unsigned cls = size_to_class(size);
    ASSERT_GE(cls, 1u);
    ASSERT_LE(cls, kNumClasses);
    ASSERT_GE(class_size(cls), size) << size;
    if (cls > 1) {
      ASSERT_LT(class_size(cls - 1), size) << size;
    }
  }
}

TEST(SizeClass, SmallClassesAre16BytesApartUpTo512) {
  for (unsigned cls = 1; cls <= kFineClasses; cls++) EXPECT_EQ(class_size(cls), cls * 16u);
  EXPECT_EQ(class_size(kFineClasses), 512u);
}

TEST(SizeClass, MediumClassesAre64BytesApartUpTo8KiB) {
  for (unsigned cls = kFineClasses + 1; cls <= kMediumClasses; cls++)
    EXPECT_EQ(class_size(cls), class_size(cls - 1) + 64) << cls;
  EXPECT_EQ(class_size(kMediumClasses), 8192u);
  // A ~5 KB Python string (5,054 bytes: the seed's frag scenario) wastes 2 bytes.
  EXPECT_EQ(class_size(size_to_class(5054)), 5056u);
}

TEST(SizeClass, WasteAbove512IsUnderAQuarter) {
  for (unsigned cls = kFineClasses + 1; cls <= kNumClasses; cls++) {
    size_t prev = class_size(cls - 1);
    EXPECT_LT(class_size(cls) - prev - 1, class_size(cls) / 4) << cls;
    EXPECT_EQ(class_size(cls) % 16, 0u);
  }
}

TEST(SizeClass, ReciprocalDivisionIsExactForEveryOffsetInASpan) {
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    const ClassInfo& ci = kClasses[cls];
    size_t span = size_t{ci.slices} * kSliceSize;
    for (uint64_t off = 0; off < span; off++) {
      uint64_t idx = (off * ci.recip) >> 40;
      ASSERT_EQ(idx, off / ci.size) << "class " << cls << " offset " << off;
    }
  }
}

TEST(SizeClass, SpansHoldAtLeastEightObjectsAndFitTheirSlices) {
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    const ClassInfo& ci = kClasses[cls];
    EXPECT_GE(ci.capacity, 8u) << cls;
    EXPECT_LE(ci.slices, kMaxSpanSlices);
    EXPECT_LE(size_t{ci.capacity} * ci.size, size_t{ci.slices} * kSliceSize);
    EXPECT_LE(ci.capacity, 4096u);  // span_purge's bitmap
  }
}

TEST(SizeClass, TheLastPageOfASpanWastesUnderTwoPerMille) {
  for (unsigned cls = 1; cls <= kNumClasses; cls++) {
    const ClassInfo& ci = kClasses[cls];
    size_t bytes = size_t{ci.capacity} * ci.size;
    size_t resident = (bytes + kPageSize - 1) / kPageSize * kPageSize;
    EXPECT_LE((resident - bytes) * 500, bytes) << "class " << cls << " size " << ci.size << " slices " << ci.slices;
  }
}
