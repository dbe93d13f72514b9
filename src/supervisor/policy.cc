#include "policy.h"

#include <algorithm>

namespace ebb::supervisor {

namespace {

uint64_t lower(uint64_t limit, double jitter, double u) {
  if (limit == 0) return 0;
  return static_cast<uint64_t>(static_cast<double>(limit) * (1.0 - jitter * u));
}

}  // namespace

Limits draw_limits(const Policy& p, double u1, double u2, double u3) {
  Limits l;
  l.soft = lower(p.soft_limit, p.jitter, u1);
  l.hard = lower(p.hard_limit, p.jitter, u2);
  l.max_age_s = p.max_age_s * (1.0 - p.jitter * u3);
  return l;
}

std::vector<Decision> decide(const Policy& p, const FleetView& fleet) {
  std::vector<Decision> trims;
  struct Candidate {
    int rank;  // 0 hard limit, 1 fleet budget, 2 age
    bool master;
    uint64_t mem;
    double age_s;
    Decision d;
  };
  std::vector<Candidate> recycle;
  unsigned stopping = 0;
  for (const WorkerView& w : fleet.workers) {
    if (w.stopping) {
      if (!w.master) stopping++;  // the master's restart takes no worker's place
      continue;
    }
    const bool may_trim = w.can_trim && w.since_trim_s >= p.trim_cooldown_s;
    if (w.limits.hard != 0 && w.mem > w.limits.hard) {
      // Above the hard limit: trimming may be enough, so try that first; if
      // the worker is still above after a recent trim, recycle it.
      if (may_trim)
        trims.push_back({w.id, Action::kTrim, "hard limit"});
      else if (!w.hold)
        recycle.push_back({0, w.master, w.mem, w.age_s, {w.id, Action::kRecycle, "hard limit"}});
    } else if (w.limits.soft != 0 && w.mem > w.limits.soft && may_trim) {
      trims.push_back({w.id, Action::kTrim, "soft limit"});
    }
    if (!w.master && !w.hold && w.limits.max_age_s > 0 && w.age_s > w.limits.max_age_s)
      recycle.push_back({2, false, w.mem, w.age_s, {w.id, Action::kRecycle, "max age"}});
  }

  if (p.total_limit != 0 && fleet.total > p.total_limit) {
    // Over the fleet budget: trim everyone who can be trimmed (once per
    // cooldown); if that was done recently, recycle the largest worker.
    bool trimmed_any = false;
    if (fleet.since_fleet_trim_s >= p.trim_cooldown_s) {
      for (const WorkerView& w : fleet.workers) {
        if (w.stopping || !w.can_trim) continue;
        trimmed_any = true;
        bool already = std::any_of(trims.begin(), trims.end(), [&](const Decision& d) { return d.id == w.id; });
        if (!already) trims.push_back({w.id, Action::kTrim, "fleet budget"});
      }
    }
    if (!trimmed_any) {
      const WorkerView* largest = nullptr;
      for (const WorkerView& w : fleet.workers)
        if (!w.stopping && !w.master && !w.hold && (largest == nullptr || w.mem > largest->mem)) largest = &w;
      if (largest != nullptr)
        recycle.push_back({1, false, largest->mem, largest->age_s, {largest->id, Action::kRecycle, "fleet budget"}});
    }
  }

  // Most urgent first; within a rank the largest (or, for age, the oldest).
  std::stable_sort(recycle.begin(), recycle.end(), [](const Candidate& a, const Candidate& b) {
    if (a.rank != b.rank) return a.rank < b.rank;
    if (a.rank == 2) return a.age_s > b.age_s;
    return a.mem > b.mem;
  });
  std::vector<Decision> out = std::move(trims);
  unsigned room = p.max_recycling > stopping ? p.max_recycling - stopping : 0;
  std::vector<int> taken;
  for (const Candidate& c : recycle) {
    if (c.master) {  // restarted whatever its workers do (max_recycling counts workers)
      out.push_back(c.d);
      continue;
    }
    if (room == 0) continue;
    if (std::find(taken.begin(), taken.end(), c.d.id) != taken.end()) continue;
    taken.push_back(c.d.id);
    out.push_back(c.d);
    room--;
  }
  return out;
}

}  // namespace ebb::supervisor
