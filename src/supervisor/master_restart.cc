// --children with --master-hard-limit: the master's own warm restart.
//
// A master holds memory of its own (Celery's prefetched messages, several
// copies each; gunicorn's arbiter rarely much, unless its hooks keep some),
// and glibc keeps it after the messages are gone. Trimming it at the soft limit comes first
// (memory.cc); above its hard limit after a trim, ebb restarts it without
// losing work:
// - gunicorn: SIGUSR2 makes the old master fork a new one that inherits the
//   listening sockets; once the new one's workers run, the old one gets
//   SIGTERM and its workers finish their requests. No connection is refused
//   at any moment. The new master becomes ebb's (a subreaper, it is adopted
//   when the old one exits).
// - any other master but Celery: SIGTERM, its own graceful stop, then a
//   fresh start once it has exited. Celery is refused (master.cc: its warm
//   shutdown can hang with a job half written to its pool).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>

#include "fleet.h"

namespace ebb::supervisor {

namespace {

constexpr double kHandoverTimeoutS = 60;  // for the new gunicorn master to run its workers

std::string master_label(pid_t pid) { return "master [pid " + std::to_string(pid) + "]"; }

}  // namespace

void Fleet::restart_master(Worker& w, const std::string& reason) {
  counters_.recycles[reason]++;
  counters_.master_restarts++;
  nlohmann::json f = {{"pid", w.pid}, {"reason", reason}, {"metric", metric_name(o_.metric)},
                      {"mem", w.mem}, {"master", true},   {"age_s", now_s() - w.started}};
  std::string text = master_label(w.pid) + " restart (" + reason + "): " + metric_name(o_.metric) + " " + mib(w.mem);
  if (reason == "hard limit") text += " > " + mib(w.limits.hard);
  if (o_.master.handover) {
    size_t children = 0;
    for (const auto& [pid, x] : workers_)
      if (pid != w.pid && !x.stopping) children++;
    handover_ = {w.pid, 0, now_s(), children};
    log_.event("restart", text + "; SIGUSR2: a new master takes over once its workers run", f);
    kill(w.pid, SIGUSR2);
    return;
  }
  log_.event("restart", text + "; SIGTERM, then a new master, grace " + seconds(o_.grace_s), f);
  stop(w, reason);
}

// Each tick of a gunicorn handover: find the new master (the old one's child
// with children of its own), and once it runs as many workers as the old
// one did, stop the old one.
void Fleet::continue_handover(const proc::ChildMap& children) {
  if (handover_.from == 0) return;
  auto old = workers_.find(handover_.from);
  if (old == workers_.end()) return;
  if (handover_.to == 0) {
    auto range = children.equal_range(handover_.from);
    for (auto it = range.first; it != range.second; ++it)
      if (!workers_.count(it->second) && children.count(it->second) > 0) handover_.to = it->second;
  }
  if (shutting_down_) {
    stop_unknown_children(handover_.from, children);
    return;
  }
  if (old->second.stopping) return;  // SIGTERM sent: its exit completes the handover
  size_t running = handover_.to > 0 ? children.count(handover_.to) : 0;
  if (handover_.to > 0 && running >= std::max<size_t>(1, handover_.workers)) {
    log_.event("restart",
               "new " + master_label(handover_.to) + " runs " + std::to_string(running) +
                   " worker(s); SIGTERM to old " + master_label(handover_.from),
               {{"pid", handover_.from}, {"successor", handover_.to}, {"workers", running}});
    stop(old->second, "hard limit");
    return;
  }
  if (now_s() - handover_.started > kHandoverTimeoutS) {
    log_.event("error",
               master_label(handover_.from) + ": no new master ran its workers within " + seconds(kHandoverTimeoutS) +
                   " of SIGUSR2; the old one stays" + (handover_.to > 0 ? ", SIGTERM to the new one" : ""),
               {{"pid", handover_.from}, {"successor", handover_.to}});
    if (handover_.to > 0) kill(handover_.to, SIGTERM);
    handover_ = {};
    master_restart_after_ = now_s() + kHandoverTimeoutS;
  }
}

// ebb stops during a handover: the new master must not outlive it. Every
// child of `parent` ebb does not know is stopped and waited for: the new
// master, or one that may become it (a worker the old master has just
// forked is stopped by its master anyway).
void Fleet::stop_unknown_children(pid_t parent, const proc::ChildMap& children) {
  auto range = children.equal_range(parent);
  for (auto it = range.first; it != range.second; ++it) {
    if (workers_.count(it->second)) continue;
    Worker& n = add_worker(slots_.empty() ? 0 : slots_[0].id, it->second);
    stop(n, "shutdown");
  }
}

// The old master of a handover exited. True when the new one took its
// place (nothing to restart).
bool Fleet::handed_over(pid_t old_master, int status) {
  pid_t to = handover_.to;
  handover_ = {};
  auto slot = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.pid == old_master; });
  if (to <= 0 && shutting_down_) {
    // It exited before ebb saw its successor, now ebb's child (a subreaper).
    stop_unknown_children(getpid(), proc::children_by_parent());
    return false;
  }
  if (to <= 0 || kill(to, 0) != 0 || slot == slots_.end()) return false;  // restarted the plain way
  std::string how = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                      : "was killed by " + signame(WTERMSIG(status));
  log_.event("exit", "old " + master_label(old_master) + " " + how + "; new " + master_label(to) + " took over",
             {{"pid", old_master}, {"successor", to}, {"reason", "hard limit"}});
  workers_.erase(old_master);
  slot->pid = to;
  if (workers_.count(to)) return true;  // already being stopped (ebb stops)
  Worker& w = add_worker(slot->id, to);
  set_master_limits(w);
  return true;
}

}  // namespace ebb::supervisor
