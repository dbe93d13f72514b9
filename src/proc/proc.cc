#include "proc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>

namespace ebb::proc {

const char* state_name(State s) {
  switch (s) {
    case State::kOk:
      return "ok";
    case State::kGone:
      return "gone";
    case State::kDenied:
      return "denied";
  }
  return "?";
}

std::optional<std::string> read_file(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  std::string out;
  char buf[8192];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      int saved = errno;
      close(fd);
      errno = saved;
      return std::nullopt;
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return out;
}

std::vector<pid_t> list_pids(const std::string& proc_root) {
  std::vector<pid_t> pids;
  DIR* d = opendir(proc_root.c_str());
  if (d == nullptr) return pids;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long v = strtol(e->d_name, &end, 10);
    if (end != e->d_name && *end == 0 && v > 0) pids.push_back(static_cast<pid_t>(v));
  }
  closedir(d);
  std::sort(pids.begin(), pids.end());
  return pids;
}

Memory parse_smaps(const std::string& text) {
  Memory m;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    uint64_t kb = strtoull(line.c_str() + colon + 1, nullptr, 10);
    uint64_t bytes = kb * 1024;
    if (key == "Rss")
      m.rss += bytes;
    else if (key == "Pss")
      m.pss += bytes;
    else if (key == "Private_Clean" || key == "Private_Dirty")
      m.uss += bytes;
    else if (key == "Shared_Clean" || key == "Shared_Dirty")
      m.shared += bytes;
    else if (key == "Swap")
      m.swap += bytes;
    else if (key == "SwapPss")
      m.swap_pss += bytes;
    else if (key == "Anonymous")
      m.anonymous += bytes;
  }
  return m;
}

namespace {

State state_from_errno() { return errno == ENOENT || errno == ESRCH ? State::kGone : State::kDenied; }

// Fields of /proc/PID/stat after the command name (which may hold spaces and
// parentheses, so parse from the last ')').
bool parse_stat(const std::string& stat, Process& p) {
  auto open_paren = stat.find('(');
  auto close_paren = stat.rfind(')');
  if (open_paren == std::string::npos || close_paren == std::string::npos || close_paren < open_paren) return false;
  p.comm = stat.substr(open_paren + 1, close_paren - open_paren - 1);
  std::istringstream rest(stat.substr(close_paren + 2));
  std::vector<std::string> f;
  std::string tok;
  while (rest >> tok) f.push_back(tok);
  // f[0] is field 3 (state); ppid is field 4, starttime field 22.
  if (f.size() < 20) return false;
  p.ppid = static_cast<pid_t>(strtol(f[1].c_str(), nullptr, 10));
  p.start_ticks = strtoull(f[19].c_str(), nullptr, 10);
  return true;
}

}  // namespace

Process read_process(pid_t pid, const std::string& proc_root) {
  Process p;
  p.pid = pid;
  const std::string dir = proc_root + "/" + std::to_string(pid);
  auto stat = read_file(dir + "/stat");
  if (!stat || !parse_stat(*stat, p)) {
    p.state = stat ? State::kGone : state_from_errno();
    return p;
  }
  if (auto status = read_file(dir + "/status")) {
    auto at = status->find("\nUid:");
    if (at != std::string::npos) p.uid = static_cast<uid_t>(strtoul(status->c_str() + at + 5, nullptr, 10));
  }
  if (auto cmd = read_file(dir + "/cmdline")) {
    std::string s = *cmd;
    while (!s.empty() && s.back() == '\0') s.pop_back();
    std::replace(s.begin(), s.end(), '\0', ' ');
    p.cmdline = s;
  }
  auto rollup = read_file(dir + "/smaps_rollup");
  if (!rollup && errno == ENOENT) {
    // Kernels before 4.14 have no rollup; the full smaps sums to the same.
    // (ENOENT can also mean the process is gone: smaps then fails too.)
    rollup = read_file(dir + "/smaps");
  }
  if (!rollup) {
    p.state = state_from_errno();
    if (p.state == State::kDenied) {
      // Another user's process: status is world-readable and still tells RSS and swap.
      if (auto status = read_file(dir + "/status")) {
        auto kb = [&](const char* key) -> uint64_t {
          auto at = status->find(key);
          return at == std::string::npos ? 0 : strtoull(status->c_str() + at + strlen(key), nullptr, 10) * 1024;
        };
        p.mem.rss = kb("\nVmRSS:");
        p.mem.swap = kb("\nVmSwap:");
        p.mem.anonymous = kb("\nRssAnon:");
      }
    }
    return p;
  }
  if (rollup->empty()) {
    // Kernel threads and zombies have no address space: nothing to count.
    return p;
  }
  p.mem = parse_smaps(*rollup);
  return p;
}

std::string allocator_of(pid_t pid, const std::string& proc_root) {
  auto maps = read_file(proc_root + "/" + std::to_string(pid) + "/maps");
  if (!maps) return "";
  // The first of these mapped wins: a preloaded allocator comes before libc.
  static const char* const known[][2] = {{"/libebb.so", "ebb"},
                                         {"/libjemalloc.so", "jemalloc"},
                                         {"/libmimalloc.so", "mimalloc"},
                                         {"/libtcmalloc", "tcmalloc"}};
  for (const auto& k : known)
    if (maps->find(k[0]) != std::string::npos) return k[1];
  return "glibc";
}

ChildMap children_by_parent(const std::string& proc_root) {
  ChildMap children;
  for (pid_t pid : list_pids(proc_root)) {
    auto stat = read_file(proc_root + "/" + std::to_string(pid) + "/stat");
    Process p;
    if (stat && parse_stat(*stat, p)) children.emplace(p.ppid, pid);
  }
  return children;
}

std::vector<pid_t> tree(pid_t root, const ChildMap& children) {
  std::vector<pid_t> out{root};
  for (size_t i = 0; i < out.size(); i++) {
    auto range = children.equal_range(out[i]);
    for (auto it = range.first; it != range.second; ++it) out.push_back(it->second);
  }
  return out;
}

std::vector<pid_t> tree(pid_t root, const std::string& proc_root) { return tree(root, children_by_parent(proc_root)); }

uint64_t rss_of(pid_t pid, const std::string& proc_root) {
  auto statm = read_file(proc_root + "/" + std::to_string(pid) + "/statm");
  unsigned long long size = 0, resident = 0;
  if (!statm || sscanf(statm->c_str(), "%llu %llu", &size, &resident) != 2) return 0;
  return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace ebb::proc
