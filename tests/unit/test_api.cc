// The C allocation API: results, errno and edge cases, as glibc behaves.
#include <errno.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "ebb.h"
#include "heap.h"

extern "C" void free_sized(void*, size_t);
extern "C" void free_aligned_sized(void*, size_t, size_t);

namespace {

bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

// A size the compiler cannot see, so it neither warns nor folds the call.
size_t v(size_t x) {
  volatile size_t y = x;
  return y;
}

// Keeps the compiler from pairing and removing malloc/free calls.
void* opaque(void* p) {
  asm volatile("" : "+r"(p));
  return p;
}

TEST(Malloc, ZeroBytesGivesAUniqueFreeablePointer) {
  void* a = malloc(0);
  void* b = malloc(0);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  EXPECT_NE(a, b);
  EXPECT_GE(malloc_usable_size(a), 1u);
  free(a);
  free(b);
}

TEST(Malloc, EverySizeIsAlignedUsableAndWritable) {
  for (size_t size = 1; size < 300000; size = size * 5 / 4 + 1) {
    auto* p = static_cast<unsigned char*>(malloc(size));
    ASSERT_NE(p, nullptr) << size;
    EXPECT_TRUE(aligned(p, 16)) << size;
    size_t usable = malloc_usable_size(p);
    EXPECT_GE(usable, size);
    memset(p, 0xab, usable);
    EXPECT_EQ(p[usable - 1], 0xab);
    free(p);
  }
}

TEST(Malloc, ImpossibleSizesFailWithEnomem) {
  for (size_t size : {SIZE_MAX, SIZE_MAX / 2, size_t{PTRDIFF_MAX}, (size_t{1} << 62)}) {
    errno = 0;
    EXPECT_EQ(opaque(malloc(v(size))), nullptr) << size;
    EXPECT_EQ(errno, ENOMEM);
  }
}

TEST(Malloc, FreeNullIsANoOp) {
  free(nullptr);
  free_sized(nullptr, 0);
}

TEST(Calloc, ZeroesMemoryEvenWhenReused) {
  for (size_t size : {size_t{8}, size_t{100}, size_t{5000}, size_t{200000}, size_t{3} << 20}) {
    auto* p = static_cast<unsigned char*>(malloc(size));
    memset(p, 0xff, size);
    free(p);
    auto* q = static_cast<unsigned char*>(calloc(1, size));
    ASSERT_NE(q, nullptr);
    for (size_t i = 0; i < size; i++) ASSERT_EQ(q[i], 0) << "size " << size << " byte " << i;
    free(q);
  }
}

TEST(Calloc, OverflowFailsWithEnomem) {
  errno = 0;
  EXPECT_EQ(opaque(calloc(v(SIZE_MAX / 2), 3)), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  errno = 0;
  EXPECT_EQ(opaque(calloc(v(size_t{1} << 33), size_t{1} << 33)), nullptr);
  EXPECT_EQ(errno, ENOMEM);
}

TEST(Realloc, NullIsMallocAndZeroFrees) {
  void* p = realloc(nullptr, 40);
  ASSERT_NE(p, nullptr);
  EXPECT_GE(malloc_usable_size(p), 40u);
  EXPECT_EQ(realloc(p, 0), nullptr);  // glibc: frees, returns NULL
}

TEST(Realloc, KeepsContentsAcrossEverySizeTransition) {
  const size_t sizes[] = {1, 24, 500, 513, 4000, 70000, 131072, 131073, 300000, 5 << 20, 100, 9 << 20, 64};
  auto* p = static_cast<unsigned char*>(malloc(1));
  p[0] = 0;
  size_t prev = 1;
  for (size_t size : sizes) {
    for (size_t i = 0; i < prev && i < size; i++) ASSERT_EQ(p[i], static_cast<unsigned char>(i * 7)) << size;
    auto* q = static_cast<unsigned char*>(realloc(p, size));
    ASSERT_NE(q, nullptr);
    for (size_t i = 0; i < prev && i < size; i++) ASSERT_EQ(q[i], static_cast<unsigned char>(i * 7)) << size;
    for (size_t i = 0; i < size; i++) q[i] = static_cast<unsigned char>(i * 7);
    p = q;
    prev = size;
  }
  free(p);
}

TEST(Realloc, FailureLeavesTheBlockIntact) {
  auto* p = static_cast<char*>(malloc(100));
  strcpy(p, "still here");
  errno = 0;
  EXPECT_EQ(realloc(p, v(SIZE_MAX / 2)), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  EXPECT_STREQ(p, "still here");
  free(p);
}

TEST(Reallocarray, OverflowFailsWithEnomemAndKeepsTheBlock) {
  auto* p = static_cast<int*>(reallocarray(nullptr, 10, sizeof(int)));
  ASSERT_NE(p, nullptr);
  p[9] = 42;
  errno = 0;
  EXPECT_EQ(reallocarray(p, v(SIZE_MAX / 4), 8), nullptr);
  EXPECT_EQ(errno, ENOMEM);
  EXPECT_EQ(p[9], 42);
  p = static_cast<int*>(reallocarray(p, 1000, sizeof(int)));
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p[9], 42);
  free(p);
}

TEST(PosixMemalign, AlignsEveryPowerOfTwo) {
  for (size_t align = sizeof(void*); align <= (size_t{1} << 24); align <<= 1) {
    for (size_t size : {size_t{1}, size_t{100}, size_t{70000}, size_t{1} << 20}) {
      void* p = nullptr;
      ASSERT_EQ(posix_memalign(&p, align, size), 0) << align << " " << size;
      EXPECT_TRUE(aligned(p, align)) << align << " " << size;
      EXPECT_GE(malloc_usable_size(p), size);
      memset(p, 1, size);
      free(p);
    }
  }
}

TEST(PosixMemalign, RejectsBadAlignmentWithEinvalAndLeavesOutput) {
  void* p = reinterpret_cast<void*>(0x1234);
  EXPECT_EQ(posix_memalign(&p, 0, 8), EINVAL);
  EXPECT_EQ(posix_memalign(&p, 24, 8), EINVAL);
  EXPECT_EQ(posix_memalign(&p, 4, 8), EINVAL);  // not a multiple of sizeof(void*)
  EXPECT_EQ(p, reinterpret_cast<void*>(0x1234));
  EXPECT_EQ(posix_memalign(&p, 64, v(SIZE_MAX / 2)), ENOMEM);
}

TEST(AlignedAlloc, AlignsAndRejectsNonPowersOfTwo) {
  void* p = aligned_alloc(4096, 4096);
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(aligned(p, 4096));
  free(p);
  errno = 0;
  EXPECT_EQ(aligned_alloc(v(48), 96), nullptr);
  EXPECT_EQ(errno, EINVAL);
}

TEST(Memalign, RoundsNonPowersOfTwoUpLikeGlibc) {
  void* p = memalign(v(48), 100);
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(aligned(p, 64));
  free(p);
  errno = 0;
  EXPECT_EQ(opaque(memalign(v(SIZE_MAX), 8)), nullptr);
  EXPECT_EQ(errno, EINVAL);
}

TEST(Valloc, PageAlignedAndPvallocRoundsSizeUp) {
  long page = sysconf(_SC_PAGESIZE);
  void* p = valloc(10);
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(aligned(p, static_cast<size_t>(page)));
  free(p);
  void* q = pvalloc(10);
  ASSERT_NE(q, nullptr);
  EXPECT_TRUE(aligned(q, static_cast<size_t>(page)));
  EXPECT_GE(malloc_usable_size(q), static_cast<size_t>(page));
  free(q);
  errno = 0;
  EXPECT_EQ(opaque(pvalloc(v(SIZE_MAX - 10))), nullptr);
  EXPECT_EQ(errno, ENOMEM);
}

TEST(FreeSized, AcceptsEveryForm) {
  free_sized(malloc(77), 77);
  void* p = aligned_alloc(256, 512);
  free_aligned_sized(p, 256, 512);
}

TEST(UsableSize, NullAndForeignPointersAreZero) {
  EXPECT_EQ(malloc_usable_size(nullptr), 0u);
  static char not_ours[64];
  EXPECT_EQ(malloc_usable_size(not_ours), 0u);
}

// Anonymous memory and the loader's mappings may hold blocks the loader's
// own malloc handed out before libebb's was bound: left alone (foreign.cc).
TEST(Foreign, FreeOfAnonymousOrLoaderMemoryIsIgnored) {
  void* m = mmap(nullptr, 1 << 16, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(m, MAP_FAILED);
  auto* data = static_cast<char*>(m) + 4096;
  strcpy(data, "foreign");
  free(data);
  EXPECT_STREQ(data, "foreign");
  munmap(m, 1 << 16);
  auto* loader = reinterpret_cast<char*>(getauxval(AT_BASE));  // where the kernel mapped ld-linux
  ASSERT_NE(loader, nullptr);
  free(opaque(loader + 64));
}

TEST(Foreign, ReallocCopiesWhatCanBeReadAndLeavesTheOldBlock) {
  static char data[64] = "copied from a block ebb never saw";
  auto* p = static_cast<char*>(realloc(data, 1000));
  ASSERT_NE(p, nullptr);
  EXPECT_NE(p, data);
  EXPECT_STREQ(p, "copied from a block ebb never saw");
  EXPECT_STREQ(data, "copied from a block ebb never saw");
  free(p);
}

TEST(MallocTrim, ReturnsOneWhenItReleasedMemory) {
  const int n = 20000;
  static void* ptrs[n];
  for (int i = 0; i < n; i++) ptrs[i] = malloc(1000);
  for (int i = 0; i < n; i++) free(ptrs[i]);
  EXPECT_EQ(malloc_trim(0), 1);
}

TEST(Version, NamesEbb) { EXPECT_EQ(strncmp(ebb_version(), "ebb ", 4), 0); }

// ---- bad input aborts with a one-line message ------------------------------

// Stray frees: the stack, another thread's stack, a string literal, an
// initialised global, an address nothing maps (foreign.cc).
TEST(BadInputDeathTest, FreeOfAStackAddress) {
  EXPECT_DEATH(
      {
        char local[32];
        free(opaque(local));
      },
      "^ebb: free\\(\\): invalid pointer \\(on the stack\\) 0x[0-9a-f]+\n");
}

void* park(void* arg) {
  char local[64];
  *static_cast<void* volatile*>(arg) = local;
  pause();  // until the process ends
  return nullptr;
}

TEST(BadInputDeathTest, FreeOfAnotherThreadsStack) {
  EXPECT_DEATH(
      {
        void* volatile where = nullptr;
        pthread_t t;
        pthread_create(&t, nullptr, park, const_cast<void**>(&where));
        while (where == nullptr) usleep(1000);
        free(where);
      },
      "^ebb: free\\(\\): invalid pointer \\(on a thread stack\\) 0x[0-9a-f]+\n");
}

int g_initialised = 42;

TEST(BadInputDeathTest, FreeOfAGlobalOrALiteral) {
  EXPECT_DEATH(free(opaque(&g_initialised)), "^ebb: free\\(\\): invalid pointer \\(in a file mapping\\) 0x[0-9a-f]+\n");
  EXPECT_DEATH(operator delete(opaque(const_cast<char*>("a literal"))),
               "^ebb: operator delete\\(\\): invalid pointer \\(in a file mapping\\) 0x[0-9a-f]+\n");
}

TEST(BadInputDeathTest, FreeOfAnUnmappedAddress) {
  EXPECT_DEATH(free(opaque(reinterpret_cast<void*>(1))), "^ebb: free\\(\\): invalid pointer \\(not mapped\\) 0x1\n");
}

TEST(BadInputDeathTest, DoubleFreeOfSmallObject) {
  EXPECT_DEATH(
      {
        void* p = malloc(64);
        free(p);
        free(p);
      },
      "^ebb: free\\(\\): double free 0x[0-9a-f]+\n");
}

TEST(BadInputDeathTest, DoubleFreeAfterTheCacheWasFlushed) {
  EXPECT_DEATH(
      {
        void* p = malloc(48);
        free(p);
        for (int i = 0; i < 1000; i++) free(malloc(48));  // push p out to its span
        ebb_trim();
        free(p);
      },
      // The span may have emptied and restarted carving: then p is past the carve line.
      "ebb: free\\(\\): (double free|invalid pointer) 0x");
}

// The key that marks a free object can be overwritten (a write after free).
// The second free then looks like a first one; the bitmap still catches it
// when the thread cache is flushed, and the message names the object.
void clobber_free_key(void* p) {
  volatile char* bytes = static_cast<char*>(p);
  for (int i = 8; i < 16; i++) bytes[i] = 0;
}

// Writes p as the first line of stderr (see expect_double_free_of).
void announce(const void* p) {
  char line[64];
  int n = snprintf(line, sizeof line, "%p\n", p);
  if (write(2, line, static_cast<size_t>(n)) != n) _exit(2);
}

// Runs body() in a child, which announce()s an object p and must then abort
// with "ebb: free(): <why> <p>" as all else it writes to stderr.
template <class Body>
void expect_double_free_of(Body body, const std::string& why = "double free") {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    alarm(20);  // a heap corrupted by an undetected double free may loop forever
    dup2(fds[1], 2);
    body();
    _exit(0);
  }
  close(fds[1]);
  std::string out;
  char buf[256];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) out.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT) << "status " << status << ", stderr: " << out;
  const std::string p = out.substr(0, out.find('\n'));
  EXPECT_EQ(out, p + "\nebb: free(): " + why + " " + p + "\n");
}

