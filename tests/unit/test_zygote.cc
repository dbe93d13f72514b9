// How `ebb run --preload` splits a worker command for the fork server
// (src/supervisor/zygote.h), and the page-frame comparison behind
// `ebb ps --fleet`'s ZYGOTE column (src/proc/pagemap.h).
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "gtest/gtest.h"
#include "pagemap.h"
#include "zygote.h"

using ebb::supervisor::python_command;
using ebb::supervisor::PythonCommand;
using ebb::supervisor::split_python_argv;
using Argv = std::vector<std::string>;

namespace {

PythonCommand split(const Argv& argv) {
  std::string why;
  auto c = split_python_argv(argv, &why);
  EXPECT_TRUE(c.has_value()) << why;
  return c.value_or(PythonCommand{});
}

std::string refused(const Argv& argv) {
  std::string why;
  auto c = python_command(argv, &why);
  EXPECT_FALSE(c.has_value());
  return why;
}

}  // namespace

TEST(PythonCommand, ScriptModuleAndCode) {
  auto s = split({"python3", "app.py", "-m", "x"});
  EXPECT_EQ(s.interpreter, Argv({"python3"}));
  EXPECT_EQ(s.run, Argv({"app.py", "-m", "x"}));  // options after the script are the script's

  auto m = split({"/usr/bin/python3", "-u", "-X", "dev", "-m", "celery", "-A", "app", "worker"});
  EXPECT_EQ(m.interpreter, Argv({"/usr/bin/python3", "-u", "-X", "dev"}));
  EXPECT_EQ(m.run, Argv({"-m", "celery", "-A", "app", "worker"}));

  auto c = split({"python3.11", "-c", "print(1)", "a"});
  EXPECT_EQ(c.run, Argv({"-c", "print(1)", "a"}));
}

TEST(PythonCommand, GroupedAndAttachedFlags) {
  auto g = split({"python3", "-uBmcelery", "worker"});
  EXPECT_EQ(g.interpreter, Argv({"python3", "-uB"}));
  EXPECT_EQ(g.run, Argv({"-m", "celery", "worker"}));

  auto w = split({"python3", "-Werror", "-OO", "app.py"});
  EXPECT_EQ(w.interpreter, Argv({"python3", "-Werror", "-OO"}));
  EXPECT_EQ(w.run, Argv({"app.py"}));

  auto dd = split({"python3", "-E", "--", "app.py", "x"});
  EXPECT_EQ(dd.run, Argv({"app.py", "x"}));
}

TEST(PythonCommand, WhatIsNotAWorkerIsRefused) {
  EXPECT_NE(refused({"python3"}).find("runs no program"), std::string::npos);
  EXPECT_NE(refused({"python3", "-"}).find("stdin"), std::string::npos);
  EXPECT_NE(refused({"python3", "-m"}).find("-m needs an argument"), std::string::npos);
  EXPECT_NE(refused({"python3", "-i", "app.py"}).find("-i"), std::string::npos);
  EXPECT_NE(refused({"python3", "--version"}).find("--version"), std::string::npos);
  EXPECT_NE(refused({"/bin/sleep", "1"}).find("/bin/sleep is not a Python program"), std::string::npos);
  EXPECT_NE(refused({"pythonista"}).find("not a Python program"), std::string::npos);
}

TEST(PythonCommand, ScriptWithAPythonShebang) {
  char dir[] = "/tmp/ebb-zygote-test-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  std::string direct = std::string(dir) + "/worker", env = std::string(dir) + "/tool",
              shell = std::string(dir) + "/run.sh";
  std::ofstream(direct) << "#!/usr/bin/python3 -u\nprint(1)\n";
  std::ofstream(env) << "#!/usr/bin/env python3\nprint(1)\n";
  std::ofstream(shell) << "#!/bin/sh\necho 1\n";
  for (const auto& p : {direct, env, shell}) chmod(p.c_str(), 0755);

  std::string why;
  auto d = python_command({direct, "--queue", "high"}, &why);
  ASSERT_TRUE(d.has_value()) << why;
  EXPECT_EQ(d->interpreter, Argv({"/usr/bin/python3", "-u"}));  // the #! line's flags are kept
  EXPECT_EQ(d->run, Argv({direct, "--queue", "high"}));

  auto e = python_command({env}, &why);
  ASSERT_TRUE(e.has_value()) << why;
  EXPECT_EQ(e->interpreter, Argv({"python3"}));
  EXPECT_EQ(e->run, Argv({env}));

  EXPECT_NE(refused({shell}).find("not a Python program"), std::string::npos);
  for (const auto& p : {direct, env, shell}) unlink(p.c_str());
  rmdir(dir);
}

// A forked child shares the parent's pages until it writes to them; the
// frames in common are what the ZYGOTE column counts.
TEST(Pagemap, CountsThePagesAChildStillShares) {
  if (geteuid() != 0) GTEST_SKIP() << "page frame numbers need root";
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE)), n = 256;
  auto* mem = static_cast<char*>(mmap(nullptr, n * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(mem, MAP_FAILED);
  memset(mem, 1, n * page);
  int go[2], done[2];
  ASSERT_EQ(pipe(go), 0);
  ASSERT_EQ(pipe(done), 0);
  pid_t child = fork();
  if (child == 0) {
    for (size_t i = 0; i < n / 2; i++) mem[i * page] = 2;  // copies half of them
    char c = 0;
    if (write(done[1], &c, 1) != 1 || read(go[0], &c, 1) != 1) _exit(1);
    _exit(0);
  }
  char c;
  ASSERT_EQ(read(done[0], &c, 1), 1);
  auto parent = ebb::proc::resident_frames(getpid());
  ASSERT_TRUE(parent.has_value());
  auto shared = ebb::proc::bytes_in_frames(child, *parent);
  ASSERT_TRUE(shared.has_value());
  // The untouched half is shared (libraries, stacks and the rest add a little).
  EXPECT_GE(*shared, n / 2 * page);
  // The copied half is not: the child's mapping holds n/2 pages of its own.
  auto own = ebb::proc::bytes_in_frames(getpid(), *parent);
  ASSERT_TRUE(own.has_value());
  EXPECT_LE(*shared + n / 2 * page, *own + page * 8);
  ASSERT_EQ(write(go[1], &c, 1), 1);
  int status = 0;
  waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  munmap(mem, n * page);
}
