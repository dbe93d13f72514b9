// --preload: the fork server's control. It imports the modules once and
// forks every worker on request; ebb starts it, restarts it, replaces it on
// SIGHUP, and registers the workers it forks.
#include <limits>

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include "zygote.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "fleet.h"

namespace ebb::supervisor {

// ---- the fork server of --preload

std::string Fleet::imports_base() const {
  if (o_.preload.empty() || o_.status_socket.empty()) return "";
  std::error_code ec;  // absolute: `ebb ps` may run elsewhere, and a worker may change directory
  const auto path = std::filesystem::absolute(o_.status_socket + ".imports", ec);
  return ec ? o_.status_socket + ".imports" : path.string();
}

// At exit, and at start for what an ebb killed with SIGKILL left behind.
void Fleet::remove_import_trees() const {
  const std::string base = imports_base();
  if (base.empty()) return;
  unlink((base + ".json").c_str());
  unlink((base + ".txt").c_str());
  const size_t slash = base.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : base.substr(0, slash + 1);
  const std::string name = base.substr(slash == std::string::npos ? 0 : slash + 1) + ".";
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return;
  while (const dirent* e = readdir(d)) {  // the workers' <base>.<pid>.jsonl
    const std::string f = e->d_name;
    const auto ends = [&f](const char* s) {
      return f.size() > strlen(s) && f.compare(f.size() - strlen(s), strlen(s), s) == 0;
    };
    if (f.rfind(name, 0) == 0 && (ends(".jsonl") || ends(".tmp"))) unlink((dir + f).c_str());
  }
  closedir(d);
}

bool Fleet::start_zygote(std::unique_ptr<Zygote>& z, const char* why) {
  auto fresh = std::make_unique<Zygote>();
  std::string err;
  if (!fresh->start(o_.python, o_.preload, o_.python_dir, o_.env, o_.stop_signal, imports_base(), &err)) {
    log_.event("error", "cannot start the fork server: " + err, {{"error", err}});
    return false;
  }
  std::string mods;
  for (const auto& m : o_.preload) mods += (mods.empty() ? "" : ", ") + m;
  log_.event("zygote",
             "fork server [pid " + std::to_string(fresh->pid()) + "] started (" + why + "): importing " + mods,
             {{"zygote", fresh->pid()}, {"modules", o_.preload}, {"reason", why}});
  z = std::move(fresh);
  (&z == &zygote_ ? zygote_started_ : next_zygote_started_) = now_s();
  return true;
}

void Fleet::on_zygote_readable(std::unique_ptr<Zygote>& z) {
  while (z) {
    auto msg = z->receive();
    if (!msg) {
      z->close_socket();  // it is gone; SIGCHLD tells how
      return;
    }
    if (msg->is_null()) return;
    on_zygote_message(z, *msg);
  }
}

void Fleet::on_zygote_message(std::unique_ptr<Zygote>& z, const nlohmann::json& msg) {
  std::string event = msg.value("event", "");
  pid_t pid = z->pid();
  std::string who = "fork server [pid " + std::to_string(pid) + "]";
  bool reloading = &z == &next_zygote_;
  if (event == "forked") {
    forked(msg.value("id", -1), msg.value("pid", -1));
    return;
  }
  if (event == "error" && msg.contains("id")) {  // one fork failed (EAGAIN...): try again in a second
    fork_progress();
    int id = msg.value("id", -1);
    for (Slot& sl : slots_)
      if (sl.id == id && sl.forking) {
        sl.forking = false;
        sl.restart_at = now_s() + 1;
      }
    log_.event("error", who + ": fork of worker " + std::to_string(id) + " failed: " + msg.value("error", "?"),
               {{"zygote", pid}, {"worker", id}});
    return;
  }
  if (event == "ready") {
    if (z->reaped()) return;  // it said ready, then died before we read it: it serves nobody
    z->set_ready();
    std::string mods;
    for (const auto& m : msg.value("modules", nlohmann::json::array())) {
      char buf[32];
      snprintf(buf, sizeof buf, " (%.2fs)", m.value("seconds", 0.0));
      mods += (mods.empty() ? "" : ", ") + m.value("name", std::string("?")) + buf;
    }
    char head[96];
    snprintf(head, sizeof head, " ready in %.2fs, %lu objects frozen: ", msg.value("seconds", 0.0),
             static_cast<unsigned long>(msg.value("frozen", 0UL)));
    log_.event("ready", who + head + "imported " + mods, {{"zygote", pid}, {"preload", msg}});
    for (const auto& w : msg.value("warnings", nlohmann::json::array()))
      log_.event("warning", who + ": " + w.get<std::string>(), {{"zygote", pid}, {"warning", w}});
    if (reloading) {
      take_over();  // now, or once the forks asked of the old one are answered
      return;
    }
    zygote_was_ready_ = true;
    zygote_restart_at_ = -1;
    for (Slot& s : slots_)
      if (s.waiting && !s.retired && !shutting_down_) start_slot(s, "initial");
    return;
  }
  if (event == "error") {
    std::string err = msg.value("error", "unknown error");
    std::string text = msg.contains("module") ? "cannot import " + msg.value("module", "") + ": " + err
                                              : "the worker command cannot run: " + err;
    nlohmann::json f = {{"zygote", pid}, {"error", err}};
    if (msg.contains("module")) f["module"] = msg["module"], f["traceback"] = msg.value("traceback", "");
    if (msg.contains("traceback")) text += " (traceback above)";
    if (reloading) {
      log_.event("error", "reload failed: " + who + " " + text + "; the running fork server and workers stay", f);
      z->close_socket();
      if (z->pid() > 0) retired_zygotes_.push_back(z->pid());  // its exit is expected
      z.reset();
      return;
    }
    log_.event("error", who + ": " + text, f);
    z->close_socket();
    zygote_failed(text);
    return;
  }
  log_.event("error", who + ": unexpected message " + msg.dump(), {{"zygote", pid}});
}

// The fork server cannot serve. At the start, the fleet stops (exit 1)
// unless --preload-fallback; later, the running workers go on and it is
// started again, with a growing delay.
void Fleet::zygote_failed(const std::string& why) {
  if (zygote_) zygote_->set_failed();
  if (o_.preload_fallback) {
    use_zygote_ = false;
    log_.event("fallback", "the fork server failed (" + why + "); workers now run the command as separate processes",
               {{"error", why}});
    for (Slot& s : slots_)
      if (s.waiting && !s.retired && !shutting_down_) start_slot(s, "initial");
    return;
  }
  if (zygote_was_ready_) return;  // on_zygote_exit schedules the restart
  if (!shutting_down_) {
    zygote_fatal_ = true;
    begin_shutdown("the fork server failed (--preload-fallback would run the workers without it)");
  }
}

// True if `pid` was a fork server.
bool Fleet::on_zygote_exit(pid_t pid, int status) {
  std::string how = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                      : "was killed by " + signame(WTERMSIG(status));
  auto retired = std::find(retired_zygotes_.begin(), retired_zygotes_.end(), pid);
  if (retired != retired_zygotes_.end()) {
    retired_zygotes_.erase(retired);
    return true;
  }
  if (next_zygote_ && pid == next_zygote_->pid()) {
    next_zygote_->set_reaped();
    on_zygote_readable(next_zygote_);  // its last words, if any (an import error)
    if (next_zygote_) {
      log_.event("error", "reload failed: the new fork server " + how + " before it was ready; the old one stays",
                 {{"zygote", pid}});
      next_zygote_.reset();
    }
    return true;
  }
  if (!zygote_ || pid != zygote_->pid()) return false;
  bool was_ready = zygote_->ready();
  zygote_->set_reaped();
  on_zygote_readable(zygote_);  // its last words, if any (an import error)
  bool reported = zygote_->failed();
  zygote_->exited();
  for (Slot& sl : slots_)
    if (sl.forking) {  // its answer will not come: the next fork server starts it
      sl.forking = false;
      sl.waiting = true;
    }
  double uptime = now_s() - zygote_started_;
  if (shutting_down_) {
    log_.event("zygote", "fork server [pid " + std::to_string(pid) + "] " + how, {{"zygote", pid}});
    return true;
  }
  if (!was_ready && !zygote_was_ready_) {
    if (!reported && use_zygote_) {
      log_.event("error", "fork server [pid " + std::to_string(pid) + "] " + how + " before it was ready",
                 {{"zygote", pid}});
      zygote_failed("it " + how);
    }
    return true;
  }
  if (!use_zygote_) return true;  // fell back to separate processes
  zygote_quick_exits_ = uptime < o_.min_uptime_s ? zygote_quick_exits_ + 1 : 0;
  double delay =
      zygote_quick_exits_ < 2 ? 0 : std::min(60.0, std::ldexp(1.0, static_cast<int>(zygote_quick_exits_) - 2));
  zygote_restart_at_ = now_s() + delay;
  counters_.zygote_restarts++;
  log_.event("zygote",
             "fork server [pid " + std::to_string(pid) + "] " + how + " after " + seconds(uptime) +
                 " (unexpected); the workers go on; restarting it" + (delay > 0 ? " in " + seconds(delay) : ""),
             {{"zygote", pid}, {"restart_in_s", delay}});
  return true;
}

// Fork and import timeouts, restarts, a reload's takeover, and the fork
// server's end at shutdown.
void Fleet::check_zygotes() {
  double now = now_s();
  for (const Slot& sl : slots_)
    if (sl.forking && now > sl.fork_deadline && zygote_alive() && !zygote_->reaped()) {
      log_.event("error",
                 "fork server [pid " + std::to_string(zygote_->pid()) + "] did not fork worker " +
                     std::to_string(sl.id) + " within " + seconds(kForkTimeoutS) + ": killing it",
                 {{"zygote", zygote_->pid()}, {"worker", sl.id}});
      zygote_->kill_now();  // its exit puts the slots back to waiting
      for (Slot& other : slots_)
        if (other.forking) other.fork_deadline = std::numeric_limits<double>::infinity();  // killed once
      break;
    }
  if (shutting_down_) {
    if (next_zygote_) {
      next_zygote_->kill_now();
      if (next_zygote_->pid() > 0) retired_zygotes_.push_back(next_zygote_->pid());
      next_zygote_.reset();
    }
    zygote_restart_at_ = -1;
    if (workers_.empty() && zygote_alive() && !any_forking()) {
      if (zygote_closed_at_ < 0) {
        zygote_closed_at_ = now;
        zygote_->close_socket();                     // a ready fork server exits on EOF
        if (!zygote_->ready()) zygote_->kill_now();  // still importing: nothing to finish
      } else if (now - zygote_closed_at_ > 5) {
        zygote_->kill_now();
      }
    }
    return;
  }
  take_over();
  if (use_zygote_ && !zygote_alive() && zygote_restart_at_ >= 0 && now >= zygote_restart_at_) {
    zygote_restart_at_ = -1;
    if (!start_zygote(zygote_, "restart")) zygote_restart_at_ = now + 5;
  }
  for (auto* z : {&zygote_, &next_zygote_}) {
    double started = z == &zygote_ ? zygote_started_ : next_zygote_started_;
    if (*z && (*z)->pid() > 0 && !(*z)->ready() && (*z)->fd() >= 0 && now - started > o_.preload_timeout_s) {
      log_.event("error",
                 "fork server [pid " + std::to_string((*z)->pid()) + "] still importing after " +
                     seconds(o_.preload_timeout_s) + " (--preload-timeout): killing it",
                 {{"zygote", (*z)->pid()}});
      (*z)->close_socket();
      (*z)->kill_now();
      if (z == &zygote_) zygote_failed("import timeout");
    }
  }
}

void Fleet::take_over() {
  if (!next_zygote_ || !next_zygote_->ready() || any_forking()) return;
  // The new code is imported: it takes over, and the workers are replaced
  // from it, a few at a time (SIGHUP's rolling restart).
  std::unique_ptr<Zygote> old = std::move(zygote_);
  zygote_ = std::move(next_zygote_);
  zygote_started_ = next_zygote_started_;
  if (old && old->pid() > 0) {
    old->close_socket();                     // a ready one exits by itself
    if (!old->ready()) old->kill_now();      // one still importing (or hung) goes now
    retired_zygotes_.push_back(old->pid());  // reaped as such, not as a worker
  }
  log_.event("reload", "the new fork server replaces the old one; rolling restart, " +
                           std::to_string(o_.policy.max_recycling) + " at a time");
  pending_reload_.clear();
  for (auto& [wpid, w] : workers_) pending_reload_.push_back(wpid);
  zygote_was_ready_ = true;
  zygote_restart_at_ = -1;
  zygote_quick_exits_ = 0;
  for (Slot& s : slots_)
    if (s.waiting && !s.retired && !shutting_down_) start_slot(s, "initial");
}

// The fork server forked the worker of a slot: it is ours now.
void Fleet::forked(int slot_id, pid_t pid) {
  if (pid <= 0) return;
  fork_progress();
  auto slot = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.id == slot_id && s.forking; });
  // It may have exited (and been reaped) before its pid reached us: only an
  // exit seen after the request can be its own (pids are reused).
  double asked = slot != slots_.end() ? slot->fork_asked_at : now_s() - kForkTimeoutS;
  auto e = std::find_if(unknown_exits_.begin(), unknown_exits_.end(),
                        [&](const UnknownExit& x) { return x.pid == pid && x.when >= asked; });
  add_worker(slot_id, pid);
  if (slot != slots_.end()) {
    slot->forking = false;
    slot->pid = pid;
    log_start(*slot, slot->fork_why);
  }
  if (e != unknown_exits_.end()) {
    int status = e->status;
    unknown_exits_.erase(e);
    on_exit(pid, status);
    return;
  }
  Worker& live = workers_[pid];
  const char* reason = slot == slots_.end() ? "unrequested"
                       : shutting_down_     ? "shutdown"
                       : slot->retired      ? "SIGTTOU"
                                            : nullptr;
  if (reason == nullptr) return;
  if (slot == slots_.end())
    log_.event("error", fmt_worker(slot_id, pid) + " forked for no request; stopping it", {{"pid", pid}});
  stop(live, reason);
  if (kill_all_) {
    live.killed = true;
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
  }
}

}  // namespace ebb::supervisor
