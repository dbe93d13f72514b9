#include "reader.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include "proc.h"

namespace ebb::telemetry {

const char* status_name(Status s) {
  switch (s) {
    case Status::kOk:
      return "ok";
    case Status::kNoPage:
      return "no page";
    case Status::kStale:
      return "stale";
    case Status::kInvalid:
      return "invalid";
    case Status::kBusy:
      return "busy";
    case Status::kError:
      return "error";
  }
  return "?";
}

std::string default_dir(uid_t uid) {
  const char* env = getenv("EBB_TELEMETRY_DIR");
  if (env != nullptr && *env != 0 && uid == geteuid()) return env;
  return "/dev/shm/ebb-" + std::to_string(uid);
}

std::string page_path(pid_t pid, uid_t uid, const std::string& proc_root) {
  // The process may have been told another directory (ebb run does this).
  if (auto env = proc::read_file(proc_root + "/" + std::to_string(pid) + "/environ")) {
    const std::string key = "EBB_TELEMETRY_DIR=";
    size_t at = 0;
    while (at < env->size()) {
      size_t end = env->find('\0', at);
      if (end == std::string::npos) end = env->size();
      if (env->compare(at, key.size(), key) == 0 && end > at + key.size())
        return env->substr(at + key.size(), end - at - key.size()) + "/" + std::to_string(pid);
      at = end + 1;
    }
  }
  return "/dev/shm/ebb-" + std::to_string(uid) + "/" + std::to_string(pid);
}

namespace {

ReadResult fail(Status s, std::string msg, const std::string& path) {
  ReadResult r;
  r.status = s;
  r.message = std::move(msg);
  r.path = path;
  return r;
}

// Opens the page file and checks it is a private regular file of the owner.
int open_checked(const std::string& path, uid_t uid, int flags, ReadResult* err) {
  int fd = open(path.c_str(), flags | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      *err = fail(Status::kNoPage, "no telemetry page", path);
    } else {
      *err = fail(Status::kError, std::string("cannot open: ") + strerror(errno), path);
    }
    return -1;
  }
  struct stat st;
  const char* why = nullptr;
  if (fstat(fd, &st) != 0)
    why = "cannot stat";
  else if (!S_ISREG(st.st_mode))
    why = "not a regular file";
  else if (st.st_uid != uid)
    why = "owned by another user than the process";
  else if ((st.st_mode & 077) != 0)
    why = "readable or writable by others (want mode 0600)";
  else if (st.st_size < static_cast<off_t>(offsetof(Page, stats) + sizeof(uint32_t) * 2))
    why = "too short";
  if (why != nullptr) {
    close(fd);
    *err = fail(Status::kInvalid, why, path);
    return -1;
  }
  return fd;
}

}  // namespace

