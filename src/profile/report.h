// What a capture says: the heap over time, and who holds it at a moment.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "capture.h"

namespace ebb::profile {

// Bytes an allocation of `size` stands for: itself when every allocation is
// recorded; else divided by its chance of holding a sampled byte, so that
// the sum over samples estimates the sum over all allocations.
double sample_weight(uint64_t size, uint64_t rate, bool all);

// The live (or, for kTotal, ever allocated) bytes per stack at one moment.
struct Snapshot {
  std::string name;  // "peak", "end", "total", or the time asked for
  uint64_t time_ns = 0;
  double bytes = 0;
  std::vector<double> by_stack;          // estimated bytes, by Capture::stacks index
  std::vector<uint64_t> count_by_stack;  // samples
};

struct Timeline {
  std::vector<uint64_t> time_ns;
  std::vector<double> heap;  // estimated live bytes of the program
};

struct Analysis {
  Snapshot peak;      // the most live bytes ever
  Snapshot end;       // when the interpreter began to finalize, else the last event
  Snapshot total;     // everything allocated
  Timeline timeline;  // at most ~1,000 points
};

Analysis analyze(const Capture& c);
// Live bytes at `time_ns` from the start of the capture.
Snapshot snapshot_at(const Capture& c, uint64_t time_ns);

struct Site {
  std::string function;  // qualified name; "[no Python frame]" for allocations outside Python code
  std::string file;
  int line = 0;
  double own = 0;        // bytes allocated by this line itself (innermost Python frame)
  double inclusive = 0;  // and by everything it called
  uint64_t count = 0;    // samples (allocations, with --all) in `own`
  bool native = false;   // a C/C++ function (file: its object, line: 0)
};

// What the process's RSS was made of at a moment: the capture's memory
// statistics taken last before it (the first ones, for a moment before any).
struct MemoryView {
  bool known = false;  // the capture has statistics (libebb's background thread wrote them)
  uint64_t time_ns = 0;
  uint64_t rss = 0;
  uint64_t file = 0;           // backed by files or shared memory: code, libraries, mapped files
  uint64_t anon = 0;           // rss - file
  uint64_t live = 0;           // the program's live heap, exact
  uint64_t heap_resident = 0;  // libebb's pages that may be resident
  uint64_t thread_cached = 0;  // free, in thread caches
  uint64_t large_cached = 0;   // free large blocks kept for reuse
  uint64_t free_in_spans = 0;  // free, in partly used spans (fragmentation) and not yet purged
  uint64_t other_anon = 0;     // anonymous and outside the heap: stacks, mmaps outside malloc, the profiler
  uint64_t untouched = 0;      // heap pages handed out but not resident (never written, e.g. calloc)
  uint64_t profiler = 0;       // the profiler's own tables (part of other_anon when resident)
};
MemoryView memory_at(const Capture& c, uint64_t time_ns);

// Call sites of a snapshot, most own bytes first.
std::vector<Site> sites(const Capture& c, const Snapshot& s);

}  // namespace ebb::profile
