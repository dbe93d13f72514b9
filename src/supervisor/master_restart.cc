// --children with --master-hard-limit: the master's own warm restart.
//
// A master holds memory of its own (Celery's prefetched messages, several
// copies each; gunicorn's arbiter rarely much, unless its hooks keep some),
// and glibc keeps it after the messages are gone. Trimming it at the soft limit comes first
// (memory.cc); above its hard limit after a trim, ebb restarts it without
// losing work:
// - gunicorn: SIGUSR2 makes the old master fork a new one that inherits the
//   listening sockets; once the new one's workers have run for --min-uptime,
//   the old one gets SIGTERM and its workers finish their requests. No
//   connection is refused at any moment. The new master becomes ebb's (a
//   subreaper, it is adopted when the old one exits).
// - Celery through ebb.celery: ebb starts a new master, and once its pool
//   has run for --min-uptime, SIGUSR2 makes the old one stop consuming, run
//   what it already took and shut down warmly with nothing in flight (a
//   plain warm shutdown can hang, master.cc). Plain `celery` is refused.
// - any other master: SIGTERM, its own graceful stop, then a fresh start
//   once it has exited.
//
// gunicorn's new master is a child of the old one and shares its process
// group, so nothing here signals the old master's group (fleet.cc: kill_now).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "fleet.h"