TEST(BadInput, DoubleFreeInOneFlushedBatch) {
  expect_double_free_of([] {
    void* p = malloc(64);
    announce(p);
    free(p);
    clobber_free_key(p);
    free(p);     // p is twice in the cache
    ebb_trim();  // flushes it
  });
}

TEST(BadInput, DoubleFreeOfAnObjectAlreadyInItsSpan) {
  expect_double_free_of([] {
    // 64-byte objects: one page of a span is one word of its free bitmap.
    // Find three objects a < p < c on one page; the rest stay live, so that
    // no page of theirs is purged (a purged page's slots leave the bitmap).
    void* objs[64];
    for (void*& o : objs) o = malloc(64);
    std::sort(std::begin(objs), std::end(objs));
    int i = 1;
    auto page = [](const void* o) { return reinterpret_cast<uintptr_t>(o) >> 12; };
    while (i < 63 && !(page(objs[i - 1]) == page(objs[i + 1]))) i++;
    if (i == 63) _exit(3);
    void* a = objs[i - 1];
    void* p = objs[i];
    void* c = objs[i + 1];
    announce(p);
    free(p);
    ebb_trim();  // p's bit is set in its span's bitmap
    clobber_free_key(p);
    free(a);
    free(p);
    free(c);
    ebb_trim();  // one batch: three bits of p's word, p's already set
  });
}

