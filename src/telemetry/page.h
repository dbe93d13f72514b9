// The telemetry page: how a process running libebb publishes its heap
// statistics and takes commands from ebb, through one 4 KiB shared file.
//
//   <dir>/<pid>     dir = $EBB_TELEMETRY_DIR or /dev/shm/ebb-<uid> (0700)
//                   file mode 0600, created O_EXCL|O_NOFOLLOW by the process
//
// Reading costs the process nothing: it rewrites `stats` on its own (each
// second, and after every command) under a sequence counter, and a reader
// copies it and checks the counter did not move (a torn read is retried).
// Commands: a controller claims the command slot (cmd_state 0 -> 1), writes
// cmd and arg, publishes (cmd_state = 2), bumps `wake` and FUTEX_WAKEs it;
// libebb's purger thread, which sleeps on `wake`, runs the command, fills in
// the ack fields, increments `acks` and frees the slot (cmd_state = 0).
//
// The layout is shared by libebb (C++ without libstdc++ at run time) and the
// ebb tool; it only grows at the end, with `version` and `size` telling
// readers what they have.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "ebb.h"

namespace ebb::telemetry {

constexpr uint64_t kMagic = 0x31656761706265ull;  // "ebpage1"
constexpr uint32_t kVersion = 2;                  // 2: profiling commands, ack_error and the text fields
constexpr uint32_t kFileBytes = 4096;

enum Command : uint32_t {
  kCmdNone = 0,
  kCmdTrim = 1,          // give every free page back now
  kCmdSetSoftLimit = 2,  // arg: bytes of RSS above which free memory is purged at once (0: none)
  kCmdProfileStart = 3,  // arg: sampling rate (1: every allocation), | capture::kRateNative for native stacks;
                         // cmd_text: capture prefix (absolute)
  kCmdProfileStop = 4,   // stop profiling; ack_text: the capture that was written
};

// Why a command was not done (ack_error; errno values for the file's own errors).
enum AckError : int32_t {
  kAckOk = 0,
  kAckAlreadyProfiling = -1,  // ack_text: the capture being written
  kAckNotProfiling = -2,
  kAckUnknownCommand = -3,
  kAckFinalizing = -4,  // the interpreter is exiting
};

enum CmdState : uint32_t { kSlotFree = 0, kSlotWriting = 1, kSlotPending = 2 };

struct Page {
  // Identity, written once before the file is complete.
  uint64_t magic;
  uint32_t version;
  uint32_t size;  // sizeof(Page) of the writer
  int32_t pid;
  uint32_t uid;          // effective uid of the writer
  uint64_t start_ticks;  // field 22 of /proc/PID/stat: tells a reused PID apart
  char allocator[24];    // "ebb 0.1.0"

  // Statistics, under a sequence counter (odd while being written).
  std::atomic<uint64_t> seq;
  uint64_t updated_ms;   // CLOCK_MONOTONIC_COARSE, ms
  uint64_t rss_bytes;    // the process's RSS (statm) when the stats were taken
  uint64_t soft_limit;   // in force, bytes (0: none)
  uint64_t purger_runs;  // purge passes so far
  ebb_stats_t stats;

  // Commands.
  std::atomic<uint32_t> wake;       // futex word the purger sleeps on
  std::atomic<uint32_t> cmd_state;  // CmdState
  uint32_t cmd;
  uint32_t pad;
  uint64_t cmd_arg;
  std::atomic<uint64_t> acks;  // commands completed
  uint64_t ack_cmd;            // the last one completed
  uint64_t ack_released;       // bytes it released
  uint64_t ack_rss_before;     // RSS before and after it
  uint64_t ack_rss_after;

  // Version 2.
  int32_t ack_error;  // AckError, or an errno
  uint32_t pad2;
  char cmd_text[256];  // the command's text argument, NUL-terminated
  char ack_text[256];  // its text answer, NUL-terminated
};

// The part of the page a version 1 writer has.
constexpr uint32_t kVersion1Bytes = offsetof(Page, ack_error);

static_assert(sizeof(Page) <= kFileBytes, "the telemetry page must fit its file");
static_assert(std::atomic<uint64_t>::is_always_lock_free && std::atomic<uint32_t>::is_always_lock_free,
              "shared-memory atomics must be lock-free");

}  // namespace ebb::telemetry