namespace ebb::supervisor {

namespace {

constexpr double kMaxRetryS = 600;  // the longest wait after failed handovers in a row

std::string master_label(pid_t pid) { return "master [pid " + std::to_string(pid) + "]"; }

std::vector<pid_t> children_of(pid_t parent, const proc::ChildMap& children) {
  std::vector<pid_t> v;
  auto range = children.equal_range(parent);
  for (auto it = range.first; it != range.second; ++it) v.push_back(it->second);
  std::sort(v.begin(), v.end());
  return v;
}

bool contains(const std::vector<pid_t>& v, pid_t pid) { return std::find(v.begin(), v.end(), pid) != v.end(); }

}  // namespace

// gunicorn's re-exec starts the new master with GUNICORN_PID=<old master>
// in its environment; a worker the old master forks, or a helper a worker
// runs, has no such entry. Its workers inherit it, but they are its children.
// Seen between its exec and its first setproctitle() only (which writes the
// title over the environment's memory); after that, its title tells
// (titled_like). ebb keeps the pid it found.
bool successor_of(pid_t pid, pid_t old_master) {
  FILE* f = fopen(("/proc/" + std::to_string(pid) + "/environ").c_str(), "re");
  if (f == nullptr) return false;
  const std::string want = "GUNICORN_PID=" + std::to_string(old_master);
  std::string entry;
  bool found = false;
  for (int c; !found && (c = fgetc(f)) != EOF;) {
    if (c != 0) {
      entry.push_back(static_cast<char>(c));
      continue;
    }
    found = entry == want;
    entry.clear();
  }
  fclose(f);
  return found || entry == want;
}

namespace {

// The process title: /proc/PID/cmdline without the NULs setproctitle()
// leaves after it (as many as the environment it wrote over was long).
std::string title(pid_t pid) {
  std::string s;
  if (FILE* f = fopen(("/proc/" + std::to_string(pid) + "/cmdline").c_str(), "re")) {
    for (int c; (c = fgetc(f)) != EOF;) s.push_back(static_cast<char>(c));
    fclose(f);
  }
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// Without setproctitle, the new master's command line is the old one's.
// With it, gunicorn titles the new master as the old one plus ".2" ("gunicorn:
// master [app]" becomes "gunicorn: master [app.2]", arbiter.py start()),
// where its workers read "gunicorn: worker [app]".
bool titled_like(pid_t pid, pid_t old_master) {
  const std::string a = title(pid), b = title(old_master);
  if (a.empty() || b.empty()) return false;
  if (a == b) return true;
  return b.back() == ']' && a == b.substr(0, b.size() - 1) + ".2]";
}

}  // namespace

void Fleet::restart_master(Worker& w, const std::string& reason) {
  counters_.master_restarts++;
  nlohmann::json f = {{"pid", w.pid}, {"reason", reason}, {"metric", metric_name(o_.metric)},
                      {"mem", w.mem}, {"master", true},   {"age_s", now_s() - w.started}};
  std::string text = master_label(w.pid) + " restart (" + reason + "): " + metric_name(o_.metric) + " " + mib(w.mem);
  if (reason == "hard limit") text += " > " + mib(w.limits.hard);
  if (o_.master.handover) {
    handover_ = {};
    handover_.from = w.pid;
    handover_.started = now_s();
    handover_.before = children_of(w.pid, proc::children_by_parent());
    log_.event("restart", text + "; SIGUSR2: a new master takes over once its workers run", f);
    kill(w.pid, SIGUSR2);
    return;
  }
  if (o_.master.drain_signal != 0) {
    // The old master keeps consuming until the new one runs its pool: a new
    // master that fails (a broken deploy) leaves the fleet as it was.
    pid_t to = spawn(slots_[0].id);
    if (to < 0) {
      master_restart_after_ = now_s() + o_.handover_timeout_s;
      return;
    }
    workers_[to].new_master = true;
    handover_ = {};
    handover_.from = w.pid;
    handover_.to = to;
    handover_.drain = true;
    handover_.started = now_s();
    log_.event("restart",
               text + "; new " + master_label(to) + " started; once its pool has run for " + seconds(o_.min_uptime_s) +
                   ", " + signame(o_.master.drain_signal) + " to the old one: it runs the tasks it took, then exits",
               f);
    log_.event("start", master_label(to) + " started (replaces the master)",
               {{"worker", slots_[0].id}, {"pid", to}, {"reason", "replaces the master"}});
    return;
  }
  log_.event("restart", text + "; SIGTERM, then a new master, grace " + seconds(o_.grace_s), f);
  stop(w, reason);
}

// Each tick of a gunicorn handover: find the new master (a child the old
// one forked after SIGUSR2, with children of its own); once it has run as
// many workers as the old one had, the same ones for --min-uptime (forked is
// not booted: a worker that fails to boot exits, and so does its master),
// stop the old one.
void Fleet::continue_handover(const proc::ChildMap& children) {
  Handover& h = handover_;
  if (h.from == 0) return;
  if (h.drain) {
    continue_drain(children);
    return;
  }
  auto old = workers_.find(h.from);
  if (old == workers_.end()) return;
  std::vector<pid_t> ours = children_of(h.from, children);
  if (h.to > 0 && !contains(ours, h.to)) {  // it exited, and the old master reaped it
    if (!shutting_down_ && !old->second.stopping) {
      handover_failed("the new " + master_label(h.to) + " exited before it took over", children);
      return;
    }
    h.to = 0;
  }
  if (h.to == 0)
    for (pid_t c : ours)
      if (!contains(h.before, c) && !workers_.count(c) &&
          (successor_of(c, h.from) || (children.count(c) > 0 && titled_like(c, h.from))))
        h.to = c;
  if (shutting_down_) {
    // ebb stops during a handover: the new master must not outlive it.
    if (h.to > 0) stop_stray(h.to, "shutdown");
    return;
  }
  if (old->second.stopping) return;  // SIGTERM sent: its exit completes the handover
  std::vector<pid_t> workers = h.to > 0 ? children_of(h.to, children) : std::vector<pid_t>{};
  double now = now_s();
  bool enough = workers.size() >= std::max<size_t>(1, h.before.size());
  if (!enough)
    h.ready_since = -1;
  else if (h.ready_since < 0 || workers != h.new_ones)
    h.ready_since = now;  // a worker was replaced: it may be failing to boot
  h.new_ones = workers;
  if (h.ready_since >= 0 && now - h.ready_since >= o_.min_uptime_s) {
    handover_failures_ = 0;
    log_.event("restart",
               "new " + master_label(h.to) + " runs " + std::to_string(workers.size()) + " worker(s) for " +
                   seconds(now - h.ready_since) + "; SIGTERM to old " + master_label(h.from),
               {{"pid", h.from}, {"successor", h.to}, {"workers", workers.size()}});
    stop(old->second, "hard limit");
    return;
  }
  if (now - h.started > o_.handover_timeout_s + o_.min_uptime_s)
    handover_failed("no new master ran its workers for " + seconds(o_.min_uptime_s) + " within " +
                        seconds(o_.handover_timeout_s + o_.min_uptime_s) + " of SIGUSR2",
                    children);
}

// The handover did not happen: the old master stays. What it forked since
// SIGUSR2 and ebb does not know is the new master or may become it: stopped
// (SIGTERM is graceful for a gunicorn master and its workers alike).
void Fleet::handover_failed(const std::string& why, const proc::ChildMap& children) {
  Handover h = handover_;
  handover_ = {};
  handover_failures_++;
  double wait = std::min(kMaxRetryS, o_.handover_timeout_s * std::ldexp(1.0, static_cast<int>(handover_failures_) - 1));
  master_restart_after_ = now_s() + wait;
  log_.event(
      "error",
      master_label(h.from) + ": " + why + "; the old one stays, next try in " + seconds(wait) + " at the earliest",
      {{"pid", h.from}, {"successor", h.to}, {"failures", handover_failures_}});
  if (h.drain) {
    stop_new_master(h.to, "failed handover");
    return;
  }
  for (pid_t c : children_of(h.from, children))
    if (!contains(h.before, c) && (c == h.to || successor_of(c, h.from))) stop_stray(c, "failed handover");
}

// Each tick of a drain handover: the new master ebb started runs as many
// pool processes as the old one, the same ones for --min-uptime; then it
// becomes the slot's, and the old one gets the drain signal.
void Fleet::continue_drain(const proc::ChildMap& children) {
  Handover& h = handover_;
  auto old = workers_.find(h.from);
  if (old == workers_.end()) return;
  auto to = workers_.find(h.to);
  if (shutting_down_) {
    stop_new_master(h.to, "shutdown");  // not the slot's: begin_shutdown left it
    return;
  }
  if (to == workers_.end()) {
    handover_failed("the new master exited before its pool ran", children);
    return;
  }
  if (to->second.stopping) return;
  if (h.before.empty()) h.before = children_of(h.from, children);
  std::vector<pid_t> pool = children_of(h.to, children);
  double now = now_s();
  if (pool.size() < std::max<size_t>(1, h.before.size()))
    h.ready_since = -1;
  else if (h.ready_since < 0 || pool != h.new_ones)
    h.ready_since = now;
  h.new_ones = pool;
  if (h.ready_since >= 0 && now - h.ready_since >= o_.min_uptime_s) {
    handover_failures_ = 0;
    log_.event("restart",
               "new " + master_label(h.to) + " runs " + std::to_string(pool.size()) + " pool process(es) for " +
                   seconds(now - h.ready_since) + "; " + signame(o_.master.drain_signal) + " to old " +
                   master_label(h.from) + ": it runs the tasks it took, then exits",
               {{"pid", h.from}, {"successor", h.to}, {"workers", pool.size()}});
    Worker& w = old->second;
    w.stopping = true;
    w.old_master = true;
    w.stop_sent = now;
    w.stop_reason = "hard limit";
    kill(h.from, o_.master.drain_signal);
    slots_[0].pid = h.to;  // the old master's exit restarts nothing
    to->second.new_master = false;
    handover_ = {};
    return;
  }
  if (now - h.started > o_.handover_timeout_s + o_.min_uptime_s)
    handover_failed("the new master did not run its pool for " + seconds(o_.min_uptime_s) + " within " +
                        seconds(o_.handover_timeout_s + o_.min_uptime_s),
                    children);
}

// A new master that will not take over drains like an old one: it may have
// taken tasks already (marked old_master, so it keeps the drain signal once
// the handover is forgotten, and holds further restarts until it is gone).
void Fleet::stop_new_master(pid_t pid, const std::string& reason) {
  auto it = workers_.find(pid);
  if (pid <= 0 || it == workers_.end() || it->second.stopping) return;
  it->second.old_master = true;
  stop(it->second, reason);
}

// The old master exited before a drain handover completed (it died, or was
// killed): the new one takes its place if it runs.
bool Fleet::drain_handed_over(pid_t old_master) {
  pid_t to = handover_.to;
  handover_ = {};
  if (shutting_down_) stop_new_master(to, "shutdown");  // before the next tick could
  if (shutting_down_ || to <= 0 || !workers_.count(to) || workers_[to].stopping) return false;
  log_.event("exit",
             "old " + master_label(old_master) + " exited during the handover; new " + master_label(to) + " took over",
             {{"pid", old_master}, {"successor", to}, {"reason", "hard limit"}});
  workers_.erase(old_master);
  slots_[0].pid = to;
  workers_[to].new_master = false;
  return true;
}

// A process ebb did not start, and must not leave behind: followed and
// stopped like a worker (its exit is logged, the grace applies).
void Fleet::stop_stray(pid_t pid, const std::string& reason) {
  if (workers_.count(pid)) return;
  Worker& w = add_worker(next_child_id_++, pid);
  w.stopping = true;
  w.stop_sent = now_s();
  w.stop_reason = reason;
  kill(pid, SIGTERM);
}

// The old master of a handover exited. True when the new one took its
// place (nothing to restart). A subreaper, ebb is now the parent of what
// the old master left: the new master, seen or not yet (the old one may
// have been killed, or have died by itself). Other orphans are left alone.
bool Fleet::handed_over(pid_t old_master, int status) {
  if (handover_.drain) return drain_handed_over(old_master);
  pid_t to = handover_.to;
  handover_ = {};
  auto mine = proc::children_by_parent();
  std::vector<pid_t> orphans;  // new masters the old one started (one, normally)
  for (pid_t c : children_of(getpid(), mine))
    if (!workers_.count(c) && (c == to || successor_of(c, old_master))) orphans.push_back(c);
  if (!contains(orphans, to)) to = 0;
  if (to == 0)
    for (pid_t c : orphans)
      if (to == 0 || mine.count(c) > 0) to = c;
  auto slot = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.pid == old_master; });
  for (pid_t c : orphans)
    if (c != to || shutting_down_ || slot == slots_.end()) stop_stray(c, shutting_down_ ? "shutdown" : "orphan");
  if (to == 0 || shutting_down_ || slot == slots_.end()) return false;  // restarted the plain way, or not at all
  std::string how = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                      : "was killed by " + signame(WTERMSIG(status));
  log_.event("exit", "old " + master_label(old_master) + " " + how + "; new " + master_label(to) + " took over",
             {{"pid", old_master}, {"successor", to}, {"reason", "hard limit"}});
  workers_.erase(old_master);
  slot->pid = to;
  Worker& w = add_worker(slot->id, to);
  set_master_limits(w);
  w.mem = process_memory(to, o_.metric);  // shown at once, not after the next tick
  return true;
}

}  // namespace ebb::supervisor
