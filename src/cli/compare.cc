// ebb compare: run a command under several allocators, sample the memory of
// its whole process tree, and report what each allocator costs: peak, final
// and mean RSS, GB·s (the area under the curve: what a fleet pays for), wall
// and CPU time, exit status. Runs are interleaved (A B C A B C) so that drift
// of the machine hits every allocator alike; figures are medians over runs.
#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <thread>

#include "commands.h"
#include "exec.h"
#include "format.h"
#include "launch.h"
#include "plot.h"
#include "proc.h"

namespace ebb::cli {

namespace {

struct CompareOptions {
  std::string allocators = "ebb,system,jemalloc,mimalloc,tcmalloc,pymalloc";
  int runs = 1;
  int interval_ms = 20;
  bool pss = false;
  std::string json;
  std::string plot;
  std::string log = "ebb-compare.log";
  double timeout_s = 600;
  std::vector<std::string> command;
};

struct Run {
  std::vector<Sample> samples;  // t in seconds, bytes
  double wall_s = 0, cpu_s = 0;
  int exit_code = 0;  // >= 0 exit status, < 0 killed by signal -exit_code
  bool timed_out = false;
  uint64_t peak = 0, final = 0;
  double mean = 0, gb_s = 0;
};

uint64_t tree_memory(pid_t root, bool pss) {
  uint64_t total = 0;
  for (pid_t pid : proc::tree(root)) {
    if (pss) {
      total += proc::read_process(pid).mem.pss;
      continue;
    }
    total += proc::rss_of(pid);
  }
  return total;
}

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

// Runs the command once under `a`, its output appended to log_fd.
Run run_once(const CompareOptions& o, const Allocator& a, int log_fd) {
  std::vector<std::string> env_store = child_environment(a, {});
  std::vector<std::string> args = o.command;
  std::vector<char*> envp = proc::c_strings(env_store), argv = proc::c_strings(args);

  Run r;
  double start = now_s();
  pid_t pid = fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + strerror(errno));
  if (pid == 0) {
    dup2(log_fd, STDOUT_FILENO);
    dup2(log_fd, STDERR_FILENO);
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    execvpe(argv[0], argv.data(), envp.data());
    dprintf(log_fd, "ebb compare: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  int status = 0;
  rusage ru{};
  for (;;) {
    uint64_t mem = tree_memory(pid, o.pss);
    double t = now_s() - start;
    pid_t done = wait4(pid, &status, WNOHANG, &ru);
    if (done == pid) break;
    if (mem > 0) r.samples.push_back({t, mem});
    if (t > o.timeout_s) {
      r.timed_out = true;
      for (pid_t p : proc::tree(pid)) kill(p, SIGKILL);
      wait4(pid, &status, 0, &ru);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(o.interval_ms));
  }
  r.wall_s = now_s() - start;
  r.cpu_s = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
            static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
  for (size_t i = 0; i < r.samples.size(); i++) {
    const Sample& s = r.samples[i];
    r.peak = std::max(r.peak, s.bytes);
    double next_t = i + 1 < r.samples.size() ? r.samples[i + 1].t : r.wall_s;
    r.gb_s += static_cast<double>(s.bytes) / 1e9 * (next_t - s.t);  // step function between samples
  }
  if (!r.samples.empty()) {
    r.final = r.samples.back().bytes;
    double span = r.wall_s - r.samples.front().t;
    r.mean = span > 0 ? r.gb_s * 1e9 / span : static_cast<double>(r.final);
  }
  return r;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

int run_compare(const CompareOptions& o) {
  if (!runnable(o.command.front())) {
    error("compare", fmt::format("{}: command not found", o.command.front()));
    return 127;
  }
  std::vector<Allocator> allocs;
  std::string names = o.allocators;
  size_t at = 0;
  while (at <= names.size()) {
    size_t comma = names.find(',', at);
    std::string name = names.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    at = comma == std::string::npos ? names.size() + 1 : comma + 1;
    if (name.empty()) continue;
    std::string why;
    if (auto a = resolve(name, &why))
      allocs.push_back(*a);
    else
      error("compare", fmt::format("skipping {}: {}", name, why));
  }
  if (allocs.empty()) {
    error("compare", "no allocator left to compare");
    return 2;
  }
  int log_fd = open(o.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    error("compare", fmt::format("cannot write the log {}: {}", o.log, strerror(errno)));
    return 2;
  }
  std::vector<std::vector<Run>> runs(allocs.size());
  for (int r = 0; r < o.runs; r++)
    for (size_t i = 0; i < allocs.size(); i++) {
      dprintf(log_fd, "=== run %d/%d, %s ===\n", r + 1, o.runs, allocs[i].name.c_str());
      fmt::print(stderr, "run {}/{}: {}\n", r + 1, o.runs, allocs[i].name);
      runs[i].push_back(run_once(o, allocs[i], log_fd));
    }
  close(log_fd);

  // Medians per allocator; the curve shown is the run whose GB·s is the median.
  const char* what = o.pss ? "PSS" : "RSS";
  Table t({"ALLOCATOR", fmt::format("PEAK {}", what), fmt::format("FINAL {}", what), fmt::format("MEAN {}", what),
           "GB*S", "WALL", "CPU", "EXIT"},
          {false, true, true, true, true, true, true, true});
  nlohmann::json out;
  out["command"] = o.command;
  out["metric"] = o.pss ? "pss" : "rss";
  out["runs"] = o.runs;
  out["interval_ms"] = o.interval_ms;
  out["log"] = o.log;
  out["allocators"] = nlohmann::json::array();
  std::vector<Series> curves;
  int rc = 0;
  for (size_t i = 0; i < allocs.size(); i++) {
    auto med = [&](auto field) {
      std::vector<double> v;
      for (const Run& r : runs[i]) v.push_back(field(r));
      return median(v);
    };
    double peak = med([](const Run& r) { return static_cast<double>(r.peak); });
    double final = med([](const Run& r) { return static_cast<double>(r.final); });
    double mean = med([](const Run& r) { return r.mean; });
    double gb_s = med([](const Run& r) { return r.gb_s; });
    double wall = med([](const Run& r) { return r.wall_s; });
    double cpu = med([](const Run& r) { return r.cpu_s; });
    std::vector<std::string> exits;
    for (const Run& r : runs[i]) {
      exits.push_back(r.timed_out        ? "timeout"
                      : r.exit_code >= 0 ? std::to_string(r.exit_code)
                                         : "signal " + std::to_string(-r.exit_code));
      if (r.timed_out || r.exit_code != 0) rc = 1;
    }
    std::string exit_cell = exits.front();
    if (std::any_of(exits.begin(), exits.end(), [&](const std::string& e) { return e != exits.front(); }))
      exit_cell = "mixed";
    t.add({allocs[i].name, human_bytes(static_cast<uint64_t>(peak)), human_bytes(static_cast<uint64_t>(final)),
           human_bytes(static_cast<uint64_t>(mean)), fmt::format("{:.3f}", gb_s), fmt::format("{:.2f}s", wall),
           fmt::format("{:.2f}s", cpu), exit_cell});

    std::vector<const Run*> by_cost;
    for (const Run& r : runs[i]) by_cost.push_back(&r);
    std::sort(by_cost.begin(), by_cost.end(), [](const Run* a, const Run* b) { return a->gb_s < b->gb_s; });
    curves.push_back({allocs[i].name, by_cost[by_cost.size() / 2]->samples});

    nlohmann::json a = {
        {"name", allocs[i].name},
        {"library", allocs[i].preload},
        {"pythonmalloc", allocs[i].python_malloc ? "malloc" : ""},
        {"median",
         {{"peak", peak}, {"final", final}, {"mean", mean}, {"gb_s", gb_s}, {"wall_s", wall}, {"cpu_s", cpu}}},
        {"runs", nlohmann::json::array()}};
    for (const Run& r : runs[i]) {
      nlohmann::json jr = {{"peak", r.peak},     {"final", r.final}, {"mean", r.mean},      {"gb_s", r.gb_s},
                           {"wall_s", r.wall_s}, {"cpu_s", r.cpu_s}, {"exit", r.exit_code}, {"timed_out", r.timed_out}};
      jr["samples"] = nlohmann::json::array();
      for (const Sample& s : r.samples) jr["samples"].push_back({s.t, s.bytes});
      a["runs"].push_back(jr);
    }
    out["allocators"].push_back(a);
  }
  if (o.json != "-") fmt::print("{}", t.render());
  if (!o.plot.empty()) {
    std::string title = "ebb compare: ";
    for (const auto& w : o.command) title += w + " ";
    std::string err;
    if (!write_plot(o.plot, title, fmt::format("{} (MB)", what), curves, t.render(), &err)) {
      error("compare", err);
      rc = 2;
    } else if (o.json != "-") {
      fmt::print("plot: {}\n", o.plot);
    }
  }
  if (!o.json.empty()) {
    if (o.json == "-") {
      fmt::print("{}\n", out.dump(1));
    } else {
      std::ofstream f(o.json);
      f << out.dump(1) << "\n";
      if (!f) {
        error("compare", "cannot write " + o.json);
        rc = 2;
      }
    }
  }
  if (o.json != "-") fmt::print("command output: {}\n", o.log);
  return rc;
}

}  // namespace

void register_compare(CLI::App& app, int& rc) {
  auto o = std::make_shared<CompareOptions>();
  auto* sub = app.add_subcommand("compare", "Run a command under several allocators and compare their memory");
  sub->add_option("--allocators", o->allocators,
                  "Comma-separated: ebb, system, jemalloc, mimalloc, tcmalloc, pymalloc, or library paths");
  sub->add_option("--runs", o->runs, "Runs per allocator, interleaved; medians are reported (default: 1)")
      ->check(CLI::Range(1, 100));
  sub->add_option("--interval", o->interval_ms, "Sampling interval in ms (default: 20)")->check(CLI::Range(5, 1000));
  sub->add_flag("--pss", o->pss, "Sample PSS instead of RSS (slower to read, fair to forked workers)");
  sub->add_option("--json", o->json, "Write every figure and sample as JSON to FILE ('-': stdout)");
  sub->add_option("--plot", o->plot, "Draw the memory curves to FILE: .svg, or .html (a self-contained page)");
  sub->add_option("--log", o->log, "Where the command's own output goes (default: ebb-compare.log)");
  sub->add_option("--timeout", o->timeout_s, "Seconds before a run is killed (default: 600)")
      ->check(CLI::Range(0.1, 86400.0));
  sub->add_option("command", o->command, "The command to run, after --")->required();
  sub->callback([o, &rc] { rc = run_compare(*o); });
}

}  // namespace ebb::cli
