// The ebb side of the telemetry page: find a process's page from its PID,
// read it safely (torn, stale, foreign or garbage pages are rejected with a
// reason) and send it commands.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "page.h"

namespace ebb::telemetry {

enum class Status { kOk, kNoPage, kStale, kInvalid, kBusy, kError };
const char* status_name(Status s);

struct Snapshot {
  uint32_t version = 0;  // of the page
  std::string allocator;
  uint64_t updated_ms = 0;
  uint64_t rss_bytes = 0;
  uint64_t soft_limit = 0;
  uint64_t purger_runs = 0;
  ebb_stats_t stats{};
};

struct ReadResult {
  Status status = Status::kNoPage;
  std::string message;  // why, for anything but kOk
  std::string path;
  Snapshot snap;
};

// Where a process (whose euid is `uid`) keeps its page: $EBB_TELEMETRY_DIR
// from its environment when we can read it, else /dev/shm/ebb-<uid>.
std::string page_path(pid_t pid, uid_t uid, const std::string& proc_root = "/proc");

// Reads and validates the page at `path` for process pid (start_ticks from
// /proc/PID/stat, uid its owner).
ReadResult read_page(const std::string& path, pid_t pid, uint64_t start_ticks, uid_t uid);

// Reads the page of a live process (identity from /proc).
ReadResult read_pid(pid_t pid, const std::string& proc_root = "/proc");

struct Ack {
  Status status = Status::kError;
  std::string message;
  uint64_t released = 0;
  uint64_t rss_before = 0;
  uint64_t rss_after = 0;
  int32_t error = 0;  // AckError or an errno: the process did not do it
  std::string text;   // the process's text answer (a capture's path)
};

// Sends a command (text: its text argument, version 2 pages only) and waits
// up to timeout_ms for the acknowledgement.
Ack send(pid_t pid, Command cmd, uint64_t arg, int timeout_ms, const std::string& text = "",
         const std::string& proc_root = "/proc");

// PIDs with a page in dir; removes pages of processes that are gone (only
// files we own). Returns the live PIDs.
std::vector<pid_t> scan_dir(const std::string& dir, const std::string& proc_root = "/proc");

// /dev/shm/ebb-<uid>, or $EBB_TELEMETRY_DIR of this process.
std::string default_dir(uid_t uid);

}  // namespace ebb::telemetry
