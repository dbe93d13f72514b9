// ebb imports: run a Python command and print what each of its imports keeps
// in memory, as a tree (docs/imports.md).
//
//   ebb imports [--json] [--min SIZE] [--usage] [--for TIME] [--tasks N] [-o FILE] -- COMMAND...
//
// The measuring happens inside the command, under libebb: the hook in the
// Python package (ebb/_imports_boot/sitecustomize.py, put first on PYTHONPATH)
// reads libebb's counters around every import and writes the report at exit,
// or after --for or --tasks; this side starts the command, stops it after
// that, and prints the report.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>

#include "commands.h"
#include "format.h"
#include "launch.h"

namespace ebb::cli {

namespace {

struct ImportsOptions {
  bool json = false;
  bool usage = false;
  std::string min = "64K";
  std::string after;   // --for
  unsigned tasks = 0;  // --tasks
  std::string output;  // -o
  std::vector<std::string> command;
};

bool exists(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0;
}

// A private directory for the report, removed with what is in it.
class TempDir {
 public:
  TempDir() {
    const char* base = getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != 0 ? base : "/tmp") + "/ebb-imports.XXXXXX";
    if (mkdtemp(tmpl.data()) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

bool copy_to(const std::string& from, const std::string& to) {
  std::ifstream in(from);
  if (!in) return false;
  if (to.empty()) {
    std::ostringstream text;
    text << in.rdbuf();
    fmt::print("{}", text.str());
    return std::fflush(stdout) == 0;
  }
  std::ofstream out(to);
  out << in.rdbuf();
  return static_cast<bool>(out);
}

int run_imports(const ImportsOptions& o) {
  uint64_t min = 0;
  if (!parse_size(o.min, &min)) {
    error("imports", fmt::format("--min wants a size such as 64K or 0, not '{}'", o.min));
    return 2;
  }
  double after = 0;
  if (!o.after.empty() && (!parse_duration(o.after, &after) || after <= 0)) {
    error("imports", fmt::format("--for wants a duration such as 30s or 2m, not '{}'", o.after));
    return 2;
  }
  if (o.command.empty()) {
    error("imports",
          "no command: ebb imports [--json] [--min SIZE] [--usage] [--for TIME] [--tasks N] -- COMMAND...  "
          "(or: python3 -m ebb.imports MODULE...)");
    return 2;
  }
  if (!runnable(o.command[0])) {
    error("imports", fmt::format("cannot run {}: not found", o.command[0]));
    return 127;
  }
  std::string why;
  auto alloc = resolve("ebb", &why);
  if (!alloc) {
    error("imports", why);
    return 1;
  }
  const std::string package = python_package_dir(&why);
  if (package.empty()) {
    error("imports", why);
    return 1;
  }
  TempDir dir;
  if (dir.path().empty()) {
    error("imports", fmt::format("cannot make a temporary directory: {}", strerror(errno)));
    return 1;
  }
  const std::string report = dir.path() + "/report";
  std::string pythonpath = package + "/ebb/_imports_boot";
  if (const char* old = getenv("PYTHONPATH"); old != nullptr && *old != 0) pythonpath += std::string(":") + old;
  std::vector<std::string> extra = {"PYTHONPATH=" + pythonpath, "EBB_IMPORTS_OUT=" + report,
                                    std::string("EBB_IMPORTS_FORMAT=") + (o.json ? "json" : "text"),
                                    "EBB_IMPORTS_MIN=" + std::to_string(min)};
  if (o.usage) extra.emplace_back("EBB_IMPORTS_USAGE=1");
  if (after > 0) extra.push_back(fmt::format("EBB_IMPORTS_FOR={}", after));
  if (o.tasks > 0) extra.push_back(fmt::format("EBB_IMPORTS_TASKS={}", o.tasks));
  // With --for or --tasks, the command writes its report after that long or
  // that many tasks, then <report>.stop with its pid, and sends itself
  // SIGTERM (one signal: a second one is a cold shutdown for Celery and RQ).
  // ebb sends SIGKILL if it is still there 10 s later; and if no report came
  // a minute after --for, it says so and stops the command as `kill` would.
  double stopped_at = -1, gave_up_at = -1, waited = 0;
  auto tick = [&](pid_t pid) {
    waited += 0.1;
    if (stopped_at < 0 && gave_up_at < 0 && exists(report + ".stop")) {  // it is stopping
      stopped_at = waited;
    } else if (stopped_at < 0 && gave_up_at < 0 && after > 0 && waited > after + 60) {
      error("imports", fmt::format("no report {:.0f} s after --for {}: stopping the command", waited - after, o.after));
      kill(pid, SIGTERM);
      gave_up_at = waited;
    } else if (std::max(stopped_at, gave_up_at) >= 0 && waited - std::max(stopped_at, gave_up_at) > 10) {
      std::ifstream marker(report + ".stop");
      pid_t measured = 0;
      if (marker >> measured && measured > 0) kill(measured, SIGKILL);  // the Python under a wrapper, if any
      kill(pid, SIGKILL);
      stopped_at = gave_up_at = -1e9;  // once
    }
  };
  int status = 0;
  const int rc = run_command("imports", o.command, child_environment(*alloc, extra),
                             after > 0 || o.tasks > 0 ? std::function<void(pid_t)>(tick) : nullptr, &status);
  if (rc < 0) return 1;
  if (!exists(report)) {
    error("imports", fmt::format("{} wrote no import report (it exited {}): is it a Python program that reads "
                                 "PYTHONPATH (no -E or -I)? A program killed by a signal cannot write one.",
                                 o.command[0],
                                 WIFEXITED(status) ? fmt::format("with status {}", rc)
                                                   : fmt::format("on signal {}", WTERMSIG(status))));
    return rc != 0 ? rc : 1;
  }
  if (!copy_to(report, o.output)) {
    error("imports", fmt::format("cannot write {}: {}", o.output.empty() ? "the report" : o.output, strerror(errno)));
    return 1;
  }
  if (exists(report + ".stop")) return 0;  // it stopped after its report, as asked
  if (rc != 0)
    error("imports",
          fmt::format("the command exited {}", WIFEXITED(status) ? fmt::format("with status {}", rc)
                                                                 : fmt::format("on signal {}", WTERMSIG(status))));
  return rc;
}

}  // namespace

void register_imports(CLI::App& app, int& rc) {
  auto o = std::make_shared<ImportsOptions>();
  auto* sub = app.add_subcommand(
      "imports", "Run a Python command and show what each import keeps in memory, as a tree (docs/imports.md)");
  sub->add_flag("--json", o->json, "Print the report as JSON (every module, never folded)");
  sub->add_option("--min", o->min, "Fold modules keeping less than SIZE in the text report (default: 64K; 0: all)");
  sub->add_flag("--usage", o->usage,
                "Also watch which modules' functions run (slower), and list the others as lazy-import candidates");
  sub->add_option("--for", o->after,
                  "Write the report after this long, e.g. 60s, then stop the command (default: at its exit)");
  sub->add_option("--tasks", o->tasks,
                  "Write the report after the worker's first N tasks, then stop it (ebb.celery with a solo or "
                  "threads pool, ebb.rq.SimpleWorker)")
      ->check(CLI::PositiveNumber);
  sub->add_option("-o,--output", o->output, "Write the report to FILE instead of the standard output");
  sub->add_option("command", o->command, "The Python command to run, after --");
  sub->footer(
      "Examples:\n"
      "  ebb imports -- python3 -c 'import flask'\n"
      "  ebb imports --usage --for 60s -- celery -A proj worker --pool solo\n"
      "  ebb imports --usage --tasks 100 -- python3 -m ebb.celery -A proj worker --pool solo\n"
      "  python3 -m ebb.imports --then 'import app; app.main()' app   (modules only, no ebb binary needed)");
  sub->callback([o, &rc] { rc = run_imports(*o); });
}

}  // namespace ebb::cli
