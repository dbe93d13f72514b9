// Compile-time layout of the libebb heap.
//
// Memory comes from the OS in 4 MiB-aligned *segments*. A segment is cut into
// 64 KiB *slices*; a *span* is a run of slices holding objects of one size
// class. Because segments are aligned, the span of any pointer is found by
// masking the address: no per-object header is needed, which is what lets
// libebb match pymalloc's density for small Python objects.
#pragma once

#include <cstddef>
#include <cstdint>

#define EBB_LIKELY(x) __builtin_expect(!!(x), 1)
#define EBB_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define EBB_NOINLINE __attribute__((noinline))
#define EBB_INLINE inline __attribute__((always_inline))

namespace ebb {

constexpr size_t kSegmentShift = 22;
constexpr size_t kSegmentSize = size_t{1} << kSegmentShift;  // 4 MiB
constexpr uintptr_t kSegmentMask = kSegmentSize - 1;
constexpr size_t kSliceShift = 16;
constexpr size_t kSliceSize = size_t{1} << kSliceShift;  // 64 KiB
constexpr size_t kSlicesPerSegment = kSegmentSize / kSliceSize;
// Slice 0 of every segment holds the segment header (metadata); the rest hold spans.
constexpr size_t kFirstSpanSlice = 1;
constexpr size_t kMaxSpanSlices = 16;  // a span is at most 1 MiB

// Purging works on OS pages. 4 KiB on x86-64 and most arm64 kernels; checked at start-up.
constexpr size_t kPageShift = 12;
constexpr size_t kPageSize = size_t{1} << kPageShift;
constexpr size_t kMaxSpanPages = kMaxSpanSlices * kSliceSize / kPageSize;  // 256

// Objects up to this size live in spans; larger ones get their own mapping.
constexpr size_t kMaxSmallSize = size_t{128} * 1024;
// The smallest object and the alignment malloc promises (max_align_t on x86-64).
constexpr size_t kMinAlign = 16;
// User-space addresses fit in 48 bits on x86-64 (4-level paging) and arm64.
constexpr size_t kAddressBits = 48;

}  // namespace ebb
