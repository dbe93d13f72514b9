// The memory limits of the cgroup ebb runs in (cgroup v2, with a v1
// fallback), its OOM events and its memory pressure. Under Kubernetes or a
// systemd unit these are the container's budget: `ebb run` takes its default
// fleet budget from them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace ebb::proc {

struct Cgroup {
  std::string dir;       // the cgroup's directory, e.g. /sys/fs/cgroup/system.slice/x.service
  bool v2 = true;        // false: a v1 memory controller directory
  uint64_t max = 0;      // memory.max (v1: memory.limit_in_bytes); 0 = no limit
  uint64_t high = 0;     // memory.high; 0 = no limit (v1 has none)
  uint64_t current = 0;  // memory.current (v1: memory.usage_in_bytes)
};

// Counters of memory.events (v2); v1 has only oom_kill (memory.oom_control).
struct MemoryEvents {
  uint64_t high = 0;      // times usage went over memory.high (reclaim, throttling)
  uint64_t max = 0;       // times usage hit memory.max
  uint64_t oom = 0;       // allocations that failed at memory.max
  uint64_t oom_kill = 0;  // processes the OOM killer killed in the cgroup
};

// The cgroup directory for the text of /proc/self/cgroup: the v1 line of
// the memory controller under mount/memory when there is one (hybrid hosts
// list an empty v2 line too), else the v2 line "0::/path" under mount
// (default /sys/fs/cgroup). nullopt when neither is there.
std::optional<Cgroup> locate(const std::string& proc_cgroup_text, const std::string& mount = "/sys/fs/cgroup");

// The cgroup of this process: $EBB_CGROUP_DIR when set (a directory holding
// memory.max and friends; tests point it at a fake tree), else from
// /proc/self/cgroup. Limits are read; nullopt when no cgroup is found.
std::optional<Cgroup> self();

// Re-reads max, high and current of cg.dir. False when the files are gone.
bool read_limits(Cgroup& cg);

std::optional<MemoryEvents> read_events(const Cgroup& cg);

// "some avg10" of memory.pressure: the share of the last 10 s in which some
// task of the cgroup waited for memory, in percent. nullopt without PSI.
std::optional<double> read_pressure_avg10(const Cgroup& cg);

// The fleet budget a cgroup implies: memory.high if set, else 90% of
// memory.max (room for the kernel to reclaim before the OOM killer acts);
// 0 when the cgroup has no limit.
uint64_t default_budget(const Cgroup& cg);

// Parses a limit file's content: a byte count, or "max" (and v1's huge
// "unlimited" values) for no limit, which is returned as 0.
std::optional<uint64_t> parse_limit(const std::string& text);

}  // namespace ebb::proc
