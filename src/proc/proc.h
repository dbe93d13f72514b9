// Readers for /proc: process lists, command lines and memory figures.
// Processes can vanish or deny access at any moment; every reader reports
// that as a state, never as an exception or a crash.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ebb::proc {

enum class State { kOk, kGone, kDenied };

const char* state_name(State s);

// Memory of one process, in bytes, from /proc/PID/smaps_rollup (or the sum of
// /proc/PID/smaps on kernels without it).
struct Memory {
  uint64_t rss = 0;
  uint64_t pss = 0;
  uint64_t uss = 0;     // Private_Clean + Private_Dirty
  uint64_t shared = 0;  // Shared_Clean + Shared_Dirty
  uint64_t swap = 0;
  uint64_t swap_pss = 0;
  uint64_t anonymous = 0;
};

struct Process {
  pid_t pid = 0;
  pid_t ppid = 0;
  uid_t uid = 0;
  std::string comm;          // the kernel's short name
  std::string cmdline;       // arguments joined by spaces; empty for kernel threads
  uint64_t start_ticks = 0;  // start time since boot, in clock ticks (tells PID reuse apart)
  State state = State::kOk;
  Memory mem;
};

// Every PID in /proc, ascending.
std::vector<pid_t> list_pids(const std::string& proc_root = "/proc");

// Parses the text of a smaps_rollup or smaps file (fields are summed, so
// either works). Values in the file are kB.
Memory parse_smaps(const std::string& text);

// Reads one process: identity from stat/status/cmdline, memory from smaps_rollup.
// A process that has exited comes back with state kGone, one we may not read
// with kDenied (identity fields filled where they could be read).
Process read_process(pid_t pid, const std::string& proc_root = "/proc");

// pid and all its descendants (by parent PID), pid first.
std::vector<pid_t> tree(pid_t pid, const std::string& proc_root = "/proc");

// Every process's children, keyed by parent PID: one pass over /proc, to
// build several trees from (a supervisor's tick).
using ChildMap = std::multimap<pid_t, pid_t>;
ChildMap children_by_parent(const std::string& proc_root = "/proc");
std::vector<pid_t> tree(pid_t pid, const ChildMap& children);

// Resident set size from /proc/PID/statm (cheap: no page-table walk); 0 if
// the process is gone.
uint64_t rss_of(pid_t pid, const std::string& proc_root = "/proc");

// Which malloc a process uses, from the libraries in /proc/PID/maps: "ebb",
// "jemalloc", "mimalloc", "tcmalloc", or "glibc"; "" when maps is unreadable.
std::string allocator_of(pid_t pid, const std::string& proc_root = "/proc");

// Reads a whole small file; nullopt with errno set when it cannot be read.
std::optional<std::string> read_file(const std::string& path);

}  // namespace ebb::proc