TEST(BadInput, DoubleFreeAfterItsSpanEmptiedInTheSameBatch) {
  // One batch gives back every live object of a span S, which resets S and
  // clears its bitmap, then an object of another span, then an object of S a
  // second time (its key overwritten after the first free, so free() took
  // it): S would have more objects back than out.
  expect_double_free_of(
      [] {
        std::vector<void*> objs;
        for (int i = 0; i < 3000; i++) objs.push_back(malloc(48));
        auto span = [](void* p) {
          return ebb::span_of(
              reinterpret_cast<ebb::SegmentHeader*>(reinterpret_cast<uintptr_t>(p) & ~ebb::kSegmentMask), p);
        };
        ebb::Span* s = span(objs.back());  // carved last: a span of this child's own
        std::vector<void*> in_s;
        void* other = nullptr;
        for (void* p : objs) {
          if (span(p) == s && in_s.size() < 50)
            in_s.push_back(p);
          else if (span(p) != s && other == nullptr)
            other = p;
          else
            free(p);
        }
        ebb_trim();  // S's live objects are now the 50 in in_s, and nothing is cached
        if (other == nullptr || in_s.size() != 50 || s->used != 50) _exit(3);
        announce(s->start);
        for (void* p : in_s) free(p);
        free(other);
        clobber_free_key(in_s[0]);
        free(in_s[0]);
        ebb_trim();  // one batch: S's 50, the other span's one, S's first again
      },
      "double free of an object in the span at");
}

