// `ebb run`: start a fleet of workers and keep it under its memory budget.
//
// One thread, one loop: a signalfd delivers SIGCHLD and the control signals,
// and every --interval the loop samples each worker's memory, asks the policy
// (policy.h) what to do, and does it: trim through the worker's telemetry
// page, or recycle it (stop signal, grace, KILL) with a replacement started
// first when the budget allows. Every decision is one log line.
#pragma once

#include <signal.h>

#include <cstdint>
#include <string>
#include <vector>

#include "master.h"
#include "policy.h"
#include "zygote.h"

namespace ebb::supervisor {

enum class Metric { kRss, kPss, kUss };
enum class LogFormat { kHuman, kJson };

const char* metric_name(Metric m);

struct Options {
  std::vector<std::string> command;  // argv of each worker (or of the master with `children`)
  std::vector<std::string> env;      // the workers' whole environment, NAME=value
  unsigned workers = 1;
  bool children = false;  // one COMMAND that forks its own workers: police its children
  Policy policy;
  bool total_from_cgroup = false;  // policy.total_limit came from the cgroup (for the log)
  Metric metric = Metric::kPss;
  int stop_signal = SIGTERM;  // what a recycled worker gets (with `children`: a child of the master)
  // With `children`: what COMMAND is (master.h). Its children are recycled
  // only with a stop signal they finish their work on; without one
  // (recycle_children false) ebb trims them but never stops them. The
  // master itself always gets SIGTERM: a warm shutdown for gunicorn and
  // Celery.
  Master master;
  bool recycle_children = true;
  bool stop_signal_named = false;  // --stop-signal was given (for the log)
  // With `children`: the master is trimmed at the soft limit like a worker;
  // above this (after a trim) it is restarted warmly (master_restart.cc).
  // 0: never restarted for its memory.
  uint64_t master_hard_limit = 0;
  // The new master must run its workers (its pool) within this, plus
  // min_uptime_s; also the first wait after a failed restart (it doubles).
  double handover_timeout_s = 60;
  double grace_s = 30;
  double interval_s = 1;
  double min_uptime_s = 5;  // a worker that exits sooner counts toward a crash loop
  LogFormat log_format = LogFormat::kHuman;
  std::string cgroup_dir;     // watched for OOM kills and pressure; empty: none
  std::string status_socket;  // unix socket answering the fleet's status as JSON; empty: none
  std::string metrics;        // HOST:PORT of the Prometheus endpoint; empty: none
  // --profile: every worker writes an allocation capture (docs/profile.md),
  // <profile_prefix>.w<ID>.<pid>.ebbprof (the master: .master.), one byte in
  // profile_rate sampled. Empty: no profiling.
  std::string profile_prefix;
  uint64_t profile_rate = 524288;
  bool profile_native = false;  // native stacks too

  // --preload: workers are forked from a Python fork server (zygote.h) that
  // imported these modules once. Empty: each worker is `command`, exec'd.
  std::vector<std::string> preload;
  PythonCommand python;            // `command`, split for the fork server
  std::string python_dir;          // where the ebb Python package is
  bool preload_fallback = false;   // if the fork server fails: exec workers instead of exiting
  double preload_timeout_s = 120;  // the imports must be done by then
};

// Runs until TERM or INT has stopped every worker. Returns the exit status:
// 0 when every worker stopped within its grace, 1 when one had to be killed
// or the fleet was crash-looping at the end, 2 when the status socket or the
// metrics endpoint cannot be set up (then nothing is started). With
// --preload, a fork server that cannot import its modules stops the fleet
// with status 1 unless preload_fallback.
int run(const Options& o);

}  // namespace ebb::supervisor
