// The telemetry page reader against pages written here: valid, torn,
// garbage, foreign, stale; and the clean-up of pages of dead processes.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "page.h"
#include "proc.h"
#include "reader.h"

namespace {

using namespace ebb::telemetry;

// A page's worth of bytes (Page itself holds atomics and cannot be copied).
struct PageBuf {
  alignas(Page) unsigned char bytes[kFileBytes] = {};
  Page* operator->() { return reinterpret_cast<Page*>(bytes); }
};

class PageFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ebb-reader-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    self_ = ebb::proc::read_process(getpid());
  }
  void TearDown() override {
    std::string cmd = "rm -rf " + dir_;
    ASSERT_EQ(system(cmd.c_str()), 0);
  }

  // A well-formed page for this test process.
  PageBuf valid() const {
    PageBuf p;
    p->magic = kMagic;
    p->version = kVersion;
    p->size = sizeof(Page);
    p->pid = getpid();
    p->uid = geteuid();
    p->start_ticks = self_.start_ticks;
    strcpy(p->allocator, "ebb test");
    p->seq.store(2);
    p->stats.version = EBB_STATS_VERSION;
    p->stats.size = sizeof(ebb_stats_t);
    p->stats.live_bytes = 12345;
    return p;
  }

  std::string write(const PageBuf& p, mode_t mode = 0600, size_t bytes = kFileBytes) {
    std::string path = dir_ + "/" + std::to_string(getpid());
    unlink(path.c_str());
    int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, mode);
    EXPECT_GE(fd, 0);
    fchmod(fd, mode);
    EXPECT_EQ(::write(fd, p.bytes, bytes), static_cast<ssize_t>(bytes));
    close(fd);
    return path;
  }

  ReadResult read(const std::string& path) { return read_page(path, getpid(), self_.start_ticks, geteuid()); }

  std::string dir_;
  ebb::proc::Process self_;
};

TEST_F(PageFiles, ValidPageIsRead) {
  ReadResult r = read(write(valid()));
  ASSERT_EQ(r.status, Status::kOk) << r.message;
  EXPECT_EQ(r.snap.stats.live_bytes, 12345u);
  EXPECT_EQ(r.snap.allocator, "ebb test");
}

TEST_F(PageFiles, MissingPageIsNoPage) { EXPECT_EQ(read(dir_ + "/nope").status, Status::kNoPage); }

TEST_F(PageFiles, TornWriteIsDetectedNotTrusted) {
  PageBuf p = valid();
  p->seq.store(7);  // a writer stopped half-way (odd) and never finished
  ReadResult r = read(write(p));
  EXPECT_EQ(r.status, Status::kBusy);
  EXPECT_NE(r.message.find("torn"), std::string::npos);
}

TEST_F(PageFiles, GarbageIsRejectedWithAReason) {
  PageBuf p = valid();
  p->magic = 0x4141414141414141ull;
  ReadResult r = read(write(p));
  EXPECT_EQ(r.status, Status::kInvalid);
  EXPECT_NE(r.message.find("magic"), std::string::npos);

  PageBuf noise;
  for (size_t i = 0; i < kFileBytes; i++) noise.bytes[i] = static_cast<unsigned char>(i * 131 + 7);
  EXPECT_EQ(read(write(noise)).status, Status::kInvalid);

  PageBuf v = valid();
  v->version = 99;
  EXPECT_EQ(read(write(v)).status, Status::kInvalid);

  PageBuf s = valid();
  s->stats.size = 100000;
  EXPECT_EQ(read(write(s)).status, Status::kInvalid);
}

TEST_F(PageFiles, ShortFileIsRejected) { EXPECT_EQ(read(write(valid(), 0600, 64)).status, Status::kInvalid); }

TEST_F(PageFiles, PageOfAnotherProcessOrUserIsRejected) {
  PageBuf p = valid();
  p->pid = getpid() + 1;
  EXPECT_EQ(read(write(p)).status, Status::kInvalid);
  PageBuf u = valid();
  u->uid = geteuid() + 1;
  EXPECT_EQ(read(write(u)).status, Status::kInvalid);
}

