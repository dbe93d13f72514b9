#include "pagemap.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>

namespace ebb::proc {

namespace {

constexpr uint64_t kPresent = 1ull << 63;
constexpr uint64_t kFileOrShared = 1ull << 61;  // a file page or shared anonymous memory
constexpr uint64_t kPfnMask = (1ull << 55) - 1;

// Calls f(pfn) for each resident private anonymous page of `pid` (the heap,
// stacks, anonymous mappings: what a fork shares copy-on-write; not library
// or other file pages, which every process mapping the file shares anyway);
// false if pagemap cannot be read or gives no frame numbers (not privileged).
template <typename F>
bool for_each_frame(pid_t pid, const std::string& proc_root, F&& f) {
  std::string base = proc_root + "/" + std::to_string(pid);
  FILE* maps = fopen((base + "/maps").c_str(), "re");
  if (maps == nullptr) return false;
  int pm = open((base + "/pagemap").c_str(), O_RDONLY | O_CLOEXEC);
  if (pm < 0) {
    fclose(maps);
    return false;
  }
  long page = sysconf(_SC_PAGESIZE);
  bool any_present = false, any_frame = false;
  char line[4096];  // a longer line (a very long path) is read in parts: only the first has an address
  uint64_t entries[512];
  while (fgets(line, sizeof line, maps) != nullptr) {
    uint64_t start = 0, end = 0;
    char perms[8] = {0};
    if (sscanf(line, "%" SCNx64 "-%" SCNx64 " %7s", &start, &end, perms) != 3) continue;
    if (strstr(line, "[vsyscall]") != nullptr) continue;  // not in pagemap's range on every kernel
    if (strncmp(perms, "---", 3) == 0) continue;          // a reservation: nothing is mapped there
    for (uint64_t vpn = start / static_cast<uint64_t>(page); vpn < end / static_cast<uint64_t>(page);) {
      uint64_t n = std::min<uint64_t>(512, end / static_cast<uint64_t>(page) - vpn);
      ssize_t got = pread(pm, entries, n * sizeof(uint64_t), static_cast<off_t>(vpn * sizeof(uint64_t)));
      if (got <= 0) break;
      n = static_cast<uint64_t>(got) / sizeof(uint64_t);
      for (uint64_t i = 0; i < n; i++) {
        if (!(entries[i] & kPresent)) continue;
        any_present = true;
        if (entries[i] & kFileOrShared) continue;
        uint64_t pfn = entries[i] & kPfnMask;
        if (pfn == 0) continue;
        any_frame = true;
        f(pfn);
      }
      vpn += n;
    }
  }
  close(pm);
  fclose(maps);
  return any_frame || !any_present;
}

}  // namespace

std::optional<std::vector<uint64_t>> resident_frames(pid_t pid, const std::string& proc_root) {
  std::vector<uint64_t> out;
  if (!for_each_frame(pid, proc_root, [&](uint64_t pfn) { out.push_back(pfn); })) return std::nullopt;
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

std::optional<uint64_t> bytes_in_frames(pid_t pid, const std::vector<uint64_t>& frames, const std::string& proc_root) {
  uint64_t pages = 0;
  if (!for_each_frame(pid, proc_root,
                      [&](uint64_t pfn) { pages += std::binary_search(frames.begin(), frames.end(), pfn) ? 1 : 0; }))
    return std::nullopt;
  return pages * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace ebb::proc