TEST(BadInput, DoubleFreeOfAnObjectOnAPurgedPage) {
  // A page whose objects are all free is given back; reading it again gives
  // zeros, so the key that marked p free is gone and free() takes p. The
  // flush must still see that p overlaps a purged page: no live object does.
  expect_double_free_of([] {
    constexpr int kObjects = 1024;
    constexpr size_t kSize = 256;  // 16 objects to a page
    char* objs[kObjects];
    for (char*& o : objs) {
      o = static_cast<char*>(malloc(kSize));
      memset(o, 0x5a, kSize);
    }
    int first = -1;  // 16 consecutive objects that fill one page
    for (int i = 0; i + 15 < kObjects && first < 0; i++)
      if ((reinterpret_cast<uintptr_t>(objs[i]) & 4095) == 0 && objs[i + 15] == objs[i] + 15 * kSize) first = i;
    if (first < 0) _exit(3);
    char* p = objs[first];
    announce(p);
    for (int i = first; i < first + 16; i++) free(objs[i]);
    if (ebb_trim() == 0 || reinterpret_cast<volatile uint64_t*>(p)[1] != 0) _exit(4);  // the page went back
    free(p);
    ebb_trim();  // flushes p
  });
}

TEST(BadInputDeathTest, DoubleFreeOfLargeObject) {
  EXPECT_DEATH(
      {
        void* p = malloc(1 << 20);
        free(p);
        free(p);
      },
      "ebb: free\\(\\): double free 0x");
}