TEST_F(PageFiles, ReusedPidIsStale) {
  PageBuf p = valid();
  p->start_ticks = self_.start_ticks + 1000;
  EXPECT_EQ(read(write(p)).status, Status::kStale);
}

TEST_F(PageFiles, OpenPermissionsAreRejected) {
  ReadResult r = read(write(valid(), 0644));
  EXPECT_EQ(r.status, Status::kInvalid);
  EXPECT_NE(r.message.find("0600"), std::string::npos);
}

TEST_F(PageFiles, WrongOwnerIsRejected) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to give the file away";
  std::string path = write(valid());
  ASSERT_EQ(chown(path.c_str(), 65534, 65534), 0);
  ReadResult r = read(path);
  EXPECT_EQ(r.status, Status::kInvalid);
  EXPECT_NE(r.message.find("another user"), std::string::npos);
}

TEST_F(PageFiles, SymlinkIsNotFollowed) {
  std::string target = write(valid());
  std::string link = dir_ + "/link";
  ASSERT_EQ(symlink(target.c_str(), link.c_str()), 0);
  EXPECT_NE(read(link).status, Status::kOk);
}

TEST_F(PageFiles, ScanRemovesPagesOfDeadProcessesAndKeepsLiveOnes) {
  write(valid());
  pid_t child = fork();
  if (child == 0) _exit(0);
  int status;
  waitpid(child, &status, 0);  // child is dead: its PID is free
  std::string dead = dir_ + "/" + std::to_string(child);
  int fd = open(dead.c_str(), O_WRONLY | O_CREAT, 0600);
  ASSERT_GE(fd, 0);
  close(fd);
  auto live = scan_dir(dir_);
  EXPECT_EQ(live, std::vector<pid_t>{getpid()});
  EXPECT_NE(access(dead.c_str(), F_OK), 0) << "stale page left behind";
}

}  // namespace

// A live libebb process (CPython with libebb preloaded and telemetry on)
// takes the soft-limit command: above the limit it purges at once, although
// its purge delay is ten minutes, and the page then shows the limit.
TEST_F(PageFiles, SoftLimitCommandPurgesALiveProcess) {
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  pid_t child = fork();
  if (child == 0) {
    dup2(ready[1], STDOUT_FILENO);
    setenv("LD_PRELOAD", EBB_LIB_PATH, 1);
    setenv("PYTHONMALLOC", "malloc", 1);
    setenv("EBB_TELEMETRY", "1", 1);
    setenv("EBB_TELEMETRY_DIR", dir_.c_str(), 1);
    setenv("EBB_PURGE_DELAY_MS", "600000", 1);
    setenv("EBB_EMPTY_DELAY_MS", "600000", 1);
    execl("/usr/bin/python3", "python3", "-c",
          "import time\n"
          "x = [str(i) * 30 for i in range(600000)]\n"
          "del x\n"
          "print('ready', flush=True)\n"
          "time.sleep(30)\n",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  close(ready[1]);
  char buf[16] = {};
  ASSERT_GT(::read(ready[0], buf, sizeof buf - 1), 0) << "python3 with libebb did not start";
  close(ready[0]);

  const uint64_t limit = 40ull << 20;
  Ack ack = send(child, kCmdSetSoftLimit, limit, 5000);
  ReadResult after = read_pid(child);
  kill(child, SIGKILL);
  waitpid(child, nullptr, 0);
  ASSERT_EQ(ack.status, Status::kOk) << ack.message;
  EXPECT_GT(ack.rss_before, limit);  // ~60 MB of freed strings still resident
  EXPECT_GT(ack.released, 10ull << 20);
  EXPECT_LT(ack.rss_after, ack.rss_before - (10ull << 20));
  ASSERT_EQ(after.status, Status::kOk) << after.message;
  EXPECT_EQ(after.snap.soft_limit, limit);
}
