// The process rows that ebb ps and ebb top show: /proc figures plus the heap
// from the telemetry page of processes running libebb.
#pragma once

#include <string>
#include <vector>

#include "proc.h"
#include "reader.h"

namespace ebb::cli {

struct Selection {
  std::vector<int> pids;  // explicit PIDs (kept even when gone, to report them)
  int tree = 0;           // a process and its descendants
  bool user = false;      // only the current user's processes
};

struct Row {
  proc::Process p;
  std::string allocator;
  bool has_heap = false;
  telemetry::Snapshot heap;

  uint64_t free_resident() const {
    return heap.stats.resident_bytes > heap.stats.live_bytes ? heap.stats.resident_bytes - heap.stats.live_bytes : 0;
  }
  // The command line on one line ("[comm]" for kernel threads).
  std::string command() const;
};

// Every process of the selection (every process with memory when it names
// none). Explicit PIDs that do not exist come back with state kGone.
std::vector<Row> collect(const Selection& sel);

// Largest first by a column: rss, pss, uss, shared, swap, heap; pid and
// command sort ascending.
void sort_rows(std::vector<Row>& rows, const std::string& column);

// Width of the terminal on stdout, 0 when stdout is not a terminal.
size_t terminal_width();

}  // namespace ebb::cli
