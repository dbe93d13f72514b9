// ebb run: the command line of the supervisor (src/supervisor/). Everything
// is checked before anything starts: a bad option is a one-line error and
// exit status 2, a command that cannot be found 127.
#include <signal.h>
#include <string.h>

#include <fmt/core.h>

#include <memory>

#include "cgroup.h"
#include "commands.h"
#include "format.h"
#include "launch.h"
#include "supervisor.h"

namespace ebb::cli {

namespace {

struct RunArgs {
  unsigned workers = 1;
  std::string allocator = "ebb";
  std::string soft, hard, total, master_hard;
  std::string metric = "pss";
  std::string stop_signal = "TERM";
  bool stop_signal_named = false;  // given on the command line
  std::string grace = "30s";
  std::string max_age;
  double jitter_pct = 10;
  unsigned max_recycling = 1;
  bool children = false;
  std::string interval = "1s";
  std::string min_uptime = "5s";
  std::string handover_timeout = "60s";
  std::string trim_cooldown = "10s";
  std::string log_format = "human";
  std::string status_socket;
  std::string metrics;
  std::vector<std::string> preload;
  bool preload_fallback = false;
  std::string preload_timeout = "120s";
  std::string profile;  // capture prefix; "" off
  std::string profile_rate = "512K";
  bool profile_native = false;
  std::vector<std::string> command;
};

// "TERM", "SIGTERM", "term" or a number.
int parse_signal(const std::string& text) {
  if (!text.empty() && text.find_first_not_of("0123456789") == std::string::npos) {
    int n = std::stoi(text);
    return n > 0 && n < NSIG ? n : -1;
  }
  std::string name = text;
  for (auto& c : name) c = static_cast<char>(toupper(static_cast<unsigned char>(c)));
  if (name.rfind("SIG", 0) == 0) name = name.substr(3);
  for (int sig = 1; sig < NSIG; sig++) {
    const char* abbrev = sigabbrev_np(sig);
    if (abbrev != nullptr && name == abbrev) return sig;
  }
  return -1;
}

CLI::Validator size_check(bool allow_none) {
  return CLI::Validator(
      [allow_none](std::string& s) -> std::string {
        uint64_t v;
        if (allow_none && (s == "none" || s == "0")) return "";
        if (!parse_size(s, &v) || v == 0) return "bad size '" + s + "' (examples: 512M, 2G, 1.5GiB)";
        return "";
      },
      "SIZE");
}

CLI::Validator duration_check() {
  return CLI::Validator(
      [](std::string& s) -> std::string {
        double v;
        if (!parse_duration(s, &v)) return "bad duration '" + s + "' (examples: 30s, 500ms, 5m, 2h)";
        return "";
      },
      "DURATION");
}

double seconds_of(const std::string& s) {
  double v = 0;
  parse_duration(s, &v);
  return v;
}

uint64_t bytes_of(const std::string& s) {
  uint64_t v = 0;
  if (s.empty() || s == "none") return 0;
  parse_size(s, &v);
  return v;
}

int run_run(const RunArgs& a) {
  if (a.command.empty()) {
    error("run", "missing command: ebb run [options] -- COMMAND [ARGS...]");
    return 2;
  }
  std::string why;
  auto alloc = resolve(a.allocator, &why);
  if (!alloc) {
    error("run", fmt::format("--allocator {}: {}", a.allocator, why));
    return 2;
  }
  if (!runnable(a.command.front())) {
    error("run", fmt::format("{}: command not found", a.command.front()));
    return 127;
  }
  supervisor::Options o;
  if (!a.preload.empty()) {
    if (a.children) {
      error("run", "--preload and --children do not go together: with --preload, ebb forks the workers itself");
      return 2;
    }
    auto py = supervisor::python_command(a.command, &why);
    if (!py) {
      error("run", "--preload: " + why);
      return 2;
    }
    if (!runnable(py->interpreter.front())) {
      error("run", fmt::format("{}: command not found", py->interpreter.front()));
      return 127;
    }
    o.python_dir = python_package_dir(&why);
    if (o.python_dir.empty()) {
      error("run", "--preload: " + why);
      return 2;
    }
    o.python = *py;
    o.preload = a.preload;
    o.preload_fallback = a.preload_fallback;
    o.preload_timeout_s = seconds_of(a.preload_timeout);
  }
  if (!a.profile.empty()) {
    uint64_t rate = 0;
    if (alloc->name != "ebb") {
      error("run", "--profile needs --allocator ebb (the profiler is part of libebb)");
      return 2;
    }
    if (a.profile_rate == "all")
      rate = 1;
    else if (!parse_size(a.profile_rate, &rate) || rate < 2 || rate > UINT32_MAX) {
      error("run", "--profile-rate wants a size from 2 bytes to 4G (for example 512K), or all");
      return 2;
    }
    o.profile_prefix = a.profile;
    if (o.profile_prefix[0] != '/') {
      char cwd[4096];
      if (getcwd(cwd, sizeof cwd) != nullptr) o.profile_prefix = std::string(cwd) + "/" + o.profile_prefix;
    }
    const size_t slash = o.profile_prefix.rfind('/');
    const std::string dir = slash == 0 ? "/" : o.profile_prefix.substr(0, slash);
    if (access(dir.c_str(), W_OK) != 0) {
      error("run", fmt::format("--profile: cannot write captures in {}: {}", dir, strerror(errno)));
      return 2;
    }
    if (o.profile_prefix.size() > 180) {
      error("run", "--profile: the capture prefix is too long (at most 180 bytes as an absolute path)");
      return 2;
    }
    o.profile_rate = rate;
    o.profile_native = a.profile_native;
  } else if (a.profile_native) {
    error("run", "--profile-native goes with --profile");
    return 2;
  }
  o.command = a.command;
  o.env = child_environment(*alloc, {"EBB_TELEMETRY=1"});
  o.workers = a.workers;
  o.children = a.children;
  o.policy.soft_limit = bytes_of(a.soft);
  o.policy.hard_limit = bytes_of(a.hard);
  o.master_hard_limit = bytes_of(a.master_hard);
  if (o.master_hard_limit && !a.children) {
    error("run", "--master-hard-limit needs --children (without it, ebb is the master)");
    return 2;
  }
  o.policy.max_age_s = a.max_age.empty() ? 0 : seconds_of(a.max_age);
  o.policy.jitter = a.jitter_pct / 100.0;
  o.policy.max_recycling = a.max_recycling;
  o.policy.trim_cooldown_s = seconds_of(a.trim_cooldown);
  o.metric = a.metric == "rss"   ? supervisor::Metric::kRss
             : a.metric == "uss" ? supervisor::Metric::kUss
                                 : supervisor::Metric::kPss;
  o.stop_signal = parse_signal(a.stop_signal);
  o.stop_signal_named = a.stop_signal_named;
  if (a.children) {
    // The master's children are recycled only with a signal they finish
    // their work on: the master's own (master.h), or the one the user names.
    o.master = supervisor::recognize_master(a.command);
    if (o.master_hard_limit && !o.master.restart_refused.empty()) {
      error("run", "--master-hard-limit with " + o.master.name + ": " + o.master.restart_refused);
      return 2;
    }
    if (!a.stop_signal_named) {
      o.stop_signal = o.master.child_stop_signal;
      o.recycle_children = o.stop_signal != 0;
      if (!o.recycle_children) o.stop_signal = SIGTERM;  // what orphaned children get at shutdown
    }
  }
  o.grace_s = seconds_of(a.grace);
  o.interval_s = seconds_of(a.interval);
  o.min_uptime_s = seconds_of(a.min_uptime);
  o.handover_timeout_s = seconds_of(a.handover_timeout);
  o.status_socket = a.status_socket;
  o.metrics = a.metrics;
  o.log_format = a.log_format == "json" ? supervisor::LogFormat::kJson : supervisor::LogFormat::kHuman;
  if (o.interval_s < 0.05) {
    error("run", "--interval must be at least 50ms");
    return 2;
  }
  if (o.policy.soft_limit && o.policy.hard_limit && o.policy.soft_limit >= o.policy.hard_limit) {
    error("run", "--soft-limit must be below --hard-limit");
    return 2;
  }
  auto cg = proc::self();
  if (cg) o.cgroup_dir = cg->dir;
  if (a.total.empty()) {
    if (cg && proc::default_budget(*cg) != 0) {
      o.policy.total_limit = proc::default_budget(*cg);
      o.total_from_cgroup = true;
    }
  } else {
    o.policy.total_limit = bytes_of(a.total);
  }
  return supervisor::run(o);
}

}  // namespace

void register_run(CLI::App& app, int& rc) {
  auto a = std::make_shared<RunArgs>();
  auto* sub = app.add_subcommand("run", "Run a fleet of workers and keep it under its memory budget");
  sub->footer(
      "Examples:\n"
      "  ebb run -w 4 --soft-limit 300M --hard-limit 400M -- celery -A app worker --pool=solo\n"
      "  ebb run --children --hard-limit 250M -- gunicorn -w 4 app:app\n"
      "  ebb run -w 8 --preload app,pandas -- python3 -m app.worker\n"
      "Signals: TERM/INT stop gracefully (twice: now), HUP rolling restart, TTIN/TTOU add/remove a worker.\n"
      "See docs/run.md.");
  sub->add_option("-w,--workers", a->workers, "Copies of COMMAND to run (default: 1)")->check(CLI::Range(1u, 4096u));
  sub->add_option("--allocator", a->allocator,
                  "ebb, system, jemalloc, mimalloc, tcmalloc, pymalloc or a library path (default: ebb)");
  sub->add_option("--soft-limit", a->soft, "Per worker: above this, ask it to give free memory back")
      ->check(size_check(false));
  sub->add_option("--hard-limit", a->hard, "Per worker: above this after a trim, recycle it gracefully")
      ->check(size_check(false));
  sub->add_option("--master-hard-limit", a->master_hard,
                  "With --children: above this after a trim, restart the master (gunicorn: USR2, then TERM to the "
                  "old one; others: TERM, then a new one; refused for Celery) (default: never)")
      ->check(size_check(false));
  sub->add_option("--total-limit", a->total,
                  "The whole fleet's budget; 'none' for no budget (default: from the cgroup: memory.high, else 90% "
                  "of memory.max)")
      ->check(size_check(true));
  sub->add_option("--metric", a->metric, "What the limits measure: rss, pss or uss (default: pss; see docs/run.md)")
      ->check(CLI::IsMember({"rss", "pss", "uss"}));
  sub->add_option("--stop-signal", a->stop_signal,
                  "Signal that asks a worker to finish and exit (default: TERM; with --children, the one the "
                  "master's children finish their work on: TERM for gunicorn, INT for python3 -m ebb.celery, "
                  "none known for others, whose children are then never recycled)")
      ->each([a](const std::string&) { a->stop_signal_named = true; })
      ->check(CLI::Validator(
          [](std::string& s) -> std::string { return parse_signal(s) < 0 ? "unknown signal '" + s + "'" : ""; },
          "SIGNAL"));
  sub->add_option("--grace", a->grace, "Time a stopping worker gets before SIGKILL (default: 30s)")
      ->check(duration_check());
  sub->add_option("--max-age", a->max_age, "Recycle workers older than this (default: never)")->check(duration_check());
  sub->add_option("--jitter", a->jitter_pct,
                  "Percent by which each worker's limits and age are lowered at random, so workers do not recycle "
                  "together (default: 10)")
      ->check(CLI::Range(0.0, 90.0));
  sub->add_option("--max-recycling", a->max_recycling, "Workers stopping at once, at most (default: 1)")
      ->check(CLI::Range(1u, 4096u));
  sub->add_flag("--children", a->children,
                "Run one COMMAND that forks its own workers (gunicorn, celery prefork) and police its children");
  sub->add_option("--interval", a->interval, "How often memory is sampled (default: 1s)")->check(duration_check());
  sub->add_option("--min-uptime", a->min_uptime,
                  "A worker exiting sooner than this after start counts toward a crash loop (default: 5s)")
      ->check(duration_check());
  sub->add_option("--handover-timeout", a->handover_timeout,
                  "With --master-hard-limit: a new master that has not run its workers within this (plus "
                  "--min-uptime) is stopped and the old one kept; also the first wait before the next try "
                  "(default: 60s)")
      ->check(duration_check());
  sub->add_option("--trim-cooldown", a->trim_cooldown, "Least time between two trims of a worker (default: 10s)")
      ->check(duration_check());
  sub->add_option("--log-format", a->log_format, "human or json (default: human)")
      ->check(CLI::IsMember({"human", "json"}));
  sub->add_option("--status-socket", a->status_socket,
                  "Unix socket (mode 0600) answering the fleet's status as JSON; read by ebb ps --fleet");
  sub->add_option("--metrics", a->metrics,
                  "Serve Prometheus metrics on HOST:PORT (a bare PORT listens on 127.0.0.1 only)");
  sub->add_option("--preload", a->preload,
                  "Import these Python modules once in a fork server and fork every worker from it (copy-on-write "
                  "sharing, gc.freeze); COMMAND must be Python: python3 -m MODULE ..., python3 SCRIPT ... "
                  "(see docs/run.md)")
      ->delimiter(',')
      ->allow_extra_args(false)  // one value per --preload: the command after it is not a module
      ->type_name("MODULE[,MODULE...]");
  sub->add_flag("--preload-fallback", a->preload_fallback,
                "If the fork server cannot import its modules, run the workers as separate processes instead of "
                "stopping (exit 1)");
  sub->add_option("--preload-timeout", a->preload_timeout,
                  "The fork server must have imported everything within this time (default: 120s)")
      ->check(duration_check());
  auto* profile = sub->add_option("--profile", a->profile,
                                  "Profile every worker's allocations: captures PREFIX.w<ID>.<pid>.ebbprof "
                                  "(default PREFIX: ebb-profile; read them with ebb profile report)")
                      ->expected(0, 1)
                      ->option_text("[PREFIX]");
  sub->add_option("--profile-rate", a->profile_rate, "With --profile: one byte in SIZE sampled, or all (default: 512K)")
      ->option_text("SIZE");
  sub->add_flag("--profile-native", a->profile_native, "With --profile: native (C/C++) stacks too");
  sub->add_option("command", a->command, "The worker command, after --")->expected(-1);
  sub->callback([a, profile, &rc]() {
    if (profile->count() > 0 && a->profile.empty()) a->profile = "ebb-profile";
    rc = run_run(*a);
  });
}

}  // namespace ebb::cli
