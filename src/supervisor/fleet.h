// The fleet of `ebb run` (supervisor.h), as one class whose parts live in
// files named after them:
//   fleet.cc        the loop: signals, shutdown, grace, the status endpoints
//   workers.cc      starting, stopping, recycling and reaping workers
//   memory.cc       sampling memory, trimming, the policy's decisions, the cgroup
//   children.cc     --children: the workers of a master ebb did not fork
//   master_restart.cc  --children: the master's own warm restart
//   fork_server.cc  --preload: the fork server's control
#pragma once

#include <sys/types.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cgroup.h"
#include "log.h"
#include "proc.h"
#include "status.h"
#include "supervisor.h"

namespace ebb::supervisor {

constexpr double kNever = -1e18;
constexpr double kForkTimeoutS = 10;  // a fork server that takes longer to fork is stuck

struct Worker {
  int id = 0;  // slot number (1..N); in children mode, a running count
  pid_t pid = 0;
  double started = 0;
  Limits limits;
  uint64_t mem = 0;
  bool can_trim = false;
  bool soft_limit_sent = false;
  double last_trim = kNever;
  uint64_t trims = 0;
  bool stopping = false;
  double stop_sent = 0;
  bool killed = false;
  std::string stop_reason;
  bool recycle_refused = false;  // --children with no graceful stop signal: said once
  bool old_master = false;       // a master draining after its successor started (master_restart.cc)
  bool new_master = false;       // started by a master restart, has not taken over (yet, or ever)
};

struct Slot {
  int id = 0;
  pid_t pid = 0;             // its current worker, 0 when none
  double restart_at = -1;    // start a worker at this time; -1: not scheduled
  unsigned quick_exits = 0;  // consecutive exits sooner than min_uptime
  bool retired = false;      // removed by TTOU: do not restart
  bool waiting = false;      // for the fork server to be ready
  bool forking = false;      // a fork was asked of the fork server; its pid is to come
  double fork_deadline = 0;  // ... by then (pushed back each time the fork server answers)
  double fork_asked_at = 0;
  std::string fork_why;  // the reason to log when it comes
};

uint64_t process_memory(pid_t pid, Metric m);
bool successor_of(pid_t pid, pid_t old_master);  // gunicorn's new master of a USR2 (master_restart.cc)

class Fleet {
 public:
  explicit Fleet(const Options& o) : o_(o), log_(o.log_format), rng_(std::random_device{}()) {}

  int run();

 private:
  // ---- processes
  pid_t spawn(int id);
  std::vector<std::string> worker_env(int id) const;  // what worker `id` gets on top of the fleet's
  Worker& add_worker(int id, pid_t pid);
  void start_slot(Slot& s, const char* why);
  void log_start(const Slot& s, const std::string& why);
  void forked(int slot_id, pid_t pid);
  void stop(Worker& w, const std::string& reason);
  int stop_signal_of(const Worker& w) const;
  void reap();
  void on_exit(pid_t pid, int status);

  // ---- policy
  void tick();
  void sample(const proc::ChildMap& children);
  void discover_children(const proc::ChildMap& children);
  void refuse_recycle(Worker& w, const std::string& reason);
  bool is_master(pid_t pid) const { return o_.children && !slots_.empty() && slots_[0].pid == pid && pid > 0; }
  // The master, an old one still draining, or the one that is to replace it
  // (master_restart.cc): sampled on its own, never recycled as a worker.
  bool is_any_master(const Worker& w) const {
    return is_master(w.pid) || w.old_master || (handover_.drain && w.pid == handover_.to && w.pid > 0);
  }
  bool old_master_draining() const {
    return std::any_of(workers_.begin(), workers_.end(), [](const auto& kv) { return kv.second.old_master; });
  }
  void set_master_limits(Worker& w) const;
  std::string label(int id, pid_t pid) const;  // "worker 3 [pid 1234]", or "master [pid 1233]"
  std::string label(const Worker& w) const;    // by its role: "new master [pid 1240]", "old master [pid 1233]"…

