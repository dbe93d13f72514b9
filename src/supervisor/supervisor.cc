#include "supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>

#include "cgroup.h"
#include "exec.h"
#include "proc.h"
#include "reader.h"
#include "status.h"

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

namespace {

constexpr double kNever = -1e18;
constexpr double kForkTimeoutS = 10;  // a fork server that takes longer to fork is stuck

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

std::string mib(uint64_t bytes) {
  char buf[32];
  snprintf(buf, sizeof buf, "%.1fM", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

// One line per decision, human or JSON, on stderr.
class Log {
 public:
  explicit Log(LogFormat f) : format_(f) {}

  // `text` is the human line; `fields` the same facts for JSON.
  void event(const std::string& name, const std::string& text, nlohmann::json fields = nlohmann::json::object()) {
    std::string line;
    if (format_ == LogFormat::kJson) {
      fields["time"] = timestamp();
      fields["event"] = name;
      fields["message"] = text;
      line = fields.dump() + "\n";
    } else {
      line = timestamp() + " ebb run: " + text + "\n";
    }
    ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
    (void)ignored;
  }

 private:
  static std::string timestamp() {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    tm t;
    gmtime_r(&ts.tv_sec, &t);
    char buf[40];
    size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &t);
    snprintf(buf + n, sizeof buf - n, ".%03ldZ", ts.tv_nsec / 1000000);
    return buf;
  }
  LogFormat format_;
};

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

std::string fmt_worker(int id, pid_t pid) {
  return "worker " + std::to_string(id) + " [pid " + std::to_string(pid) + "]";
}

std::string signame(int sig) {
  const char* a = sigabbrev_np(sig);
  return a != nullptr ? std::string("SIG") + a : "signal " + std::to_string(sig);
}

std::string seconds(double s) {
  char buf[32];
  snprintf(buf, sizeof buf, s < 10 ? "%.1fs" : "%.0fs", s);
  return buf;
}

uint64_t process_memory(pid_t pid, Metric m) {
  if (m == Metric::kRss) return proc::rss_of(pid);
  proc::Process p = proc::read_process(pid);
  return m == Metric::kPss ? p.mem.pss : p.mem.uss;
}

class Fleet {
 public:
  explicit Fleet(const Options& o) : o_(o), log_(o.log_format), rng_(std::random_device{}()) {}

  int run();

 private:
  // ---- processes
  pid_t spawn(int id);
  Worker& add_worker(int id, pid_t pid);
  void start_slot(Slot& s, const char* why);
  void log_start(const Slot& s, const std::string& why);
  void forked(int slot_id, pid_t pid);
  void stop(Worker& w, const std::string& reason);
  void reap();
  void on_exit(pid_t pid, int status);

  // ---- policy
  void tick();
  void sample(const proc::ChildMap& children);
  void discover_children(const proc::ChildMap& children);
  void trim(Worker& w, const std::string& reason);
  void recycle(Worker& w, const std::string& reason);
  void watch_cgroup();

  // ---- signals and shutdown
  void on_signal(int sig);
  void begin_shutdown(const char* why);
  void enforce_grace();
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

FleetStatus Fleet::snapshot() const {
  FleetStatus s = counters_;
  s.pid = getpid();
  s.metric = metric_name(o_.metric);
  s.uptime_s = now_s() - started_at_;
  s.shutting_down = shutting_down_;
  s.total = total_;
  s.total_limit = o_.policy.total_limit;
  if (zygote_alive()) s.zygote = zygote_->pid(), s.zygote_mem = zygote_mem_;
  pid_t master = o_.children && !slots_.empty() ? slots_[0].pid : 0;
  for (const auto& [pid, w] : workers_) {
    WorkerStatus ws;
    ws.id = w.id;
    ws.pid = pid;
    ws.state = pid == master ? "master" : w.stopping ? "stopping" : "running";
    ws.mem = w.mem;
    ws.age_s = now_s() - w.started;
    if (pid != master) {
      ws.soft_limit = w.limits.soft;
      ws.hard_limit = w.limits.hard;
      ws.max_age_s = w.limits.max_age_s;
    }
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

Limits Fleet::draw() {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  double a = u(rng_), b = u(rng_), c = u(rng_);
  return draw_limits(o_.policy, a, b, c);
}

// A new worker, with its limits drawn now.
Worker& Fleet::add_worker(int id, pid_t pid) {
  Worker& w = workers_[pid];
  w = Worker{};
  w.id = id;
  w.pid = pid;
  w.started = now_s();
  w.limits = draw();
  return w;
}

pid_t Fleet::spawn(int id) {
  std::vector<std::string> env = o_.env;
  env.push_back("EBB_WORKER_ID=" + std::to_string(id));
  std::vector<std::string> args = o_.command;
  std::vector<char*> envp = proc::c_strings(env), argv = proc::c_strings(args);
  pid_t ppid = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    log_.event("error", std::string("fork failed: ") + strerror(errno), {{"error", strerror(errno)}});
    return -1;
  }
  if (pid == 0) proc::exec_supervised(argv, envp, o_.stop_signal, ppid);  // if ebb dies: stop gracefully
  setpgid(pid, pid);  // also here, so the group exists before we signal it
  add_worker(id, pid);
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
    if (!zygote_->request_fork(s.id, {"EBB_WORKER_ID=" + std::to_string(s.id)}, &err)) {
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

void Fleet::stop(Worker& w, const std::string& reason) {
  if (w.stopping) return;
  w.stopping = true;
  w.stop_sent = now_s();
  w.stop_reason = reason;
  kill(w.pid, o_.stop_signal);
}

void Fleet::recycle(Worker& w, const std::string& reason) {
  counters_.recycles[reason]++;
  std::string text =
      fmt_worker(w.id, w.pid) + " recycle (" + reason + "): " + metric_name(o_.metric) + " " + mib(w.mem);
  nlohmann::json f = {{"worker", w.id},   {"pid", w.pid},
                      {"reason", reason}, {"metric", metric_name(o_.metric)},
                      {"mem", w.mem},     {"age_s", now_s() - w.started}};
  if (reason == "hard limit") text += " > " + mib(w.limits.hard);
  if (reason == "fleet budget") text += ", fleet " + mib(total_) + " > " + mib(o_.policy.total_limit);
  if (reason == "max age") text += ", age " + seconds(now_s() - w.started);
  text += "; " + signame(o_.stop_signal) + ", grace " + seconds(o_.grace_s);
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

void Fleet::trim(Worker& w, const std::string& reason) {
  w.last_trim = now_s();
  telemetry::Ack ack = telemetry::send(w.pid, telemetry::kCmdTrim, 0, 1000);
  nlohmann::json f = {
      {"worker", w.id}, {"pid", w.pid}, {"reason", reason}, {"metric", metric_name(o_.metric)}, {"mem", w.mem}};
  if (ack.status != telemetry::Status::kOk) {
    f["error"] = ack.message;
    log_.event("trim", fmt_worker(w.id, w.pid) + " trim (" + reason + ") failed: " + ack.message, f);
    return;
  }
  f["rss_before"] = ack.rss_before;
  f["rss_after"] = ack.rss_after;
  f["released"] = ack.released;
  w.trims++;
  counters_.trims++;
  counters_.released_bytes += ack.released;
  log_.event("trim",
             fmt_worker(w.id, w.pid) + " trim (" + reason + "): " + metric_name(o_.metric) + " " + mib(w.mem) +
                 ", rss " + mib(ack.rss_before) + " -> " + mib(ack.rss_after) + ", released " + mib(ack.released),
             f);
}

void Fleet::discover_children(const proc::ChildMap& children) {
  // Children mode: the workers are the master's children; the master (slot
  // 1) starts and replaces them, ebb only watches and stops them.
  pid_t master = slots_.empty() ? 0 : slots_[0].pid;
  auto range = master > 0 ? children.equal_range(master) : std::make_pair(children.end(), children.end());
  for (auto it = range.first; it != range.second; ++it) {
    pid_t pid = it->second;
    if (workers_.count(pid)) continue;
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

void Fleet::sample(const proc::ChildMap& children) {
  total_ = 0;
  pid_t master = o_.children && !slots_.empty() ? slots_[0].pid : 0;
  for (auto& [pid, w] : workers_) {
    uint64_t mem = 0;
    if (pid == master) {
      mem = process_memory(pid, o_.metric);  // the master alone; its children are workers
    } else {
      for (pid_t p : proc::tree(pid, children)) mem += process_memory(p, o_.metric);
    }
    w.mem = mem;
    total_ += mem;
    bool had_page = w.can_trim;
    w.can_trim = telemetry::read_pid(pid).status == telemetry::Status::kOk;
    if (w.can_trim && !had_page && w.limits.soft != 0 && !w.soft_limit_sent) {
      // Above this, libebb purges at once instead of after its delay.
      w.soft_limit_sent = true;
      telemetry::send(pid, telemetry::kCmdSetSoftLimit, w.limits.soft, 1000);
    }
  }
  // The fork server's memory is the fleet's too: what the workers share with
  // it is counted once, here (under PSS; under RSS, once per worker as well).
  zygote_mem_ = zygote_alive() ? process_memory(zygote_->pid(), o_.metric) : 0;
  total_ += zygote_mem_;
}

void Fleet::watch_cgroup() {
  if (!cgroup_) return;
  if (auto e = proc::read_events(*cgroup_)) {
    if (e->oom_kill > events_.oom_kill) counters_.oom_kills += e->oom_kill - events_.oom_kill;
    if (e->oom_kill > events_.oom_kill)
      log_.event("oom",
                 "the kernel OOM-killed " + std::to_string(e->oom_kill - events_.oom_kill) +
                     " process(es) in the cgroup " + cgroup_->dir,
                 {{"oom_kill", e->oom_kill}, {"cgroup", cgroup_->dir}});
    events_ = *e;
  }
  if (auto p = proc::read_pressure_avg10(*cgroup_)) {
    bool high = *p >= 10.0;
    if (high && !pressure_high_) {
      log_.event("pressure", "memory pressure in the cgroup: some avg10 " + std::to_string(*p) + "%; trimming all",
                 {{"avg10", *p}});
      last_fleet_trim_ = now_s();
      for (auto& [pid, w] : workers_)
        if (w.can_trim && !w.stopping) trim(w, "memory pressure");
    }
    pressure_high_ = high;
  }
}

void Fleet::tick() {
  auto children = proc::children_by_parent();
  if (o_.children) discover_children(children);
  sample(children);
  watch_cgroup();
  if (shutting_down_) return;

  FleetView view;
  view.total = total_;
  view.since_fleet_trim_s = now_s() - last_fleet_trim_;
  pid_t master = o_.children && !slots_.empty() ? slots_[0].pid : 0;
  double now = now_s();
  for (auto& [pid, w] : workers_) {
    if (pid == master) continue;
    WorkerView v;
    v.id = static_cast<int>(pid);  // decisions name workers by pid
    v.mem = w.mem;
    v.age_s = now - w.started;
    v.since_trim_s = now - w.last_trim;
    v.can_trim = w.can_trim;
    v.stopping = w.stopping;
    v.limits = w.limits;
    view.workers.push_back(v);
  }
  for (const Decision& d : decide(o_.policy, view)) {
    auto it = workers_.find(static_cast<pid_t>(d.id));
    if (it == workers_.end()) continue;
    if (d.action == Action::kTrim) {
      if (d.reason == "fleet budget") last_fleet_trim_ = now;
      trim(it->second, d.reason);
    } else {
      recycle(it->second, d.reason);
    }
  }
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
  Worker w = it->second;
  workers_.erase(it);
  double now = now_s();
  double uptime = now - w.started;
  std::string how = WIFEXITED(status) ? "exited with status " + std::to_string(WEXITSTATUS(status))
                                      : "killed by " + signame(WTERMSIG(status));
  nlohmann::json f = {{"worker", w.id}, {"pid", pid}, {"uptime_s", uptime}};
  if (WIFEXITED(status))
    f["status"] = WEXITSTATUS(status);
  else
    f["signal"] = WTERMSIG(status);
  auto slot = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.pid == pid; });
  if (w.stopping) {
    f["reason"] = w.stop_reason;
    if (w.killed) f["killed"] = true;
    log_.event("exit",
               fmt_worker(w.id, pid) + " " + how + " after " + seconds(uptime) + " (stopped: " + w.stop_reason + ")",
               f);
    if (slot != slots_.end()) {
      slot->pid = 0;
      if (!shutting_down_ && !slot->retired) start_slot(*slot, "replaces a recycled worker");
    }
    return;
  }
  if (slot == slots_.end()) {
    log_.event("exit", fmt_worker(w.id, pid) + " " + how + " after " + seconds(uptime), f);
    return;
  }
  slot->pid = 0;
  if (shutting_down_) {
    log_.event("exit", fmt_worker(w.id, pid) + " " + how + " after " + seconds(uptime), f);
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
  std::string text = fmt_worker(w.id, pid) + " " + how + " after " + seconds(uptime) + " (unexpected); ";
  if (delay > 0)
    text += "crash loop: " + std::to_string(slot->quick_exits) + " exits within " + seconds(o_.min_uptime_s) +
            " of start in a row, restarting in " + seconds(delay);
  else
    text += "restarting";
  log_.event("exit", text, f);
}

// ---- the fork server of --preload

bool Fleet::start_zygote(std::unique_ptr<Zygote>& z, const char* why) {
  auto fresh = std::make_unique<Zygote>();
  std::string err;
  if (!fresh->start(o_.python, o_.preload, o_.python_dir, o_.env, o_.stop_signal, &err)) {
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
  log_.event(
      "shutdown",
      std::string(why) + ": stopping " + std::to_string(workers_.size()) + " worker(s), grace " + seconds(o_.grace_s),
      {{"workers", workers_.size()}, {"grace_s", o_.grace_s}});
  pid_t master = o_.children && !slots_.empty() ? slots_[0].pid : 0;
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
               fmt_worker(w.id, pid) + " still running " + seconds(o_.grace_s) + " after " + signame(o_.stop_signal) +
                   ": SIGKILL",
               {{"worker", w.id}, {"pid", pid}, {"reason", w.stop_reason}});
    kill(-pid, SIGKILL);  // its process group: helpers it started go too
    kill(pid, SIGKILL);
  }
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
    log_.event("config", text,
               {{"workers", n},
                {"children", o_.children},
                {"metric", metric_name(o_.metric)},
                {"soft_limit", o_.policy.soft_limit},
                {"hard_limit", o_.policy.hard_limit},
                {"total_limit", o_.policy.total_limit},
                {"max_age_s", o_.policy.max_age_s},
                {"jitter", o_.policy.jitter}});
  }
  if (!o_.preload.empty()) {
    use_zygote_ = true;
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
  return code;
}

}  // namespace

int run(const Options& o) {
  Fleet f(o);
  return f.run();
}

}  // namespace ebb::supervisor
