// Reading a capture of `ebb profile` (format: capture_format.h) into memory.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "symbols.h"

namespace ebb::profile {

struct Code {
  std::string filename;  // a native frame's: the object's path
  std::string qualname;  // a native frame's: its function, or object+0xOFFSET
  int first_line = 0;
  bool native = false;             // a C/C++ function (--native), not a Python code object
  std::vector<uint8_t> linetable;  // CPython 3.11's co_linetable
  // The line of code unit `instr` (CPython's PyCode_Addr2Line); -1 if none.
  int line_of(uint32_t instr) const;
};

struct Location {     // one frame, resolved
  uint32_t code = 0;  // into Capture::codes
  int line = 0;       // 0 for a native frame
  bool operator==(const Location&) const = default;
};

enum class EventKind : uint8_t { kAlloc, kFree, kEnd };

struct Event {
  EventKind kind;
  uint32_t tid = 0;
  uint64_t addr = 0;
  uint64_t size = 0;
  uint64_t time_ns = 0;
  uint32_t stack = 0;  // kAlloc: index into Capture::stacks
};

struct MemoryStats {  // a StatsRecord (capture_format.h)
  uint64_t time_ns = 0;
  uint64_t rss = 0, file = 0, live = 0, heap_resident = 0, thread_cached = 0, large_cached = 0, mapped = 0,
           profiler = 0;
};

struct Capture {
  std::string path;
  int pid = 0;
  int ppid = 0;
  uint64_t rate = 0;  // mean bytes between samples; 1: every allocation
  bool all = false;
  bool native = false;     // stacks have native frames, with the Python frames in place of the interpreter's
  bool truncated = false;  // the writer ran out of room
  bool complete = true;    // false: the file ends inside a record (the writer died mid-write)
  uint32_t python = 0;     // Py_Version, 0 if not CPython
  uint64_t dropped = 0;
  uint64_t start_unix_ns = 0;
  std::vector<Code> codes;                    // by CodeRecord id (index 0 unused), then native functions
  std::vector<NativeModule> modules;          // objects loaded in the process (native captures)
  std::vector<std::vector<Location>> stacks;  // distinct stacks, innermost first
  std::vector<Event> events;                  // in file order
  std::vector<MemoryStats> stats;             // in time order; empty when libebb's background thread was off
};

// Reads `path`; throws std::runtime_error with a one-line reason if it is not a capture.
Capture read_capture(const std::string& path);

}  // namespace ebb::profile
