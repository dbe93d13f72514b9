// Workers' lives: started (exec'd, or asked of the fork server), stopped
// with the stop signal, recycled with a replacement first when the budget
// allows, reaped and restarted with crash-loop backoff.
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "exec.h"
#include "fleet.h"

namespace ebb::supervisor {

Limits Fleet::draw() {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  double a = u(rng_), b = u(rng_), c = u(rng_);
  return draw_limits(o_.policy, a, b, c);
}

// A new worker, with its limits drawn now.
// The master of --children keeps the soft limit it drew, and has its own
// hard limit and no age limit (policy.h).
void Fleet::set_master_limits(Worker& w) const {
  w.limits.hard = o_.master_hard_limit;
  w.limits.max_age_s = 0;
}

std::string Fleet::label(int id, pid_t pid) const {
  if (is_master(pid)) return "master [pid " + std::to_string(pid) + "]";
  auto it = workers_.find(pid);
  if (it != workers_.end()) return label(it->second);
  return fmt_worker(id, pid);
}

// A worker by its role: a master that is not (or no longer) the master
// says which one it is.
std::string Fleet::label(const Worker& w) const {
  if (is_master(w.pid)) return "master [pid " + std::to_string(w.pid) + "]";
  if (w.new_master) return "new master [pid " + std::to_string(w.pid) + "]";
  if (w.old_master) return "old master [pid " + std::to_string(w.pid) + "]";
  return fmt_worker(w.id, w.pid);
}

Worker& Fleet::add_worker(int id, pid_t pid) {
  Worker& w = workers_[pid];
  w = Worker{};
  w.id = id;
  w.pid = pid;
  w.started = now_s();
  w.limits = draw();
  return w;
}

std::vector<std::string> Fleet::worker_env(int id) const {
  std::vector<std::string> env = {"EBB_WORKER_ID=" + std::to_string(id)};
  if (!o_.profile_prefix.empty()) {
    // Named by worker; the pid completes the name. A master's children
    // follow it, each with its own pid.
    env.push_back("EBB_PROFILE=" + o_.profile_prefix + (o_.children ? ".master" : ".w" + std::to_string(id)));
    env.push_back("EBB_PROFILE_RATE=" + std::to_string(o_.profile_rate));
    env.push_back(std::string("EBB_PROFILE_NATIVE=") + (o_.profile_native ? "1" : "0"));
  }
  return env;
}

pid_t Fleet::spawn(int id) {
  std::vector<std::string> env = o_.env;
  for (auto& e : worker_env(id)) env.push_back(std::move(e));
  std::vector<std::string> args = o_.command;
  std::vector<char*> envp = proc::c_strings(env), argv = proc::c_strings(args);
  pid_t ppid = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    log_.event("error", std::string("fork failed: ") + strerror(errno), {{"error", strerror(errno)}});
    return -1;
  }
  // If ebb dies: stop gracefully (a master that drains: drain).
  int on_death = o_.children && o_.master.drain_signal != 0 ? o_.master.drain_signal : o_.stop_signal;
  if (pid == 0) proc::exec_supervised(argv, envp, on_death, ppid);
  setpgid(pid, pid);  // also here, so the group exists before we signal it
  Worker& w = add_worker(id, pid);
  if (o_.children) set_master_limits(w);
  return pid;
}

void Fleet::start_slot(Slot& s, const char* why) {
  s.restart_at = -1;
  s.waiting = false;
  if (use_zygote_ && !(zygote_ && zygote_->ready())) {
    s.waiting = true;  // started when the fork server says it is ready
    return;
  }
  if (use_zygote_) {
    // Asked of the fork server; the worker is registered when its pid comes
    // back (on_zygote_message), so the loop never waits for a fork.
    std::string err;
    s.pid = 0;  // a recycled worker still stopping is no longer the slot's
    if (!zygote_->request_fork(s.id, worker_env(s.id), &err)) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {  // its queue is full (hundreds of slots at once): later
        s.restart_at = now_s() + 0.1;
        return;
      }
      log_.event("error", "fork server [pid " + std::to_string(zygote_->pid()) + "]: " + err + "; restarting it",
                 {{"error", err}, {"zygote", zygote_->pid()}});
      zygote_->kill_now();
      s.waiting = true;
      return;
    }
    s.forking = true;
    s.fork_asked_at = now_s();
    s.fork_deadline = std::max(s.fork_asked_at + kForkTimeoutS, latest_fork_deadline());
    s.fork_why = why;
    return;
  }
  pid_t pid = spawn(s.id);
  if (pid < 0) {
    s.restart_at = now_s() + 1;
    return;
  }
  s.pid = pid;
  log_start(s, why);
}

void Fleet::log_start(const Slot& s, const std::string& why) {
  pid_t pid = s.pid;
  const Worker& w = workers_[pid];
  nlohmann::json f = {{"worker", s.id}, {"pid", pid}, {"reason", why}};
  std::string text = (o_.children ? "master [pid " + std::to_string(pid) + "]" : fmt_worker(s.id, pid)) + " started (" +
                     why + (use_zygote_ ? ", forked from the fork server" : "") + ")";
  if (!o_.children && (w.limits.soft || w.limits.hard || w.limits.max_age_s > 0)) {
    text += ": limits";
    if (w.limits.soft) text += " soft " + mib(w.limits.soft), f["soft_limit"] = w.limits.soft;
    if (w.limits.hard) text += " hard " + mib(w.limits.hard), f["hard_limit"] = w.limits.hard;
    if (w.limits.max_age_s > 0) {
      char buf[32];
      snprintf(buf, sizeof buf, " max age %.0fs", w.limits.max_age_s);
      text += buf;
      f["max_age_s"] = w.limits.max_age_s;
    }
  }
  log_.event("start", text, f);
}

