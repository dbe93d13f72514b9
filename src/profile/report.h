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
};

// Call sites of a snapshot, most own bytes first.
std::vector<Site> sites(const Capture& c, const Snapshot& s);

}  // namespace ebb::profile
