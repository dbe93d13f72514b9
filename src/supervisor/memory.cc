// What every tick does: sample each worker's memory, give the policy its
// view, trim or recycle as it decides; watch the cgroup for OOM kills and
// pressure.
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include "reader.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "fleet.h"

namespace ebb::supervisor {

uint64_t process_memory(pid_t pid, Metric m) {
  if (m == Metric::kRss) return proc::rss_of(pid);
  proc::Process p = proc::read_process(pid);
  return m == Metric::kPss ? p.mem.pss : p.mem.uss;
}

void Fleet::trim(Worker& w, const std::string& reason) {
  w.last_trim = now_s();
  telemetry::Ack ack = telemetry::send(w.pid, telemetry::kCmdTrim, 0, 1000);
  nlohmann::json f = {
      {"worker", w.id}, {"pid", w.pid}, {"reason", reason}, {"metric", metric_name(o_.metric)}, {"mem", w.mem}};
  if (ack.status != telemetry::Status::kOk) {
    f["error"] = ack.message;
    log_.event("trim", label(w.id, w.pid) + " trim (" + reason + ") failed: " + ack.message, f);
    return;
  }
  f["rss_before"] = ack.rss_before;
  f["rss_after"] = ack.rss_after;
  f["released"] = ack.released;
  w.trims++;
  counters_.trims++;
  counters_.released_bytes += ack.released;
  log_.event("trim",
             label(w.id, w.pid) + " trim (" + reason + "): " + metric_name(o_.metric) + " " + mib(w.mem) + ", rss " +
                 mib(ack.rss_before) + " -> " + mib(ack.rss_after) + ", released " + mib(ack.released),
             f);
}

void Fleet::sample(const proc::ChildMap& children) {
  total_ = 0;
  for (auto& [pid, w] : workers_) {
    uint64_t mem = 0;
    if (is_any_master(w)) {
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
  if (o_.children) continue_handover(children);
  sample(children);
  watch_cgroup();
  if (shutting_down_) return;

  FleetView view;
  view.total = total_;
  view.since_fleet_trim_s = now_s() - last_fleet_trim_;
  pid_t master = o_.children && !slots_.empty() ? slots_[0].pid : 0;
  double now = now_s();
  for (auto& [pid, w] : workers_) {
    WorkerView v;
    v.master = is_any_master(w);
    v.id = static_cast<int>(pid);  // decisions name workers by pid
    v.mem = w.mem;
    v.age_s = now - w.started;
    v.since_trim_s = now - w.last_trim;
    v.can_trim = w.can_trim;
    v.stopping = w.stopping;
    // A master is held (trimmed, not restarted) while a restart is under way
    // or was just tried: one at a time. A child whose recycle was refused is
    // held too: asked again each tick, the largest one would keep the one
    // recycling place, and a second child over its limit would never be seen.
    v.hold = (v.master &&
              (pid != master || handover_.from == pid || now < master_restart_after_ || old_master_draining())) ||
             w.recycle_refused;
    v.limits = w.limits;
    view.workers.push_back(v);
  }
  for (const Decision& d : decide(o_.policy, view)) {
    auto it = workers_.find(static_cast<pid_t>(d.id));
    if (it == workers_.end()) continue;
    if (d.action == Action::kTrim) {
      if (d.reason == "fleet budget") last_fleet_trim_ = now;
      trim(it->second, d.reason);
    } else if (o_.children && !o_.recycle_children && !is_master(it->second.pid)) {
      refuse_recycle(it->second, d.reason);
    } else {
      recycle(it->second, d.reason);
    }
  }
}

}  // namespace ebb::supervisor
