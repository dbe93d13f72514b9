// The capture file of `ebb profile`: written by libebb as the program runs,
// read by the ebb tool (src/profile/capture.cc). Shared by both, like the
// telemetry page: plain structs, no libstdc++.
//
//   <prefix>.<pid>.ebbprof   one file per process (a forked child starts its own)
//
// A Header, then records one after the other, each 8-byte aligned and
// starting with a RecordHead. libebb maps the file MAP_SHARED and writes a
// record's body before its `bytes` field (release order): the kernel keeps
// the pages of a process that dies, so a capture cut short by SIGKILL or the
// OOM killer reads up to its last complete record, and a reader stops at the
// first head whose `bytes` is 0. The file grows in kGrowBytes steps, so its
// tail is zeros.
//
// Python frames are (code id, instruction index) pairs; a Code record, written
// the first time a code object is seen, carries its names and its location
// table (co_linetable), from which the reader computes line numbers: the
// allocator never decodes anything while it holds a lock inside malloc.
//
// Native stacks (--native) are return addresses; Module records name the
// objects loaded in the process (path, address range, build id), written
// when profiling starts and whenever the loader's list changes, and the
// reader finds function names in those files (src/profile/symbols.cc).
#pragma once

#include <cstdint>

namespace ebb::capture {

constexpr uint64_t kMagic = 0x31666f7270626265ull;  // "ebbprof1"
constexpr uint32_t kVersion = 1;
constexpr uint64_t kGrowBytes = uint64_t{8} << 20;
constexpr uint64_t kMaxBytes = uint64_t{64} << 30;  // address space reserved for one capture (less if refused)
constexpr uint32_t kMaxFrames = 128;                // deeper stacks keep their innermost frames

enum Flags : uint32_t {
  kFlagAll = 1,        // every allocation recorded (--all), not sampled
  kFlagTruncated = 2,  // the capture reached its reserved size: later events are missing
  kFlagNative = 4,     // allocations carry their native stacks
};

// Or'ed into the sampling rate (ebb_profile_start's and kCmdProfileStart's
// argument; EBB_PROFILE_NATIVE=1 in the environment): native stacks too.
constexpr uint64_t kRateNative = uint64_t{1} << 63;

struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t header_bytes;  // sizeof(Header) of the writer: records start there
  int32_t pid;
  int32_t ppid;
  uint64_t rate;           // mean bytes between samples (1 with kFlagAll)
  uint64_t start_ns;       // CLOCK_MONOTONIC when the capture began
  uint64_t start_unix_ns;  // CLOCK_REALTIME at the same moment
  uint32_t flags;          // Flags (kFlagTruncated is set while running)
  uint32_t python;         // Py_Version of the traced interpreter, 0 if none was found
  uint64_t dropped;        // samples not recorded (table of live samples full)
};

enum RecordType : uint16_t {
  kCode = 1,    // CodeRecord + filename + qualname + linetable bytes
  kAlloc = 2,   // AllocRecord + `count` Frames
  kFree = 3,    // FreeRecord
  kEnd = 4,     // EndRecord: the interpreter began to finalize (what is live is "at the end")
  kStats = 5,   // StatsRecord: the process's memory, four times a second (readers skip types they do not know)
  kModule = 6,  // ModuleRecord + path: an object loaded in the process (with kFlagNative)
};

struct RecordHead {
  uint32_t bytes;  // the whole record, head included, a multiple of 8; 0: no record (yet)
  uint16_t type;   // RecordType
  uint16_t count;  // kAlloc: frames that follow
};

struct CodeRecord {
  RecordHead head;
  uint32_t id;  // referenced by Frame::code
  int32_t first_line;
  uint32_t filename_bytes;  // UTF-8, not terminated
  uint32_t qualname_bytes;
  uint32_t linetable_bytes;  // CPython 3.11's co_linetable
  uint32_t pad;
};

struct Frame {
  uint32_t code;   // CodeRecord::id; 0: no frame, only kFrameEntry (an entry frame left out)
  uint32_t instr;  // index of the code unit being run (prev_instr), | kFrameEntry
};
// The frame is the first that its call of _PyEval_EvalFrameDefault ran: the
// reader puts the frames up to it in place of that C function's native frame.
constexpr uint32_t kFrameEntry = uint32_t{1} << 31;

struct AllocRecord {
  RecordHead head;
  uint32_t tid;
  uint32_t native;  // return addresses after the frames (0 without kFlagNative)
  uint64_t addr;
  uint64_t size;     // bytes asked for
  uint64_t time_ns;  // since Header::start_ns
  // Frame frames[head.count], innermost first
  // uint64_t native_stack[native], innermost first
};

struct FreeRecord {
  RecordHead head;
  uint32_t pad;
  uint64_t addr;
  uint64_t time_ns;
};

struct EndRecord {
  RecordHead head;
  uint32_t pad;
  uint64_t time_ns;
};

// What the process's memory was made of at a moment, from libebb's own
// counters and /proc/self/statm: what lets the report explain RSS.
struct StatsRecord {
  RecordHead head;
  uint32_t pad;
  uint64_t time_ns;
  uint64_t rss_bytes;            // resident, all of it
  uint64_t file_bytes;           // resident and backed by a file or shared memory (code, libraries, mappings)
  uint64_t live_bytes;           // asked for by the program and not freed (exact)
  uint64_t heap_resident_bytes;  // libebb's pages that may be resident: live, free in spans, caches
  uint64_t thread_cached_bytes;  // free objects held in thread caches
  uint64_t large_cached_bytes;   // freed large blocks kept for reuse
  uint64_t mapped_bytes;         // address space libebb holds
  uint64_t profiler_bytes;       // the profiler's own tables (anonymous, at most this much resident)
};

enum ModuleFlags : uint32_t {
  kModuleSelf = 1,  // libebb: its frames (malloc, the profiler) are left out of stacks
};

struct ModuleRecord {
  RecordHead head;
  uint32_t flags;       // ModuleFlags
  uint32_t path_bytes;  // the path follows, UTF-8, not terminated ("" for the vdso's own name)
  uint64_t base;        // dlpi_addr: what the ELF file's addresses are offset by
  uint64_t start, end;  // the loaded segments, [start, end)
  uint32_t build_id_bytes;
  uint32_t pad;
  uint8_t build_id[24];  // NT_GNU_BUILD_ID, to tell whether the file on disk is still the one that ran
};

static_assert(sizeof(Header) == 64, "the header's layout is part of the format");
static_assert(sizeof(AllocRecord) % 8 == 0 && sizeof(CodeRecord) % 8 == 0 && sizeof(FreeRecord) % 8 == 0 &&
                  sizeof(StatsRecord) % 8 == 0 && sizeof(ModuleRecord) % 8 == 0,
              "records stay 8-byte aligned");

}  // namespace ebb::capture
