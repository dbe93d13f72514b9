// The memory policy of `ebb run`, as pure functions: what each worker's
// limits are, and, given the fleet's figures, which workers to trim and which
// to recycle. No processes, clocks or I/O here, so every rule has a unit test.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ebb::supervisor {

struct Policy {
  uint64_t soft_limit = 0;      // bytes per worker; above: trim (0: none)
  uint64_t hard_limit = 0;      // bytes per worker; above after a trim: recycle (0: none)
  uint64_t total_limit = 0;     // bytes for the whole fleet (0: none)
  double max_age_s = 0;         // recycle workers older than this (0: never)
  double jitter = 0.1;          // limits and age are drawn per worker in [(1 - jitter) x, x]
  unsigned max_recycling = 1;   // workers stopping at once, at most
  double trim_cooldown_s = 10;  // a worker is not trimmed again sooner than this
};

// One worker's limits, drawn when it starts.
struct Limits {
  uint64_t soft = 0;
  uint64_t hard = 0;
  double max_age_s = 0;
};

// Draws a worker's limits. u1..u3 are uniform in [0, 1). Jitter only lowers
// a limit: the configured value is a promise never to go above.
Limits draw_limits(const Policy& p, double u1, double u2, double u3);

struct WorkerView {
  int id = 0;
  uint64_t mem = 0;  // the chosen metric (rss, pss or uss) of the worker's process tree
  double age_s = 0;
  double since_trim_s = 1e18;  // since the last trim ebb asked for
  bool can_trim = false;       // runs libebb with a telemetry page
  bool stopping = false;       // already being recycled
  // The master of --children: trimmed like a worker, and recycled (a warm
  // restart) only above its own hard limit, never for the fleet budget or
  // its age.
  bool master = false;
  // Trimmed, never recycled now: a master whose restart is under way or was
  // just tried (master_restart.cc), or a child of a master ebb has no
  // graceful stop signal for, once its refusal is logged (children.cc). A
  // held worker takes no --max-recycling place from the others.
  bool hold = false;
  Limits limits;
};

enum class Action { kTrim, kRecycle };

struct Decision {
  int id = 0;
  Action action = Action::kTrim;
  std::string reason;  // "soft limit", "hard limit", "max age", "fleet budget"
};

struct FleetView {
  std::vector<WorkerView> workers;
  uint64_t total = 0;  // the fleet's memory (workers, and a master if any)
  double since_fleet_trim_s = 1e18;
};

// What to do now. Trims come first and never wait; recycles are ordered by
// urgency (hard limit, then fleet budget, then age) and capped so that no
// more than max_recycling workers are stopping at once.
std::vector<Decision> decide(const Policy& p, const FleetView& fleet);

}  // namespace ebb::supervisor
