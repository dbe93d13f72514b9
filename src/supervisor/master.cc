#include "master.h"

#include <signal.h>

#include <string_view>

namespace ebb::supervisor {

namespace {

std::string_view basename(std::string_view path) {
  size_t slash = path.rfind('/');
  return slash == std::string_view::npos ? path : path.substr(slash + 1);
}

bool is_python(std::string_view exe) { return exe.rfind("python", 0) == 0; }

// What the command runs: the program's name, the module after `python -m`,
// or the script a Python interpreter is given.
std::string program(const std::vector<std::string>& command) {
  size_t i = 0;
  if (i < command.size() && basename(command[i]) == "env") {
    for (i++; i < command.size() && (command[i].find('=') != std::string::npos || command[i][0] == '-'); i++) {
    }
  }
  if (i >= command.size()) return "";
  std::string_view exe = basename(command[i]);
  if (!is_python(exe)) return std::string(exe);
  for (i++; i < command.size(); i++) {
    const std::string& a = command[i];
    if (a == "-m" && i + 1 < command.size()) return command[i + 1];
    if (a.rfind("-m", 0) == 0 && a.size() > 2) return a.substr(2);
    if (a == "-c") return "";  // code on the command line: nothing to recognise
    if (a.empty() || a[0] != '-') return std::string(basename(a));
  }
  return "";
}

// Whether the command runs its program as `python -m MODULE`.
bool run_as_module(const std::vector<std::string>& command) {
  size_t i = 0;
  while (i < command.size() && !is_python(basename(command[i]))) i++;
  for (i++; i < command.size(); i++) {
    const std::string& a = command[i];
    if (a.rfind("-m", 0) == 0) return true;
    if (a.empty() || a[0] != '-' || a == "-c") return false;
  }
  return false;
}

// The value of a command-line option: `--name VALUE`, `--name=VALUE` or
// `-s VALUE` (short may be empty); the last one given wins.
std::string option(const std::vector<std::string>& command, const std::string& name, const std::string& short_name) {
  std::string value;
  for (size_t i = 0; i < command.size(); i++) {
    const std::string& a = command[i];
    if ((a == name || (!short_name.empty() && a == short_name)) && i + 1 < command.size())
      value = command[i + 1];
    else if (a.rfind(name + "=", 0) == 0)
      value = a.substr(name.size() + 1);
  }
  return value;
}

}  // namespace

Master recognize_master(const std::vector<std::string>& command) {
  std::string prog = program(command);
  Master m;
  if (prog == "gunicorn") {
    m.kind = MasterKind::kGunicorn;
    m.name = "gunicorn";
    m.child_stop_signal = SIGTERM;
    m.note = "its workers finish their requests on SIGTERM (within --graceful-timeout)";
    // On SIGUSR2 gunicorn re-executes sys.argv. Started with -m, that is
    // gunicorn/__main__.py run as a script: its directory comes first on
    // sys.path and gunicorn/http hides the standard library's http, so the
    // new master's workers fail to boot (measured with gunicorn 20.1).
    m.handover = !run_as_module(command);
    if (!m.handover)
      m.handover_note =
          "started as `python -m gunicorn`, whose re-exec on SIGUSR2 cannot boot workers (gunicorn/http hides "
          "the standard library's http); a restart stops it, then starts it (connections are refused "
          "meanwhile): start it as `gunicorn ...` for a handover without a gap";
    // gunicorn runs gthread workers for --worker-class gthread, and for the
    // default class when --threads is above 1.
    std::string cls = option(command, "--worker-class", "-k");
    std::string threads = option(command, "--threads", "");
    bool threaded = cls == "gthread" || ((cls.empty() || cls == "sync") && !threads.empty() && threads != "1");
    if (threaded)
      m.warning =
          "plain gthread workers reset keep-alive connections when they stop; use --worker-class "
          "ebb.gthread.ThreadWorker (python/ebb/gthread.py)";
  } else if (prog == "ebb.celery") {
    m.kind = MasterKind::kEbbCelery;
    m.name = "celery (python3 -m ebb.celery)";
    m.child_stop_signal = SIGINT;
    m.note = "ebb.celery makes a pool process finish its task on SIGINT";
  } else if (prog == "celery") {
    m.kind = MasterKind::kCelery;
    m.name = "celery";
    m.note =
        "billiard's pool processes exit mid-task on SIGTERM and the task is lost; start the worker as "
        "`python3 -m ebb.celery ...` (or call ebb.celery.install(app) and pass --stop-signal INT)";
  } else {
    m.name = prog.empty() ? "unknown" : prog;
    m.note = "ebb does not know which signal its children finish their work on; name it with --stop-signal";
  }
  if (m.kind == MasterKind::kEbbCelery) {
    m.drain_signal = SIGUSR2;  // python/ebb/celery.py
    // The new master takes over once it runs as many pool processes as the
    // old one: a pool whose size changes, or that has no processes, never
    // gets there, and every restart would end in --handover-timeout.
    std::string pool = option(command, "--pool", "-P");
    if (!pool.empty() && pool != "prefork")
      m.restart_refused = "a new master takes over once it runs as many pool processes as the old one, and the " +
                          pool + " pool has none; run the prefork pool, or drop --master-hard-limit";
    else if (!option(command, "--autoscale", "").empty())
      m.restart_refused =
          "a new master takes over once it runs as many pool processes as the old one, and --autoscale changes "
          "that count; give a fixed --concurrency, or drop --master-hard-limit";
  }
  if (m.kind == MasterKind::kCelery) {
    // Measured with Celery 5.2 / billiard 4.1: the prefork master writes a
    // job to a pool process's pipe in pieces from its event loop; a warm
    // shutdown can stop the loop mid-job, and the pool process then waits
    // for the rest while the master waits for it (docs/run.md). ebb.celery
    // drains first instead.
    m.restart_refused =
        "Celery's warm shutdown can hang with a job half written to a pool process (2 of 4 SIGTERMs to a "
        "busy prefork worker with 200 KB arguments; Celery 5.2), and a master killed after the grace loses "
        "its tasks; start the worker as `python3 -m ebb.celery ...`, whose master drains first";
  }
  return m;
}

}  // namespace ebb::supervisor
