// The supervisor's policy (src/supervisor/policy.h): limits, trims, recycles.
#include <gtest/gtest.h>

#include "policy.h"

using namespace ebb::supervisor;

namespace {

constexpr uint64_t MiB = 1 << 20;

WorkerView worker(int id, uint64_t mem, bool can_trim = true) {
  WorkerView w;
  w.id = id;
  w.mem = mem;
  w.can_trim = can_trim;
  w.limits = {100 * MiB, 200 * MiB, 0};
  return w;
}

Policy policy() {
  Policy p;
  p.soft_limit = 100 * MiB;
  p.hard_limit = 200 * MiB;
  p.max_recycling = 1;
  p.trim_cooldown_s = 10;
  return p;
}

}  // namespace

TEST(Policy, JitterOnlyLowersLimitsAndStaysWithinItsShare) {
  Policy p = policy();
  p.max_age_s = 3600;
  p.jitter = 0.2;
  Limits top = draw_limits(p, 0, 0, 0);
  EXPECT_EQ(top.soft, 100 * MiB);
  EXPECT_EQ(top.hard, 200 * MiB);
  EXPECT_DOUBLE_EQ(top.max_age_s, 3600);
  Limits low = draw_limits(p, 0.999999, 0.999999, 0.999999);
  EXPECT_GE(low.hard, 160 * MiB);
  EXPECT_LT(low.hard, 161 * MiB);
  EXPECT_GE(low.max_age_s, 2880);
  Limits mid = draw_limits(p, 0.5, 0.25, 0.75);
  EXPECT_EQ(mid.soft, 90 * MiB);
  EXPECT_EQ(mid.hard, 190 * MiB);
  EXPECT_DOUBLE_EQ(mid.max_age_s, 3600 * 0.85);
  p.hard_limit = 0;
  EXPECT_EQ(draw_limits(p, 0.5, 0.5, 0.5).hard, 0u);  // no limit stays no limit
}

TEST(Policy, NothingToDoUnderTheLimits) {
  FleetView f;
  f.workers = {worker(1, 50 * MiB), worker(2, 99 * MiB)};
  EXPECT_TRUE(decide(policy(), f).empty());
}

TEST(Policy, SoftLimitTrimsOncePerCooldown) {
  FleetView f;
  f.workers = {worker(1, 150 * MiB)};
  auto d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].action, Action::kTrim);
  EXPECT_EQ(d[0].reason, "soft limit");
  f.workers[0].since_trim_s = 3;
  EXPECT_TRUE(decide(policy(), f).empty());
  f.workers[0].can_trim = false;  // no libebb: nothing to ask
  f.workers[0].since_trim_s = 1e9;
  EXPECT_TRUE(decide(policy(), f).empty());
}

TEST(Policy, HardLimitTrimsFirstThenRecycles) {
  FleetView f;
  f.workers = {worker(1, 250 * MiB)};
  auto d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].action, Action::kTrim);
  EXPECT_EQ(d[0].reason, "hard limit");
  f.workers[0].since_trim_s = 1;  // still above right after a trim
  d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].action, Action::kRecycle);
  EXPECT_EQ(d[0].reason, "hard limit");
  f.workers[0].can_trim = false;  // without libebb there is nothing to try first
  f.workers[0].since_trim_s = 1e9;
  d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].action, Action::kRecycle);
}

TEST(Policy, NeverMoreThanMaxRecyclingStoppingAtOnce) {
  Policy p = policy();
  p.max_recycling = 2;
  FleetView f;
  for (int i = 1; i <= 5; i++) f.workers.push_back(worker(i, (250 + static_cast<uint64_t>(i)) * MiB, false));
  auto d = decide(p, f);
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].id, 5);  // the largest first
  EXPECT_EQ(d[1].id, 4);
  f.workers[4].stopping = true;  // one is already stopping: room for one more
  d = decide(p, f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 4);
  f.workers[3].stopping = true;
  EXPECT_TRUE(decide(p, f).empty());
}

TEST(Policy, MaxAgeRecyclesTheOldestFirst) {
  Policy p = policy();
  FleetView f;
  f.workers = {worker(1, 10 * MiB), worker(2, 10 * MiB), worker(3, 10 * MiB)};
  for (auto& w : f.workers) w.limits.max_age_s = 60;
  f.workers[0].age_s = 70;
  f.workers[1].age_s = 90;
  f.workers[2].age_s = 30;
  auto d = decide(p, f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 2);
  EXPECT_EQ(d[0].reason, "max age");
}

TEST(Policy, HardLimitComesBeforeAge) {
  Policy p = policy();
  FleetView f;
  f.workers = {worker(1, 10 * MiB), worker(2, 300 * MiB, false)};
  f.workers[0].limits.max_age_s = 60;
  f.workers[0].age_s = 1000;
  auto d = decide(p, f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 2);
}

