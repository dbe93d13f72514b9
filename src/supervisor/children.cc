// --children: the workers are the master's children. The master (slot 1)
// forks and replaces them; ebb finds them, samples them and stops them.
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "fleet.h"

namespace ebb::supervisor {

void Fleet::discover_children(const proc::ChildMap& children) {
  // Children mode: the workers are the master's children; the master (slot
  // 1) starts and replaces them, ebb only watches and stops them.
  pid_t master = slots_.empty() ? 0 : slots_[0].pid;
  auto range = master > 0 ? children.equal_range(master) : std::make_pair(children.end(), children.end());
  for (auto it = range.first; it != range.second; ++it) {
    pid_t pid = it->second;
    if (workers_.count(pid)) continue;
    // During a handover, not yet: one of them is the new master, which
    // shows as such only once it has exec'd (master_restart.cc).
    if (handover_.from == master && !handover_.drain) continue;  // ebb started a new Celery master itself
    const Worker& w = add_worker(next_child_id_++, pid);
    log_.event("adopt", fmt_worker(w.id, pid) + " found (a child of the master)", {{"worker", w.id}, {"pid", pid}});
  }
  // Children that left without being reaped by us (the master reaped them).
  for (auto it = workers_.begin(); it != workers_.end();) {
    bool slot_pid = std::any_of(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.pid == it->first; });
    if (!slot_pid && kill(it->first, 0) != 0 && errno == ESRCH) {
      log_.event("exit", fmt_worker(it->second.id, it->first) + " exited",
                 {{"worker", it->second.id}, {"pid", it->first}});
      it = workers_.erase(it);
    } else {
      ++it;
    }
  }
}

// The master exited (crashed, or stopped at shutdown) and left children
// behind: as a subreaper, ebb is now their parent. Nobody else will stop
// them, and a shutdown would wait for them forever: each gets the stop
// signal and the grace, as in a recycle. Only ebb's own children are
// signalled, so a pid the dead master had already reaped and the kernel
// gave to another process is never hit.
void Fleet::stop_orphaned_children(const std::string& reason) {
  auto mine = proc::children_by_parent();
  auto range = mine.equal_range(getpid());
  for (auto c = range.first; c != range.second; ++c) {
    pid_t pid = c->second;
    if (pid == handover_.to || std::any_of(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.pid == pid; }))
      continue;
    auto it = workers_.find(pid);
    Worker& w = it != workers_.end() ? it->second : add_worker(next_child_id_++, pid);  // forked as it died
    if (w.stopping) continue;
    log_.event(
        "orphan",
        fmt_worker(w.id, pid) + " outlived its master: " + signame(o_.stop_signal) + ", grace " + seconds(o_.grace_s),
        {{"worker", w.id}, {"pid", pid}, {"reason", reason}});
    stop(w, reason);
  }
}

// The policy would recycle a child, but no signal is known that lets it
// finish its work first (master.h): stopping it could lose what it is doing.
// Said once per child; trims go on.
void Fleet::refuse_recycle(Worker& w, const std::string& reason) {
  if (w.recycle_refused) return;
  w.recycle_refused = true;
  counters_.recycles_refused++;
  log_.event("refuse",
             fmt_worker(w.id, w.pid) + " not recycled (" + reason + "): " + metric_name(o_.metric) + " " + mib(w.mem) +
                 "; " + o_.master.name + ": " + o_.master.note,
             {{"worker", w.id}, {"pid", w.pid}, {"reason", reason}, {"mem", w.mem}, {"master", o_.master.name}});
}

}  // namespace ebb::supervisor