ReadResult read_page(const std::string& path, pid_t pid, uint64_t start_ticks, uid_t uid) {
  ReadResult r;
  int fd = open_checked(path, uid, O_RDONLY, &r);
  if (fd < 0) return r;
  // Two copies of the page: consistent when both have the same even
  // sequence number and the same statistics (a write in between changes one
  // or the other). pread, not mmap: a truncated file cannot SIGBUS us.
  alignas(Page) unsigned char a[kFileBytes], b[kFileBytes];
  {
    // Identity first: garbage is rejected as such, not retried as torn.
    ssize_t n = pread(fd, a, sizeof a, 0);
    const auto* p = reinterpret_cast<const Page*>(a);
    const char* why = nullptr;
    if (n < static_cast<ssize_t>(sizeof(Page)))
      why = "too short";
    else if (p->magic != kMagic)
      why = "not an ebb telemetry page (bad magic)";
    else if (p->version == 0 || p->version > kVersion ||
             p->size < (p->version == 1 ? kVersion1Bytes : static_cast<uint32_t>(sizeof(Page))))
      why = "unknown page version";
    if (why != nullptr) {
      close(fd);
      return fail(Status::kInvalid, why, path);
    }
  }
  Status status = Status::kBusy;
  for (int attempt = 0; attempt < 50 && status == Status::kBusy; attempt++) {
    ssize_t na = pread(fd, a, sizeof a, 0);
    ssize_t nb = pread(fd, b, sizeof b, 0);
    if (na < static_cast<ssize_t>(sizeof(Page)) || nb != na) {
      close(fd);
      return fail(Status::kInvalid, "too short", path);
    }
    const auto* pa = reinterpret_cast<const Page*>(a);
    const auto* pb = reinterpret_cast<const Page*>(b);
    uint64_t sa = pa->seq.load(std::memory_order_relaxed), sb = pb->seq.load(std::memory_order_relaxed);
    if (sa == sb && sa % 2 == 0 && memcmp(&pa->stats, &pb->stats, sizeof pa->stats) == 0)
      status = Status::kOk;
    else
      std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  close(fd);
  if (status == Status::kBusy) return fail(Status::kBusy, "page kept changing (torn reads)", path);
  const auto* p = reinterpret_cast<const Page*>(b);
  if (p->pid != pid) return fail(Status::kInvalid, "page names PID " + std::to_string(p->pid), path);
  if (p->uid != uid) return fail(Status::kInvalid, "page names another user", path);
  if (start_ticks != 0 && p->start_ticks != start_ticks)
    return fail(Status::kStale, "page of an earlier process with the same PID", path);
  if (p->stats.version != EBB_STATS_VERSION || p->stats.size > sizeof(ebb_stats_t))
    return fail(Status::kInvalid, "bad statistics header", path);
  r.status = Status::kOk;
  r.path = path;
  r.snap.version = p->version;
  r.snap.allocator.assign(p->allocator, strnlen(p->allocator, sizeof p->allocator));
  r.snap.updated_ms = p->updated_ms;
  r.snap.rss_bytes = p->rss_bytes;
  r.snap.soft_limit = p->soft_limit;
  r.snap.purger_runs = p->purger_runs;
  r.snap.stats = p->stats;
  return r;
}

namespace {

// The page of a process already read from /proc.
ReadResult read_for(const proc::Process& p, const std::string& proc_root) {
  if (p.state == proc::State::kGone) return fail(Status::kNoPage, "no such process", "");
  return read_page(page_path(p.pid, p.uid, proc_root), p.pid, p.start_ticks, p.uid);
}

}  // namespace

ReadResult read_pid(pid_t pid, const std::string& proc_root) {
  return read_for(proc::read_process(pid, proc_root), proc_root);
}

Ack send(pid_t pid, Command cmd, uint64_t arg, int timeout_ms, const std::string& text, const std::string& proc_root) {
  Ack ack;
  proc::Process proc = proc::read_process(pid, proc_root);
  ReadResult check = read_for(proc, proc_root);
  if (check.status != Status::kOk) {
    ack.status = check.status;
    ack.message = check.message;
    return ack;
  }
  const bool v2 = cmd == kCmdProfileStart || cmd == kCmdProfileStop || !text.empty();
  if (v2 && check.snap.version < 2) {
    ack.status = Status::kInvalid;
    ack.message = "its libebb is older than this ebb (telemetry page version 1): restart it with this libebb";
    return ack;
  }
  if (text.size() >= sizeof(Page::cmd_text)) {
    ack.message = "command text too long";
    return ack;
  }
  ReadResult err;
  int fd = open_checked(check.path, proc.uid, O_RDWR, &err);
  if (fd < 0) {
    ack.status = err.status;
    ack.message = err.message;
    return ack;
  }
  void* mem = mmap(nullptr, kFileBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (mem == MAP_FAILED) {
    ack.message = std::string("cannot map the page: ") + strerror(errno);
    return ack;
  }
  auto* page = static_cast<Page*>(mem);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  // Claim the command slot (another controller may hold it for a moment).
  for (;;) {
    uint32_t expected = kSlotFree;
    if (page->cmd_state.compare_exchange_strong(expected, kSlotWriting, std::memory_order_acquire)) break;
    if (std::chrono::steady_clock::now() > deadline) {
      munmap(mem, kFileBytes);
      ack.status = Status::kBusy;
      ack.message = "command slot busy";
      return ack;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  uint64_t acks = page->acks.load(std::memory_order_acquire);
  page->cmd = cmd;
  page->cmd_arg = arg;
  if (check.snap.version >= 2) {
    memset(page->cmd_text, 0, sizeof page->cmd_text);
    memcpy(page->cmd_text, text.data(), text.size());
  }
  page->cmd_state.store(kSlotPending, std::memory_order_release);
  page->wake.fetch_add(1, std::memory_order_release);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&page->wake), FUTEX_WAKE, 1, nullptr, nullptr, 0);
  while (page->acks.load(std::memory_order_acquire) == acks) {
    if (std::chrono::steady_clock::now() > deadline) {
      // Take the command back if it was never picked up, so the slot is free.
      uint32_t pending = kSlotPending;
      page->cmd_state.compare_exchange_strong(pending, kSlotFree);
      munmap(mem, kFileBytes);
      ack.status = Status::kBusy;
      ack.message = "no acknowledgement within " + std::to_string(timeout_ms) + " ms";
      return ack;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ack.status = Status::kOk;
  ack.released = page->ack_released;
  ack.rss_before = page->ack_rss_before;
  ack.rss_after = page->ack_rss_after;
  if (check.snap.version >= 2) {
    ack.error = page->ack_error;
    ack.text.assign(page->ack_text, strnlen(page->ack_text, sizeof page->ack_text));
  }
  munmap(mem, kFileBytes);
  return ack;
}

std::vector<pid_t> scan_dir(const std::string& dir, const std::string& proc_root) {
  std::vector<pid_t> live;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return live;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long v = strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != 0 || v <= 0) continue;
    auto pid = static_cast<pid_t>(v);
    proc::Process p = proc::read_process(pid, proc_root);
    std::string path = dir + "/" + e->d_name;
    ReadResult r =
        p.state == proc::State::kGone ? fail(Status::kStale, "", path) : read_page(path, pid, p.start_ticks, p.uid);
    if (r.status == Status::kStale) {
      struct stat st;
      if (lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid()) unlink(path.c_str());
      continue;
    }
    live.push_back(pid);
  }
  closedir(d);
  return live;
}

}  // namespace ebb::telemetry
