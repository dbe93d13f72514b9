#include "cgroup.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstdlib>
#include <sstream>

#include "proc.h"

namespace ebb::proc {

namespace {

bool is_dir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::optional<uint64_t> read_limit_file(const std::string& path) {
  auto text = read_file(path);
  if (!text) return std::nullopt;
  return parse_limit(*text);
}

// Fields "name value" per line (memory.events, memory.stat).
uint64_t field(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  std::string key;
  uint64_t value = 0;
  while (in >> key >> value)
    if (key == name) return value;
  return 0;
}

}  // namespace

std::optional<uint64_t> parse_limit(const std::string& text) {
  std::string t = text;
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  if (t == "max") return 0;
  if (t.empty() || t.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  errno = 0;
  unsigned long long v = strtoull(t.c_str(), nullptr, 10);
  if (errno != 0) return std::nullopt;
  // cgroup v1 says "no limit" with a page-rounded LONG_MAX.
  if (v >= (1ull << 62)) return 0;
  return v;
}

std::optional<Cgroup> locate(const std::string& proc_cgroup_text, const std::string& mount) {
  std::istringstream in(proc_cgroup_text);
  std::string line;
  std::optional<Cgroup> v2;
  while (std::getline(in, line)) {
    // hierarchy-ID:controller-list:path
    size_t a = line.find(':');
    size_t b = a == std::string::npos ? a : line.find(':', a + 1);
    if (b == std::string::npos) continue;
    std::string id = line.substr(0, a), controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    const std::string rel = path == "/" ? "" : path;
    if (id == "0" && controllers.empty()) {
      v2 = Cgroup{};
      v2->dir = mount + rel;
      v2->v2 = true;
      continue;
    }
    // A v1 hierarchy with the memory controller: on a "hybrid" host it sits
    // next to an empty v2 line, and it is the one that holds the limits.
    std::istringstream list(controllers);
    std::string c;
    while (std::getline(list, c, ','))
      if (c == "memory") {
        Cgroup v1;
        v1.dir = mount;
        v1.dir += "/memory";
        v1.dir += rel;
        v1.v2 = false;
        return v1;
      }
  }
  return v2;
}

bool read_limits(Cgroup& cg) {
  if (cg.v2) {
    auto max = read_limit_file(cg.dir + "/memory.max");
    auto high = read_limit_file(cg.dir + "/memory.high");
    auto current = read_limit_file(cg.dir + "/memory.current");
    cg.max = max.value_or(0);
    cg.high = high.value_or(0);
    cg.current = current.value_or(0);
    return max || high || current;
  }
  auto max = read_limit_file(cg.dir + "/memory.limit_in_bytes");
  auto current = read_limit_file(cg.dir + "/memory.usage_in_bytes");
  cg.max = max.value_or(0);
  cg.high = 0;
  cg.current = current.value_or(0);
  return max || current;
}

std::optional<Cgroup> self() {
  std::optional<Cgroup> cg;
  if (const char* dir = getenv("EBB_CGROUP_DIR"); dir != nullptr && *dir != 0) {
    cg = Cgroup{};
    cg->dir = dir;
    cg->v2 = !read_file(cg->dir + "/memory.limit_in_bytes");  // a v1 directory has this file
  } else {
    auto text = read_file("/proc/self/cgroup");
    if (!text) return std::nullopt;
    cg = locate(*text);
  }
  if (!cg || !is_dir(cg->dir) || !read_limits(*cg)) return std::nullopt;
  return cg;
}

std::optional<MemoryEvents> read_events(const Cgroup& cg) {
  if (!cg.v2) {
    // v1 counts OOM kills in memory.oom_control (kernels since 4.13).
    auto text = read_file(cg.dir + "/memory.oom_control");
    if (!text || text->find("oom_kill ") == std::string::npos) return std::nullopt;
    MemoryEvents e;
    e.oom_kill = field(*text, "oom_kill");
    return e;
  }
  auto text = read_file(cg.dir + "/memory.events");
  if (!text) return std::nullopt;
  MemoryEvents e;
  e.high = field(*text, "high");
  e.max = field(*text, "max");
  e.oom = field(*text, "oom");
  e.oom_kill = field(*text, "oom_kill");
  return e;
}

std::optional<double> read_pressure_avg10(const Cgroup& cg) {
  auto text = read_file(cg.dir + "/memory.pressure");
  if (!text) return std::nullopt;
  // some avg10=0.00 avg60=0.00 avg300=0.00 total=0
  size_t at = text->find("some avg10=");
  if (at == std::string::npos) return std::nullopt;
  return strtod(text->c_str() + at + 11, nullptr);
}

uint64_t default_budget(const Cgroup& cg) {
  if (cg.high != 0 && (cg.max == 0 || cg.high < cg.max)) return cg.high;
  if (cg.max != 0) return cg.max / 10 * 9;
  return 0;
}

}  // namespace ebb::proc
