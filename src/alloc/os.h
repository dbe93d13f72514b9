// Thin wrappers over the system calls libebb needs. Nothing here allocates.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ebb::os {

// Anonymous read-write mapping of `size` bytes whose start is a multiple of
// `align` (a power of two >= the page size). nullptr when the OS refuses.
void* map_aligned(size_t size, size_t align);
void unmap(void* p, size_t size);
// Gives pages back: the range reads as zeros afterwards. Returns false on error.
bool decommit(void* p, size_t size);

// Milliseconds of CLOCK_MONOTONIC_COARSE (vDSO, no syscall; 1-10 ms steps).
uint64_t now_ms();
// Milliseconds from `stamp` (low 32 bits of now_ms()) to `now`; 0 when the
// stamp is newer than `now` (taken by another thread after `now` was read),
// which would otherwise wrap round to a huge age.
inline uint32_t elapsed_ms(uint64_t now, uint32_t stamp) {
  const uint32_t d = static_cast<uint32_t>(now) - stamp;
  return static_cast<int32_t>(d) > 0 ? d : 0;
}

// Writes a message to stderr with write(2); no stdio, no allocation.
void write_err(const char* s);
// "ebb: <what>(): <why> 0x<addr>" then abort(). For heap corruption caught in the act.
[[noreturn]] void fatal_pointer(const char* what, const char* why, const void* addr);
[[noreturn]] void fatal(const char* msg);

// Formats v as 0x-prefixed hex / decimal into buf (>= 24 bytes); returns buf.
char* fmt_hex(char* buf, uintptr_t v);
char* fmt_dec(char* buf, uint64_t v);

// 64 random bits from the kernel (getrandom) or, failing that, from the clock.
uint64_t random64();

// Copies up to n bytes from src, stopping at the first unreadable address;
// returns the number copied. Used only for memory libebb did not hand out.
size_t copy_readable(void* dst, const void* src, size_t n);

}  // namespace ebb::os

namespace ebb::os {

// Resident set size of this process from /proc/self/statm; 0 if unreadable.
uint64_t rss_bytes();
// Resident bytes, and of them those backed by a file or shared memory (statm).
void statm(uint64_t* rss, uint64_t* file);
// Field 22 (starttime) of /proc/self/stat; 0 if unreadable.
uint64_t start_ticks();

}  // namespace ebb::os
