// The loop of `ebb run`: one thread polls a signalfd, the status and metrics
// sockets and the fork server's socket; every --interval it ticks (memory.cc).
#include <poll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>

#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "fleet.h"

namespace ebb::supervisor {

const char* metric_name(Metric m) {
  switch (m) {
    case Metric::kRss:
      return "rss";
    case Metric::kPss:
      return "pss";
    case Metric::kUss:
      return "uss";
  }
  return "?";
}

FleetStatus Fleet::snapshot() const {
  FleetStatus s = counters_;
  s.pid = getpid();
  s.metric = metric_name(o_.metric);
  s.uptime_s = now_s() - started_at_;
  s.shutting_down = shutting_down_;
  s.total = total_;
  s.total_limit = o_.policy.total_limit;
  if (zygote_alive()) s.zygote = zygote_->pid(), s.zygote_mem = zygote_mem_, s.zygote_imports = imports_base();
  pid_t master = o_.children && !slots_.empty() ? slots_[0].pid : 0;
  for (const auto& [pid, w] : workers_) {
    WorkerStatus ws;
    ws.id = w.id;
    ws.pid = pid;
    ws.state = pid == master  ? "master"
               : w.new_master ? "new master"
               : w.old_master ? "old master"
               : w.stopping   ? "stopping"
                              : "running";
    ws.mem = w.mem;
    ws.age_s = now_s() - w.started;
    ws.soft_limit = w.limits.soft;
    ws.hard_limit = w.limits.hard;  // for the master: --master-hard-limit
    ws.max_age_s = w.limits.max_age_s;
    ws.can_trim = w.can_trim;
    ws.trims = w.trims;
    s.workers.push_back(ws);
  }
  return s;
}

bool Fleet::open_endpoints(int* status_fd, int* metrics_fd) {
  std::string err;
  if (!o_.status_socket.empty()) {
    *status_fd = listen_unix(o_.status_socket, &err);
    if (*status_fd < 0) {
      log_.event("error", "--status-socket " + err, {{"error", err}});
      return false;
    }
  }
  if (!o_.metrics.empty()) {
    std::string bound;
    *metrics_fd = listen_tcp(o_.metrics, &bound, &err);
    if (*metrics_fd < 0) {
      log_.event("error", "--metrics " + err, {{"error", err}});
      return false;
    }
    log_.event("metrics", "Prometheus metrics at http://" + bound + "/metrics", {{"address", bound}});
  }
  if (*status_fd >= 0) log_.event("status", "status socket at " + o_.status_socket, {{"path", o_.status_socket}});
  return true;
}

void Fleet::reap() {
  for (;;) {
    int status = 0;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    on_exit(pid, status);
  }
}

void Fleet::begin_shutdown(const char* why) {
  if (shutting_down_) {
    // The same signal often arrives twice at once (sent to the process and
    // to its group, as timeout(1) does): only a later one means "now".
    if (now_s() - shutdown_at_ < 1.0) return;
    // A second TERM/INT: do not wait for the grace period.
    log_.event("shutdown", std::string(why) + " again: killing every worker now");
    kill_all_ = true;
    for (auto& [pid, w] : workers_) {
      w.killed = true;
      kill(-pid, SIGKILL);
      kill(pid, SIGKILL);
    }
    unhealthy_ = true;
    return;
  }
  shutting_down_ = true;
  shutdown_at_ = now_s();
  pid_t master = o_.children && !slots_.empty() ? slots_[0].pid : 0;  // 0 while it is being restarted
  std::string what = master > 0 && workers_.count(master)
                         ? "the master and its " + std::to_string(workers_.size() - 1) + " worker(s)"
                         : std::to_string(workers_.size()) + " worker(s)";
  log_.event("shutdown", std::string(why) + ": stopping " + what + ", grace " + seconds(o_.grace_s),
             {{"workers", workers_.size()}, {"grace_s", o_.grace_s}});
  for (auto& [pid, w] : workers_) {
    if (o_.children && pid != master) continue;  // the master stops its own children
    stop(w, "shutdown");
  }
  if (o_.children && master <= 0) {
    for (auto& [pid, w] : workers_) stop(w, "shutdown");
  }
}

void Fleet::enforce_grace() {
  double now = now_s();
  for (auto& [pid, w] : workers_) {
    if (!w.stopping || w.killed || now - w.stop_sent < o_.grace_s) continue;
    w.killed = true;
    counters_.kills++;
    if (shutting_down_) unhealthy_ = true;
    log_.event("kill",
               label(w.id, pid) + " still running " + seconds(o_.grace_s) + " after " + signame(stop_signal_of(w)) +
                   ": SIGKILL",
               {{"worker", w.id}, {"pid", pid}, {"reason", w.stop_reason}});
    kill_now(pid);
  }
}

// SIGKILL to a worker and to its process group, so helpers it started go
// too. Not to the group of an old master in a gunicorn handover: the new
// master and its workers are in it (master_restart.cc); nor to a master that
// is not its group's leader (one that took over): its own workers then.
void Fleet::kill_now(pid_t pid) {
  if ((pid != handover_.from || handover_.drain) && getpgid(pid) == pid) {  // a new Celery master has its own
    kill(-pid, SIGKILL);
  } else {
    auto children = proc::children_by_parent();
    auto range = children.equal_range(pid);
    for (auto it = range.first; it != range.second; ++it)
      if (it->second != handover_.to) kill(it->second, SIGKILL);
  }
  kill(pid, SIGKILL);
}

void Fleet::on_signal(int sig) {
  switch (sig) {
    case SIGCHLD:
      reap();
      break;
    case SIGTERM:
    case SIGINT:
      begin_shutdown(sig == SIGTERM ? "SIGTERM" : "SIGINT");
      break;
    case SIGHUP: {
      if (use_zygote_ && !shutting_down_) {
        // New code: import it in a new fork server first; the workers are
        // replaced only once it is ready, so a broken deploy breaks nothing.
        if (next_zygote_) {
          log_.event("reload", "SIGHUP: a reload is already importing; ignored");
          break;
        }
        log_.event("reload", "SIGHUP: starting a new fork server; the workers are replaced once it is ready");
        start_zygote(next_zygote_, "reload");
        break;
      }
      if (shutting_down_ || o_.children) {
        if (o_.children && !slots_.empty() && slots_[0].pid > 0) kill(slots_[0].pid, SIGHUP);  // the master reloads
        break;
      }
      log_.event("reload", "SIGHUP: rolling restart, " + std::to_string(o_.policy.max_recycling) + " at a time");
      for (auto& [pid, w] : workers_) pending_reload_.push_back(pid);
      break;
    }
    case SIGTTIN: {
      if (shutting_down_ || o_.children) break;
      Slot s;
      s.id = static_cast<int>(slots_.size()) + 1;
      slots_.push_back(s);
      log_.event("scale", "SIGTTIN: " + std::to_string(live_slots()) + " worker(s)");
      start_slot(slots_.back(), "SIGTTIN");
      break;
    }
    case SIGTTOU: {
      if (shutting_down_ || o_.children || live_slots() <= 1) break;
      for (auto it = slots_.rbegin(); it != slots_.rend(); ++it) {
        if (it->retired) continue;
        it->retired = true;
        it->restart_at = -1;
        log_.event("scale", "SIGTTOU: " + std::to_string(live_slots()) + " worker(s)");
        if (it->pid > 0) {
          auto w = workers_.find(it->pid);
          if (w != workers_.end()) stop(w->second, "SIGTTOU");
        }
        break;
      }
      break;
    }
    default:
      break;
  }
}

unsigned Fleet::live_slots() const {
  return static_cast<unsigned>(std::count_if(slots_.begin(), slots_.end(), [](const Slot& s) { return !s.retired; }));
}

unsigned Fleet::stopping_count() const {
  return static_cast<unsigned>(
      std::count_if(workers_.begin(), workers_.end(), [](const auto& kv) { return kv.second.stopping; }));
}

// SIGHUP's rolling restart: recycle the listed workers, never more than
// max_recycling stopping at once.
void Fleet::continue_reload() {
  while (!pending_reload_.empty() && stopping_count() < std::max(1u, o_.policy.max_recycling)) {
    pid_t pid = pending_reload_.front();
    pending_reload_.erase(pending_reload_.begin());
    auto it = workers_.find(pid);
    if (it != workers_.end() && !it->second.stopping) recycle(it->second, "reload");
  }
}

double Fleet::next_wakeup() const {
  double t = next_tick_;
  for (const Slot& s : slots_)
    if (s.restart_at >= 0 && s.pid == 0 && !shutting_down_ && !s.retired) t = std::min(t, s.restart_at);
  for (const auto& [pid, w] : workers_)
    if (w.stopping && !w.killed) t = std::min(t, w.stop_sent + o_.grace_s);
  for (const Slot& s : slots_)
    if (s.forking) t = std::min(t, s.fork_deadline);
  if (zygote_restart_at_ >= 0 && use_zygote_ && !shutting_down_ && !zygote_alive()) t = std::min(t, zygote_restart_at_);
  return t;
}

int Fleet::run() {
  sigset_t mask;
  sigemptyset(&mask);
  for (int sig : {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGTTIN, SIGTTOU}) sigaddset(&mask, sig);
  sigprocmask(SIG_BLOCK, &mask, nullptr);
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
  if (sfd < 0) {
    log_.event("error", std::string("signalfd: ") + strerror(errno));
    return 1;
  }
  // Orphans of our workers (a worker's own children whose parent died) come
  // to us, so no process of the fleet escapes supervision or stays a zombie.
  prctl(PR_SET_CHILD_SUBREAPER, 1);
  if (!o_.cgroup_dir.empty()) {
    cgroup_ = proc::Cgroup{};
    cgroup_->dir = o_.cgroup_dir;
    if (auto e = proc::read_events(*cgroup_)) events_ = *e;
  }

  int status_fd = -1, metrics_fd = -1;
  if (!open_endpoints(&status_fd, &metrics_fd)) {
    if (status_fd >= 0) close(status_fd);
    close(sfd);
    return 2;
  }
  started_at_ = now_s();
  unsigned n = o_.children ? 1 : o_.workers;
  for (unsigned i = 0; i < n; i++) {
    Slot s;
    s.id = static_cast<int>(i) + 1;
    slots_.push_back(s);
  }
  {
    std::string text =
        o_.children ? "starting the master (workers are its children)" : "starting " + std::to_string(n) + " worker(s)";
    text += std::string("; metric ") + metric_name(o_.metric);
    if (o_.policy.soft_limit) text += ", soft limit " + mib(o_.policy.soft_limit);
    if (o_.policy.hard_limit) text += ", hard limit " + mib(o_.policy.hard_limit);
    if (o_.policy.total_limit)
      text += ", fleet budget " + mib(o_.policy.total_limit) + (o_.total_from_cgroup ? " (from the cgroup)" : "");
    if (o_.policy.max_age_s > 0) text += ", max age " + seconds(o_.policy.max_age_s);
    if (o_.children) {
      text += "; master: " + o_.master.name;
      if (o_.master_hard_limit) text += ", master hard limit " + mib(o_.master_hard_limit);
      text += "; ";
      if (!o_.recycle_children)
        text += "its children are trimmed but never recycled: " + o_.master.note;
      else if (o_.stop_signal_named)
        text += "children recycled with " + signame(o_.stop_signal) + " (--stop-signal)";
      else
        text += "children recycled with " + signame(o_.stop_signal) + ": " + o_.master.note;
      if (!o_.master.warning.empty()) text += "; warning: " + o_.master.warning;
      if (o_.master_hard_limit && !o_.master.handover_note.empty()) text += "; warning: " + o_.master.handover_note;
    }
    if (!o_.profile_prefix.empty())
      text += "; profiling every worker into " + o_.profile_prefix + (o_.children ? ".master" : ".w<ID>") +
              ".<pid>.ebbprof";
    log_.event("config", text,
               {{"workers", n},
                {"children", o_.children},
                {"metric", metric_name(o_.metric)},
                {"soft_limit", o_.policy.soft_limit},
                {"hard_limit", o_.policy.hard_limit},
                {"total_limit", o_.policy.total_limit},
                {"max_age_s", o_.policy.max_age_s},
                {"jitter", o_.policy.jitter},
                {"stop_signal", signame(o_.stop_signal)},
                {"master", o_.children ? o_.master.name : ""},
                {"master_hard_limit", o_.master_hard_limit},
                {"recycle_children", o_.children && o_.recycle_children},
                {"profile", o_.profile_prefix}});
  }
  if (!o_.preload.empty()) {
    use_zygote_ = true;
    remove_import_trees();
    if (!start_zygote(zygote_, "initial")) {
      close(sfd);
      if (status_fd >= 0) {
        close(status_fd);
        unlink(o_.status_socket.c_str());
      }
      if (metrics_fd >= 0) close(metrics_fd);
      return 1;
    }
  }
  for (Slot& s : slots_) start_slot(s, "initial");
  next_tick_ = now_s() + o_.interval_s;

  while (!(shutting_down_ && workers_.empty() && !zygote_alive())) {
    double wait = next_wakeup() - now_s();
    int timeout_ms = wait <= 0 ? 0 : static_cast<int>(std::ceil(wait * 1000));
    pollfd pfd[5] = {{sfd, POLLIN, 0},
                     {status_fd, POLLIN, 0},
                     {metrics_fd, POLLIN, 0},
                     {zygote_ ? zygote_->fd() : -1, POLLIN, 0},
                     {next_zygote_ ? next_zygote_->fd() : -1, POLLIN, 0}};
    int r = poll(pfd, 5, timeout_ms);  // fds of -1 are ignored
    if (r < 0 && errno != EINTR) break;
    if (r > 0 && (pfd[0].revents & POLLIN)) {
      signalfd_siginfo si;
      while (read(sfd, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) on_signal(static_cast<int>(si.ssi_signo));
    }
    if (r > 0 && (pfd[1].revents & POLLIN)) answer_status(status_fd, snapshot());
    if (r > 0 && (pfd[2].revents & POLLIN)) answer_metrics(metrics_fd, snapshot());
    if (r > 0 && pfd[3].revents != 0 && zygote_) on_zygote_readable(zygote_);
    if (r > 0 && pfd[4].revents != 0 && next_zygote_) on_zygote_readable(next_zygote_);
    reap();  // signals coalesce: look for every exit, not one per SIGCHLD
    double now = now_s();
    if (!shutting_down_)
      for (Slot& s : slots_)
        if (!s.retired && s.pid == 0 && s.restart_at >= 0 && s.restart_at <= now) start_slot(s, "restart");
    enforce_grace();
    if (!o_.preload.empty()) check_zygotes();
    if (now >= next_tick_) {
      tick();
      if (!shutting_down_) continue_reload();
      next_tick_ = now + o_.interval_s;
    }
  }
  bool looping = std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.quick_exits >= 2; });
  int code = unhealthy_ || looping || zygote_fatal_ ? 1 : 0;
  log_.event("stopped",
             std::string("every worker has stopped") + (code == 0       ? ""
                                                        : zygote_fatal_ ? "; the fork server failed"
                                                        : unhealthy_    ? "; some had to be killed"
                                                                        : "; the fleet was crash-looping"),
             {{"exit_code", code}});
  close(sfd);
  if (status_fd >= 0) {
    close(status_fd);
    unlink(o_.status_socket.c_str());
  }
  if (metrics_fd >= 0) close(metrics_fd);
  remove_import_trees();
  return code;
}

int run(const Options& o) {
  Fleet f(o);
  return f.run();
}

}  // namespace ebb::supervisor