  // ---- the master's warm restart (master_restart.cc)
  void restart_master(Worker& w, const std::string& reason);
  void continue_handover(const proc::ChildMap& children);
  bool handed_over(pid_t old_master, int status);
  void handover_failed(const std::string& why, const proc::ChildMap& children);
  void continue_drain(const proc::ChildMap& children);
  void stop_new_master(pid_t pid, const std::string& reason);
  bool drain_handed_over(pid_t old_master);
  void stop_stray(pid_t pid, const std::string& reason);
  void stop_orphaned_children(const std::string& reason);  // children.cc
  // gunicorn's USR2: the old master forks a new one, which takes over once
  // its workers have run for --min-uptime; `from` is stopped then, and `to`
  // becomes the slot's.
  // A master with a drain signal (ebb.celery): ebb starts `to` itself; once
  // its pool has run for --min-uptime, `from` gets the drain signal.
  struct Handover {
    pid_t from = 0;
    pid_t to = 0;
    bool drain = false;
    double started = 0;
    std::vector<pid_t> before;    // the old master's children at SIGUSR2: none of them is the new master
    std::vector<pid_t> new_ones;  // the new master's workers, as last seen
    double ready_since = -1;      // ... unchanged and as many as the old one's since then
  } handover_;
  double master_restart_after_ = 0;  // a failed restart is not tried again before then
  unsigned handover_failures_ = 0;   // in a row: each doubles the wait before the next try
  void trim(Worker& w, const std::string& reason);
  void recycle(Worker& w, const std::string& reason);
  void watch_cgroup();

  // ---- signals and shutdown
  void on_signal(int sig);
  void begin_shutdown(const char* why);
  void enforce_grace();
  void kill_now(pid_t pid);
  double next_wakeup() const;
  Limits draw();
  unsigned live_slots() const;
  unsigned stopping_count() const;
  void continue_reload();

  // ---- the fork server of --preload
  bool start_zygote(std::unique_ptr<Zygote>& z, const char* why);
  void on_zygote_readable(std::unique_ptr<Zygote>& z);
  void on_zygote_message(std::unique_ptr<Zygote>& z, const nlohmann::json& msg);
  bool on_zygote_exit(pid_t pid, int status);
  void zygote_failed(const std::string& why);
  void check_zygotes();
  void take_over();  // a reload's fork server is ready: it replaces the running one
  // Forks are served one at a time: a request queued behind others has as
  // long as they take, so deadlines move with the fork server's progress.
  double latest_fork_deadline() const {
    double t = 0;
    for (const Slot& s : slots_)
      if (s.forking) t = std::max(t, s.fork_deadline);
    return t;
  }
  void fork_progress() {
    for (Slot& s : slots_)
      if (s.forking) s.fork_deadline = std::max(s.fork_deadline, now_s() + kForkTimeoutS);
  }
  bool kill_all_ = false;  // a second TERM/INT: no more graceful stops
  bool any_forking() const {
    return std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.forking; });
  }
  bool zygote_alive() const { return zygote_ && zygote_->pid() > 0; }
  // --preload with a status socket: <socket>.imports, the prefix of the
  // fork server's import tree and of its workers' (fork_server.cc); else "".
  std::string imports_base() const;
  void remove_import_trees() const;

  const Options& o_;
  Log log_;
  std::mt19937_64 rng_;
  std::vector<Slot> slots_;
  std::map<pid_t, Worker> workers_;
  uint64_t total_ = 0;
  double last_fleet_trim_ = kNever;
  double next_tick_ = 0;
  bool shutting_down_ = false;
  double shutdown_at_ = 0;
  bool unhealthy_ = false;
  bool zygote_fatal_ = false;  // stopped because the fork server failed
  int next_child_id_ = 1;
  std::optional<proc::Cgroup> cgroup_;
  proc::MemoryEvents events_{};
  bool pressure_high_ = false;
  std::vector<pid_t> pending_reload_;  // SIGHUP: workers still to recycle
  FleetStatus counters_;               // the totals part of the status
  double started_at_ = 0;

  bool use_zygote_ = false;              // --preload, and no fallback yet
  std::unique_ptr<Zygote> zygote_;       // forks the workers
  std::unique_ptr<Zygote> next_zygote_;  // SIGHUP: importing the new code; replaces zygote_ when ready
  double zygote_started_ = 0, next_zygote_started_ = 0;
  bool zygote_was_ready_ = false;  // it served once: a death is restarted, not fatal
  unsigned zygote_quick_exits_ = 0;
  double zygote_restart_at_ = -1;
  double zygote_closed_at_ = -1;        // shutting down: socket closed at this time
  std::vector<pid_t> retired_zygotes_;  // replaced by a reload, not reaped yet
  // Exits of children we did not know yet: a worker forked by the fork server
  // can exit before its pid reaches us (the newest few are kept).
  struct UnknownExit {
    pid_t pid;
    int status;
    double when;
  };
  std::vector<UnknownExit> unknown_exits_;
  uint64_t zygote_mem_ = 0;

  FleetStatus snapshot() const;
  bool open_endpoints(int* status_fd, int* metrics_fd);
};

}  // namespace ebb::supervisor
