// --children: recognising the master and its children's graceful stop signal (src/supervisor/master.h).
#include <gtest/gtest.h>
#include <signal.h>

#include "master.h"

using namespace ebb::supervisor;

TEST(Master, GunicornInEveryFormStopsItsWorkersWithTerm) {
  for (const auto& cmd : std::vector<std::vector<std::string>>{{"gunicorn", "-w", "4", "app:app"},
                                                               {"/usr/bin/gunicorn", "app:app"},
                                                               {"/usr/bin/python3", "-m", "gunicorn", "app:app"},
                                                               {"python3", "-mgunicorn", "app:app"},
                                                               {"python3.11", "-u", "/usr/bin/gunicorn", "app:app"},
                                                               {"env", "FOO=1", "gunicorn", "app:app"}}) {
    Master m = recognize_master(cmd);
    EXPECT_EQ(m.kind, MasterKind::kGunicorn) << cmd[0] << " " << cmd[1];
    EXPECT_EQ(m.child_stop_signal, SIGTERM);
    EXPECT_TRUE(m.warning.empty());
  }
}

TEST(Master, GunicornHandsOverToANewMasterUnlessStartedWithDashM) {
  EXPECT_TRUE(recognize_master({"gunicorn", "app:app"}).handover);
  EXPECT_TRUE(recognize_master({"python3", "-u", "/usr/bin/gunicorn", "app:app"}).handover);
  EXPECT_TRUE(recognize_master({"env", "A=-m", "gunicorn", "app:app"}).handover);
  for (const auto& cmd : std::vector<std::vector<std::string>>{{"python3", "-m", "gunicorn", "app:app"},
                                                               {"python3", "-u", "-mgunicorn", "app:app"}}) {
    Master m = recognize_master(cmd);
    EXPECT_FALSE(m.handover);
    EXPECT_NE(m.handover_note.find("`gunicorn ...`"), std::string::npos);
  }
  EXPECT_FALSE(recognize_master({"python3", "-m", "ebb.celery", "-A", "app", "worker"}).handover);
}

TEST(Master, OnlyEbbCeleryMastersAreRestartedForTheirMemoryByADrain) {
  Master ebb_celery = recognize_master({"python3", "-m", "ebb.celery", "-A", "app", "worker"});
  EXPECT_EQ(ebb_celery.restart_refused, "");
  EXPECT_EQ(ebb_celery.drain_signal, SIGUSR2);
  EXPECT_NE(recognize_master({"celery", "-A", "app", "worker"}).restart_refused, "");
  EXPECT_EQ(recognize_master({"celery", "-A", "app", "worker"}).drain_signal, 0);
  EXPECT_EQ(recognize_master({"gunicorn", "app:app"}).drain_signal, 0);
  EXPECT_EQ(recognize_master({"gunicorn", "app:app"}).restart_refused, "");
  EXPECT_EQ(recognize_master({"./server"}).restart_refused, "");
}

TEST(Master, EbbCeleryMastersWithoutAFixedPreforkPoolAreNotRestarted) {
  using V = std::vector<std::string>;
  const V base{"python3", "-m", "ebb.celery", "-A", "app", "worker"};
  auto with = [&](V extra) {
    V c = base;
    c.insert(c.end(), extra.begin(), extra.end());
    return recognize_master(c).restart_refused;
  };
  EXPECT_EQ(with({"--pool", "prefork", "--concurrency", "4"}), "");
  EXPECT_NE(with({"--pool", "solo"}).find("solo pool has none"), std::string::npos);
  EXPECT_NE(with({"-P", "threads"}).find("threads pool"), std::string::npos);
  EXPECT_NE(with({"--pool=gevent"}).find("gevent pool"), std::string::npos);
  EXPECT_NE(with({"--autoscale", "8,2"}).find("--autoscale"), std::string::npos);
  EXPECT_NE(with({"--autoscale=8,2"}).find("--autoscale"), std::string::npos);
}

TEST(Master, ThreadedGunicornWorkersCarryAWarning) {
  EXPECT_FALSE(recognize_master({"gunicorn", "--worker-class", "gthread", "app:app"}).warning.empty());
  EXPECT_FALSE(recognize_master({"gunicorn", "-k", "gthread", "app:app"}).warning.empty());
  EXPECT_FALSE(recognize_master({"gunicorn", "--threads", "4", "app:app"}).warning.empty());
  EXPECT_FALSE(recognize_master({"gunicorn", "--threads=4", "app:app"}).warning.empty());
  EXPECT_TRUE(recognize_master({"gunicorn", "--threads", "1", "app:app"}).warning.empty());
  EXPECT_TRUE(
      recognize_master({"gunicorn", "-k", "ebb.gthread.ThreadWorker", "--threads", "4", "app:app"}).warning.empty());
}

TEST(Master, EbbCeleryRecyclesPoolProcessesWithInt) {
  Master m = recognize_master({"/usr/bin/python3", "-m", "ebb.celery", "-A", "app", "worker", "--pool", "prefork"});
  EXPECT_EQ(m.kind, MasterKind::kEbbCelery);
  EXPECT_EQ(m.child_stop_signal, SIGINT);
}

TEST(Master, PlainCeleryHasNoGracefulStopForItsChildren) {
  for (const auto& cmd : std::vector<std::vector<std::string>>{{"celery", "-A", "app", "worker"},
                                                               {"python3", "-m", "celery", "-A", "app", "worker"}}) {
    Master m = recognize_master(cmd);
    EXPECT_EQ(m.kind, MasterKind::kCelery);
    EXPECT_EQ(m.child_stop_signal, 0);
    EXPECT_NE(m.note.find("python3 -m ebb.celery"), std::string::npos);
  }
}

TEST(Master, AnythingElseIsUnknown) {
  for (const auto& cmd : std::vector<std::vector<std::string>>{
           {"python3", "server.py"}, {"python3", "-c", "import gunicorn"}, {"uwsgi", "--ini", "x.ini"}, {"env"}}) {
    Master m = recognize_master(cmd);
    EXPECT_EQ(m.kind, MasterKind::kUnknown) << cmd[0];
    EXPECT_EQ(m.child_stop_signal, 0);
  }
  EXPECT_EQ(recognize_master({"python3", "server.py"}).name, "server.py");
}