TEST(Policy, FleetBudgetTrimsAllThenRecyclesTheLargest) {
  Policy p = policy();
  p.soft_limit = p.hard_limit = 0;
  p.total_limit = 250 * MiB;
  FleetView f;
  f.workers = {worker(1, 80 * MiB), worker(2, 120 * MiB), worker(3, 90 * MiB)};
  for (auto& w : f.workers) w.limits = {};
  f.total = 290 * MiB;
  auto d = decide(p, f);
  ASSERT_EQ(d.size(), 3u);
  for (auto& x : d) {
    EXPECT_EQ(x.action, Action::kTrim);
    EXPECT_EQ(x.reason, "fleet budget");
  }
  f.since_fleet_trim_s = 2;  // trimmed a moment ago and still over
  d = decide(p, f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].action, Action::kRecycle);
  EXPECT_EQ(d[0].id, 2);
  EXPECT_EQ(d[0].reason, "fleet budget");
  f.total = 240 * MiB;  // back under: nothing
  EXPECT_TRUE(decide(p, f).empty());
}

TEST(Policy, StoppingWorkersAreLeftAlone) {
  FleetView f;
  f.workers = {worker(1, 500 * MiB)};
  f.workers[0].stopping = true;
  EXPECT_TRUE(decide(policy(), f).empty());
}

TEST(Policy, TheMasterIsTrimmedAndRecycledOnlyAboveItsOwnHardLimit) {
  Policy p = policy();
  p.total_limit = 300 * MiB;
  p.max_age_s = 10;
  FleetView f;
  WorkerView m = worker(1, 150 * MiB);
  m.master = true;
  m.limits = {100 * MiB, 0, 0};  // no master hard limit
  m.age_s = 1000;
  f.workers = {m, worker(2, 50 * MiB)};
  f.total = 400 * MiB;
  f.since_fleet_trim_s = 2;  // over the budget, trimmed a moment ago
  f.workers[0].since_trim_s = 2;
  auto d = decide(p, f);
  // The budget recycles the largest *worker*, never the master; its age does not count.
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 2);
  EXPECT_EQ(d[0].reason, "fleet budget");
  // Above its soft limit, it is trimmed like a worker.
  f.total = 200 * MiB;
  f.workers[0].since_trim_s = 1e18;
  d = decide(p, f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 1);
  EXPECT_EQ(d[0].action, Action::kTrim);
  // Above its own hard limit after a trim: recycled (a warm restart).
  f.workers[0].limits.hard = 120 * MiB;
  f.workers[0].since_trim_s = 2;
  d = decide(p, f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 1);
  EXPECT_EQ(d[0].action, Action::kRecycle);
  EXPECT_EQ(d[0].reason, "hard limit");
}

TEST(Policy, TheMastersRestartDoesNotWaitForRecyclingWorkers) {
  FleetView f;
  WorkerView m = worker(1, 150 * MiB);
  m.master = true;
  m.limits = {0, 120 * MiB, 0};
  m.since_trim_s = 2;  // trimmed a moment ago, still above
  WorkerView busy = worker(2, 50 * MiB);
  busy.stopping = true;  // max_recycling (1) is taken by a worker
  WorkerView big = worker(3, 500 * MiB);
  big.limits = {0, 120 * MiB, 0};
  big.since_trim_s = 2;
  f.workers = {m, busy, big};
  auto d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);  // the master, not the worker that has to wait
  EXPECT_EQ(d[0].id, 1);
  EXPECT_EQ(d[0].action, Action::kRecycle);
  // A master being restarted takes no worker's place either.
  f.workers[0].stopping = true;
  f.workers[1].stopping = false;
  d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 3);
}

TEST(Policy, AHeldWorkerTakesNoRecyclingPlace) {
  // Two children over the hard limit, trimmed a moment ago; the larger one's
  // recycle was refused (held): the other gets the one place.
  FleetView f;
  f.workers = {worker(1, 300 * MiB), worker(2, 250 * MiB)};
  for (auto& w : f.workers) w.since_trim_s = 2;
  f.workers[0].hold = true;
  auto d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 2);
  EXPECT_EQ(d[0].action, Action::kRecycle);
  // The same for the fleet budget and for age.
  Policy p = policy();
  p.total_limit = 400 * MiB;
  f.total = 550 * MiB;
  f.since_fleet_trim_s = 2;
  f.workers[1].hold = true;
  EXPECT_TRUE(decide(p, f).empty());
  f.workers[0].hold = false;
  f.workers[0].mem = 150 * MiB;  // below the hard limit: only the budget and age apply
  f.workers[1].mem = 160 * MiB;
  d = decide(p, f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].id, 1);  // the budget's largest not held
  f.workers[1].age_s = 1000;
  f.workers[1].limits.max_age_s = 10;
  f.total = 0;
  EXPECT_TRUE(decide(p, f).empty());  // a held worker's age is not acted on either
}

TEST(Policy, AHeldMasterIsTrimmedButNotRestarted) {
  FleetView f;
  WorkerView m = worker(1, 150 * MiB);
  m.master = true;
  m.hold = true;  // its restart is under way, or failed a moment ago
  m.limits = {0, 120 * MiB, 0};
  f.workers = {m};
  auto d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].action, Action::kTrim);
  f.workers[0].since_trim_s = 2;  // trimmed a moment ago, still above: no restart while held
  EXPECT_TRUE(decide(policy(), f).empty());
  f.workers[0].hold = false;
  d = decide(policy(), f);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].action, Action::kRecycle);
}