TEST(BadInputDeathTest, InteriorPointer) {
  EXPECT_DEATH(
      {
        char* p = static_cast<char*>(malloc(64));
        free(p + 16);
      },
      "^ebb: free\\(\\): invalid pointer 0x[0-9a-f]+\n");
}

TEST(BadInputDeathTest, InteriorPointerOfLargeObject) {
  EXPECT_DEATH(
      {
        char* p = static_cast<char*>(malloc(1 << 20));
        free(p + 4096);
      },
      "ebb: free\\(\\): invalid pointer 0x");
}

TEST(BadInputDeathTest, ReallocOfInteriorPointerNamesRealloc) {
  EXPECT_DEATH(
      {
        char* p = static_cast<char*>(malloc(64));
        opaque(realloc(p + 8, 100));
      },
      "ebb: realloc\\(\\): invalid pointer 0x");
}

TEST(Counts, FollowLiveObjectsAndBytesSmallAndLarge) {
  ebb_counts_t before, during, after;
  ASSERT_EQ(ebb_counts(nullptr, sizeof before), -1);
  ASSERT_EQ(ebb_counts(&before, sizeof before), 0);
  std::vector<void*> small(1000), large(10);
  for (auto& p : small) p = opaque(malloc(v(100)));
  for (auto& p : large) p = opaque(malloc(v(1 << 20)));
  ASSERT_EQ(ebb_counts(&during, sizeof during), 0);
  // The vectors' own two blocks are live too; gtest allocates nothing here.
  const uint64_t objects = during.live_objects - before.live_objects;
  EXPECT_GE(objects, 1010u);
  EXPECT_LE(objects, 1012u);
  const uint64_t bytes = during.live_bytes - before.live_bytes;
  const uint64_t expected = 1000 * ebb::class_size(ebb::size_to_class(100)) + (uint64_t{10} << 20);
  EXPECT_GE(bytes, expected);
  EXPECT_LE(bytes, expected + 16384);
  EXPECT_GE(during.allocs_total - before.allocs_total, 1010u);
  EXPECT_GE(during.requested_total - before.requested_total, uint64_t{1000} * 100 + (uint64_t{10} << 20));
  for (void* p : small) free(p);
  for (void* p : large) free(p);
  ASSERT_EQ(ebb_counts(&after, sizeof after), 0);
  EXPECT_LE(after.live_objects, before.live_objects + 2);
  EXPECT_LE(after.live_bytes, before.live_bytes + 16384);
}

}  // namespace
