// Every operator new and delete form, served by libebb.
//
// No exceptions are thrown from inside the allocator. When memory runs out,
// the throwing forms hand over to the next definition of the same operator
// (libstdc++'s, found with dlsym(RTLD_NEXT)): it calls malloc again (libebb),
// runs the program's new-handler as the standard requires and throws
// std::bad_alloc if that fails too. A C++ program always has libstdc++ loaded.
#include <dlfcn.h>

#include <cstddef>
#include <new>

#include "alloc.h"

namespace {

using ebb::alloc;
using ebb::alloc_aligned;
using ebb::dealloc;

[[noreturn]] void no_next(const char* sym) {
  ebb::os::write_err("ebb: out of memory in ");
  ebb::os::write_err(sym);
  ebb::os::fatal(" and no C++ runtime to report it");
}

template <typename Fn, typename... Args>
void* retry_next(const char* sym, Args... args) {
  auto next = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, sym));
  if (next == nullptr) no_next(sym);
  return next(args...);
}

}  // namespace

#define EBB_NEW __attribute__((visibility("default")))

EBB_NEW void* operator new(std::size_t n) {
  void* p = alloc(n);
  if (EBB_LIKELY(p != nullptr)) return p;
  return retry_next<void* (*)(std::size_t)>("_Znwm", n);
}

EBB_NEW void* operator new[](std::size_t n) {
  void* p = alloc(n);
  if (EBB_LIKELY(p != nullptr)) return p;
  return retry_next<void* (*)(std::size_t)>("_Znam", n);
}

EBB_NEW void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return alloc(n); }
EBB_NEW void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return alloc(n); }

EBB_NEW void* operator new(std::size_t n, std::align_val_t a) {
  void* p = alloc_aligned(static_cast<std::size_t>(a), n);
  if (EBB_LIKELY(p != nullptr)) return p;
  return retry_next<void* (*)(std::size_t, std::align_val_t)>("_ZnwmSt11align_val_t", n, a);
}

EBB_NEW void* operator new[](std::size_t n, std::align_val_t a) {
  void* p = alloc_aligned(static_cast<std::size_t>(a), n);
  if (EBB_LIKELY(p != nullptr)) return p;
  return retry_next<void* (*)(std::size_t, std::align_val_t)>("_ZnamSt11align_val_t", n, a);
}

EBB_NEW void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return alloc_aligned(static_cast<std::size_t>(a), n);
}
EBB_NEW void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return alloc_aligned(static_cast<std::size_t>(a), n);
}

EBB_NEW void operator delete(void* p) noexcept { dealloc(p, "operator delete"); }
EBB_NEW void operator delete[](void* p) noexcept { dealloc(p, "operator delete[]"); }
EBB_NEW void operator delete(void* p, std::size_t) noexcept { dealloc(p, "operator delete"); }
EBB_NEW void operator delete[](void* p, std::size_t) noexcept { dealloc(p, "operator delete[]"); }
EBB_NEW void operator delete(void* p, const std::nothrow_t&) noexcept { dealloc(p, "operator delete"); }
EBB_NEW void operator delete[](void* p, const std::nothrow_t&) noexcept { dealloc(p, "operator delete[]"); }
EBB_NEW void operator delete(void* p, std::align_val_t) noexcept { dealloc(p, "operator delete"); }
EBB_NEW void operator delete[](void* p, std::align_val_t) noexcept { dealloc(p, "operator delete[]"); }
EBB_NEW void operator delete(void* p, std::size_t, std::align_val_t) noexcept { dealloc(p, "operator delete"); }
EBB_NEW void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { dealloc(p, "operator delete[]"); }
EBB_NEW void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  dealloc(p, "operator delete");
}
EBB_NEW void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  dealloc(p, "operator delete[]");
}
