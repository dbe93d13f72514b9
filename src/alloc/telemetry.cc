// libebb's side of the telemetry page (src/telemetry/page.h): create it,
// publish statistics into it, run the commands ebb sends through it.
//
// Off unless EBB_TELEMETRY=1 (ebb run sets it for its workers): then the
// page is created at start-up and the purger thread serves it. Off, it costs
// one well-predicted branch in the purger.
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "heap.h"
#include "os.h"
#include "page.h"

namespace ebb {

namespace {

telemetry::Page* g_page = nullptr;
pid_t g_page_pid = 0;
char g_path[256];
uint64_t g_last_publish_ms = 0;
uint64_t g_soft_limit = 0;
uint64_t g_purger_runs = 0;
bool g_warned = false;

void warn(const char* what, const char* path) {
  if (g_warned) return;  // once per process: a misconfigured fleet must not flood its logs
  g_warned = true;
  os::write_err("ebb: telemetry off: ");
  os::write_err(what);
  os::write_err(" ");
  os::write_err(path);
  os::write_err("\n");
}

bool append(char* dst, size_t cap, const char* s) {
  size_t n = strlen(dst), m = strlen(s);
  if (n + m + 1 > cap) return false;
  memcpy(dst + n, s, m + 1);
  return true;
}

// The directory: $EBB_TELEMETRY_DIR, else /dev/shm/ebb-<uid>. It must be a
// real directory (not a symlink) owned by us and closed to everyone else.
bool make_dir(char* dir, size_t cap) {
  const char* env = g_options.telemetry_dir;
  char num[24];
  dir[0] = 0;
  if (*env != 0) {
    if (!append(dir, cap, env)) return false;
  } else if (!append(dir, cap, "/dev/shm/ebb-") || !append(dir, cap, os::fmt_dec(num, geteuid()))) {
    return false;
  }
  if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
    warn("cannot create", dir);
    return false;
  }
  struct stat st;
  if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 077) != 0) {
    warn("not a private directory of this user (want mode 0700, owned by us, no symlink):", dir);
    return false;
  }
  return true;
}

}  // namespace

bool telemetry_wanted() { return g_options.telemetry; }

telemetry::Page* telemetry_page() { return g_page; }

