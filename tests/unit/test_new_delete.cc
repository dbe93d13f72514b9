// Every operator new/delete form goes through libebb; failures throw
// std::bad_alloc (or return nullptr for nothrow) as the standard says.
#include <gtest/gtest.h>
#include <malloc.h>
#include <stdint.h>

#include <new>
#include <vector>

#include "ebb.h"

namespace {

size_t huge() {
  volatile size_t n = SIZE_MAX / 4;  // not a constant: the compiler must call new
  return n;
}

TEST(NewDelete, PlainFormsAllocateFromEbb) {
  int* p = new int(7);
  EXPECT_GE(malloc_usable_size(p), sizeof(int));  // ebb knows the pointer
  delete p;
  int* a = new int[100];
  EXPECT_GE(malloc_usable_size(a), 100 * sizeof(int));
  delete[] a;
  void* raw = ::operator new(123);
  ::operator delete(raw, 123);  // sized
  void* raw2 = ::operator new[](456);
  ::operator delete[](raw2, 456);
}

TEST(NewDelete, AlignedFormsAreAligned) {
  for (size_t align : {32u, 64u, 4096u, 65536u, 1u << 22}) {
    void* p = ::operator new(100, std::align_val_t(align));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % align, 0u) << align;
    ::operator delete(p, std::align_val_t(align));
    void* q = ::operator new[](1000, std::align_val_t(align));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(q) % align, 0u) << align;
    ::operator delete[](q, 1000, std::align_val_t(align));
    void* r = ::operator new(10, std::align_val_t(align), std::nothrow);
    ASSERT_NE(r, nullptr);
    ::operator delete(r, std::align_val_t(align), std::nothrow);
  }
  struct alignas(128) Wide {
    char c[200];
  };
  auto* w = new Wide;
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w) % 128, 0u);
  delete w;
}

TEST(NewDelete, ThrowingFormsThrowBadAlloc) {
  EXPECT_THROW(static_cast<void>(::operator new(huge())), std::bad_alloc);
  EXPECT_THROW(static_cast<void>(::operator new[](huge())), std::bad_alloc);
  EXPECT_THROW(static_cast<void>(::operator new(huge(), std::align_val_t(64))), std::bad_alloc);
  EXPECT_THROW(std::vector<char>(huge() / 2), std::bad_alloc);
}

TEST(NewDelete, NothrowFormsReturnNull) {
  EXPECT_EQ(::operator new(huge(), std::nothrow), nullptr);
  EXPECT_EQ(::operator new[](huge(), std::nothrow), nullptr);
  EXPECT_EQ(::operator new(huge(), std::align_val_t(64), std::nothrow), nullptr);
}

int g_handler_calls = 0;
void* g_reserve = nullptr;
void release_reserve() {
  g_handler_calls++;
  free(g_reserve);
  g_reserve = nullptr;
  std::set_new_handler(nullptr);
}

TEST(NewDelete, NewHandlerRunsBeforeBadAlloc) {
  g_handler_calls = 0;
  g_reserve = malloc(100);
  std::set_new_handler(release_reserve);
  EXPECT_THROW(static_cast<void>(::operator new(huge())), std::bad_alloc);
  EXPECT_EQ(g_handler_calls, 1);
  std::set_new_handler(nullptr);
}

}  // namespace
