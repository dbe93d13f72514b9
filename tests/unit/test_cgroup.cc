// cgroup readers (src/proc/cgroup.h) against fake trees.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "cgroup.h"

using namespace ebb::proc;
namespace fs = std::filesystem;

namespace {

class FakeCgroup : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ebb-cgroup-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    unsetenv("EBB_CGROUP_DIR");
    fs::remove_all(dir_);
  }
  void write(const std::string& name, const std::string& text) { std::ofstream(dir_ + "/" + name) << text; }
  std::string dir_;
};

}  // namespace

TEST(Cgroup, ParsesLimits) {
  EXPECT_EQ(parse_limit("max\n"), 0u);
  EXPECT_EQ(parse_limit("1073741824\n"), 1073741824u);
  EXPECT_EQ(parse_limit("9223372036854771712\n"), 0u);  // cgroup v1's "unlimited"
  EXPECT_FALSE(parse_limit("garbage"));
  EXPECT_FALSE(parse_limit(""));
}

TEST(Cgroup, LocatesTheMemoryController) {
  auto v2 = locate("0::/system.slice/app.service\n");
  ASSERT_TRUE(v2);
  EXPECT_TRUE(v2->v2);
  EXPECT_EQ(v2->dir, "/sys/fs/cgroup/system.slice/app.service");
  auto root = locate("0::/\n");
  ASSERT_TRUE(root);
  EXPECT_EQ(root->dir, "/sys/fs/cgroup");
  auto v1 = locate("12:cpu,cpuacct:/x\n4:memory:/kubepods/pod1/c1\n", "/mnt");
  ASSERT_TRUE(v1);
  EXPECT_FALSE(v1->v2);
  EXPECT_EQ(v1->dir, "/mnt/memory/kubepods/pod1/c1");
  EXPECT_FALSE(locate("12:cpu:/x\n"));
  // Hybrid: v1 controllers and an empty v2 hierarchy; the memory line wins.
  auto hybrid = locate("4:memory:/process_api/abc\n1:cpu:/\n0::/\n");
  ASSERT_TRUE(hybrid);
  EXPECT_FALSE(hybrid->v2);
  EXPECT_EQ(hybrid->dir, "/sys/fs/cgroup/memory/process_api/abc");
}

TEST_F(FakeCgroup, BudgetIsMemoryHighElseNinetyPercentOfMax) {
  write("memory.max", "1073741824\n");
  write("memory.high", "max\n");
  write("memory.current", "12345\n");
  setenv("EBB_CGROUP_DIR", dir_.c_str(), 1);
  auto cg = self();
  ASSERT_TRUE(cg);
  EXPECT_TRUE(cg->v2);
  EXPECT_EQ(cg->max, 1073741824u);
  EXPECT_EQ(cg->high, 0u);
  EXPECT_EQ(cg->current, 12345u);
  EXPECT_EQ(default_budget(*cg), 1073741824u / 10 * 9);
  write("memory.high", "536870912\n");
  ASSERT_TRUE(read_limits(*cg));
  EXPECT_EQ(default_budget(*cg), 536870912u);
  write("memory.max", "max\n");
  write("memory.high", "max\n");
  ASSERT_TRUE(read_limits(*cg));
  EXPECT_EQ(default_budget(*cg), 0u);  // no limit, no budget
}

TEST_F(FakeCgroup, V1LimitInBytes) {
  write("memory.limit_in_bytes", "2147483648\n");
  write("memory.usage_in_bytes", "1000\n");
  write("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n");
  setenv("EBB_CGROUP_DIR", dir_.c_str(), 1);
  auto cg = self();
  ASSERT_TRUE(cg);
  EXPECT_FALSE(cg->v2);
  EXPECT_EQ(default_budget(*cg), 2147483648u / 10 * 9);
  auto e = read_events(*cg);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->oom_kill, 4u);
}

TEST_F(FakeCgroup, EventsAndPressure) {
  write("memory.max", "max\n");
  write("memory.events", "low 0\nhigh 7\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\n");
  write("memory.pressure",
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=1.00 avg60=0 avg300=0 total=1\n");
  setenv("EBB_CGROUP_DIR", dir_.c_str(), 1);
  auto cg = self();
  ASSERT_TRUE(cg);
  auto e = read_events(*cg);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->high, 7u);
  EXPECT_EQ(e->max, 3u);
  EXPECT_EQ(e->oom, 2u);
  EXPECT_EQ(e->oom_kill, 1u);
  auto p = read_pressure_avg10(*cg);
  ASSERT_TRUE(p);
  EXPECT_DOUBLE_EQ(*p, 12.5);
}

TEST(Cgroup, TheRealOneWhenPresent) {
  // Where /proc/self/cgroup names a mounted hierarchy, this process's limits
  // can be read from it; elsewhere there is nothing to check.
  std::ifstream in("/proc/self/cgroup");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto where = locate(text);
  if (!where || !fs::exists(where->dir + (where->v2 ? "/memory.current" : "/memory.usage_in_bytes")))
    GTEST_SKIP() << "no memory cgroup with figures here (e.g. the v2 root)";
  auto cg = self();
  ASSERT_TRUE(cg);
  EXPECT_EQ(cg->dir, where->dir);
  EXPECT_GT(cg->current, 0u);  // this process is in it and uses memory
}