void telemetry_open() {
  if (g_page != nullptr || !telemetry_wanted()) return;
  char dir[200];
  if (!make_dir(dir, sizeof dir)) return;
  char num[24];
  g_path[0] = 0;
  if (!append(g_path, sizeof g_path, dir) || !append(g_path, sizeof g_path, "/") ||
      !append(g_path, sizeof g_path, os::fmt_dec(num, static_cast<uint64_t>(getpid()))))
    return;
  int fd = open(g_path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0 && errno == EEXIST) {
    // A page of a dead process that had our PID (we are alive with it now).
    unlink(g_path);
    fd = open(g_path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  }
  if (fd < 0) {
    warn("cannot create", g_path);
    return;
  }
  void* mem = MAP_FAILED;
  if (ftruncate(fd, telemetry::kFileBytes) == 0)
    mem = mmap(nullptr, telemetry::kFileBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (mem == MAP_FAILED) {
    unlink(g_path);
    warn("cannot map", g_path);
    return;
  }
  auto* page = static_cast<telemetry::Page*>(mem);
  page->version = telemetry::kVersion;
  page->size = sizeof(telemetry::Page);
  page->pid = getpid();
  page->uid = geteuid();
  page->start_ticks = os::start_ticks();
  memcpy(page->allocator, ebb_version(),
         strlen(ebb_version()) < sizeof page->allocator - 1 ? strlen(ebb_version()) : sizeof page->allocator - 1);
  // The magic goes last: a reader that sees it sees a complete identity.
  __atomic_store_n(&page->magic, telemetry::kMagic, __ATOMIC_RELEASE);
  g_page_pid = getpid();
  g_page = page;
  telemetry_publish(true);
}

void telemetry_publish(bool force) {
  telemetry::Page* p = g_page;
  if (p == nullptr) return;
  uint64_t now = os::now_ms();
  if (!force && now - g_last_publish_ms < 1000) return;
  g_last_publish_ms = now;
  ebb_stats_t s;
  ebb_stats(&s, sizeof s);
  uint64_t rss = os::rss_bytes();
  uint64_t seq = p->seq.load(std::memory_order_relaxed);
  p->seq.store(seq + 1, std::memory_order_relaxed);  // odd: writing
  std::atomic_thread_fence(std::memory_order_release);
  p->updated_ms = now;
  p->rss_bytes = rss;
  p->soft_limit = g_soft_limit;
  p->purger_runs = g_purger_runs;
  memcpy(&p->stats, &s, sizeof s);
  p->seq.store(seq + 2, std::memory_order_release);
}

uint32_t telemetry_wait_ms(bool pending, uint32_t tick_ms) {
  if (g_page == nullptr) return pending ? tick_ms : 0;
  uint64_t since = os::now_ms() - g_last_publish_ms;
  uint32_t until_publish = since >= 1000 ? 1 : static_cast<uint32_t>(1000 - since);
  return pending && tick_ms < until_publish ? tick_ms : until_publish;
}

std::atomic<uint32_t>* telemetry_wake_word() { return g_page != nullptr ? &g_page->wake : nullptr; }

bool telemetry_over_soft_limit() {
  uint64_t limit = __atomic_load_n(&g_soft_limit, __ATOMIC_RELAXED);
  return limit != 0 && os::rss_bytes() > limit;
}

void telemetry_count_pass() { g_purger_runs++; }

// Runs a pending command, if any. Called by the purger thread only.
void telemetry_serve() {
  telemetry::Page* p = g_page;
  if (p == nullptr || p->cmd_state.load(std::memory_order_acquire) != telemetry::kSlotPending) return;
  uint32_t cmd = p->cmd;
  uint64_t arg = p->cmd_arg;
  uint64_t before = os::rss_bytes();
  uint64_t released = 0;
  int32_t error = telemetry::kAckOk;
  p->ack_text[0] = 0;
  if (cmd == telemetry::kCmdProfileStart) {
    char prefix[sizeof p->cmd_text];
    memcpy(prefix, p->cmd_text, sizeof prefix);
    prefix[sizeof prefix - 1] = 0;
    error = profile_attach(prefix, arg, false, p->ack_text, sizeof p->ack_text);
  } else if (cmd == telemetry::kCmdProfileStop) {
    error = profile_detach(p->ack_text, sizeof p->ack_text);
  } else if (cmd == telemetry::kCmdTrim) {
    bool pending = false;
    released = purge_all(true, &pending);
  } else if (cmd == telemetry::kCmdSetSoftLimit) {
    __atomic_store_n(&g_soft_limit, arg, __ATOMIC_RELAXED);
    if (telemetry_over_soft_limit()) {
      bool pending = false;
      released = purge_all(true, &pending);
    }
  } else {
    error = telemetry::kAckUnknownCommand;
  }
  p->ack_error = error;
  p->ack_cmd = cmd;
  p->ack_released = released;
  p->ack_rss_before = before;
  p->ack_rss_after = os::rss_bytes();
  telemetry_publish(true);
  p->acks.fetch_add(1, std::memory_order_release);
  p->cmd_state.store(telemetry::kSlotFree, std::memory_order_release);
}

void telemetry_after_fork_child() {
  // The page belongs to the parent: let go of it without writing to it. The
  // child makes its own when its purger starts.
  if (g_page != nullptr) munmap(g_page, telemetry::kFileBytes);
  g_page = nullptr;
  g_page_pid = 0;
}

// At exit, the page goes with the process (a killed process leaves it; the
// next process with that PID, and ebb's readers, remove stale pages).
__attribute__((destructor)) static void telemetry_close() {
  if (g_page != nullptr && g_page_pid == getpid()) unlink(g_path);
}

}  // namespace ebb