// A master is stopped with its drain signal if it has one (ebb.celery: it
// runs the tasks it took, then shuts down warmly; master_restart.cc), else
// with SIGTERM (its warm shutdown); its children and every other worker
// with the stop signal.
int Fleet::stop_signal_of(const Worker& w) const {
  if (!is_any_master(w)) return o_.stop_signal;
  return o_.master.drain_signal != 0 ? o_.master.drain_signal : SIGTERM;
}

void Fleet::stop(Worker& w, const std::string& reason) {
  if (w.stopping) return;
  w.stopping = true;
  w.stop_sent = now_s();
  w.stop_reason = reason;
  kill(w.pid, stop_signal_of(w));
}

void Fleet::recycle(Worker& w, const std::string& reason) {
  if (is_master(w.pid)) {
    restart_master(w, reason);
    return;
  }
  counters_.recycles[reason]++;
  std::string text = label(w.id, w.pid) + " recycle (" + reason + "): " + metric_name(o_.metric) + " " + mib(w.mem);
  nlohmann::json f = {{"worker", w.id},   {"pid", w.pid},
                      {"reason", reason}, {"metric", metric_name(o_.metric)},
                      {"mem", w.mem},     {"age_s", now_s() - w.started}};
  if (reason == "hard limit") text += " > " + mib(w.limits.hard);
  if (reason == "fleet budget") text += ", fleet " + mib(total_) + " > " + mib(o_.policy.total_limit);
  if (reason == "max age") text += ", age " + seconds(now_s() - w.started);
  text += "; " + signame(stop_signal_of(w)) + ", grace " + seconds(o_.grace_s);
  if (!o_.children) {
    // Start the replacement first if the budget has room for one more worker
    // of the size of the smallest running one (a fresh worker starts small).
    auto slot = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.pid == w.pid; });
    if (slot != slots_.end()) {
      uint64_t smallest = UINT64_MAX;
      for (auto& [pid, x] : workers_)
        if (!x.stopping && x.pid != w.pid) smallest = std::min(smallest, x.mem);
      if (smallest == UINT64_MAX) smallest = 0;
      bool room = o_.policy.total_limit == 0 || total_ + smallest <= o_.policy.total_limit;
      f["replacement_first"] = room;
      if (room) {
        text += "; replacement started first";
        log_.event("recycle", text, f);
        stop(w, reason);
        start_slot(*slot, "replaces a recycled worker");
        return;
      }
      text += "; replacement after it exits (no room in the budget)";
    }
  }
  log_.event("recycle", text, f);
  stop(w, reason);
}

void Fleet::on_exit(pid_t pid, int status) {
  if (on_zygote_exit(pid, status)) return;
  auto it = workers_.find(pid);
  if (it == workers_.end()) {  // an orphan we reaped as subreaper, or a worker whose pid is still to come
    if (use_zygote_) {
      unknown_exits_.push_back({pid, status, now_s()});
      if (unknown_exits_.size() > 64) unknown_exits_.erase(unknown_exits_.begin());
    }
    return;
  }
  if (pid == handover_.from && handed_over(pid, status)) return;
  if (pid == handover_.to) handover_.to = 0;  // the new master died before it took over
  Worker w = it->second;
  workers_.erase(it);
  if (const std::string base = imports_base(); !base.empty())
    unlink((base + "." + std::to_string(pid) + ".jsonl").c_str());
  double now = now_s();
  double uptime = now - w.started;
  const std::string who = label(w);
  std::string how = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                      : "killed by " + signame(WTERMSIG(status));
  nlohmann::json f = {{"worker", w.id}, {"pid", pid}, {"uptime_s", uptime}};
  if (WIFEXITED(status))
    f["status"] = WEXITSTATUS(status);
  else
    f["signal"] = WTERMSIG(status);
  auto slot = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.pid == pid; });
  if (o_.children && slot == slots_.begin() && slot != slots_.end())
    stop_orphaned_children(shutting_down_ ? "shutdown" : "master exited");
  if (w.stopping) {
    f["reason"] = w.stop_reason;
    if (w.killed) f["killed"] = true;
    log_.event("exit", who + " " + how + " after " + seconds(uptime) + " (stopped: " + w.stop_reason + ")", f);
    if (slot != slots_.end()) {
      slot->pid = 0;
      if (!shutting_down_ && !slot->retired) start_slot(*slot, "replaces a recycled worker");
    }
    return;
  }
  if (slot == slots_.end()) {
    log_.event("exit", who + " " + how + " after " + seconds(uptime), f);
    return;
  }
  slot->pid = 0;
  if (shutting_down_) {
    log_.event("exit", who + " " + how + " after " + seconds(uptime), f);
    return;
  }
  // An exit ebb did not ask for. Quick ones in a row are a crash loop: back
  // off exponentially so a broken worker does not spin the machine.
  slot->quick_exits = uptime < o_.min_uptime_s ? slot->quick_exits + 1 : 0;
  double delay = slot->quick_exits < 2 ? 0 : std::min(60.0, std::ldexp(1.0, static_cast<int>(slot->quick_exits) - 2));
  slot->restart_at = now + delay;
  counters_.restarts++;
  f["restart_in_s"] = delay;
  f["quick_exits"] = slot->quick_exits;
  std::string text = who + " " + how + " after " + seconds(uptime) + " (unexpected); ";
  if (delay > 0)
    text += "crash loop: " + std::to_string(slot->quick_exits) + " exits within " + seconds(o_.min_uptime_s) +
            " of start in a row, restarting in " + seconds(delay);
  else
    text += "restarting";
  log_.event("exit", text, f);
}

}  // namespace ebb::supervisor
