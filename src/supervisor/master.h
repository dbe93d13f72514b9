// --children: which master COMMAND starts, and which signal its children
// take as "finish what you are doing, then exit".
//
// ebb recycles one child of a master by signalling it. What that signal
// does is the master's business: gunicorn's workers finish their requests
// on SIGTERM; billiard's pool processes (Celery prefork) exit at once on
// SIGTERM and lose their task, and finish it only on the signal that
// ebb.celery teaches them (python/ebb/celery.py). So ebb recycles the
// children of a master only when it knows such a signal, or the user names
// one with --stop-signal.
#pragma once

#include <string>
#include <vector>

namespace ebb::supervisor {

enum class MasterKind { kUnknown, kGunicorn, kCelery, kEbbCelery };

struct Master {
  MasterKind kind = MasterKind::kUnknown;
  std::string name;           // for the log: "gunicorn", "celery (python3 -m ebb.celery)"...
  int child_stop_signal = 0;  // graceful for its children; 0: no such signal known
  std::string note;           // why that signal, or why none
  std::string warning;        // a known risk of this master's setup, for the log; empty: none
  // --master-hard-limit: the master can hand over to a new one it forks
  // (gunicorn's SIGUSR2) instead of stopping, then starting again.
  bool handover = false;
  std::string handover_note;  // why not, when it is a gunicorn that cannot
  // --master-hard-limit: a signal on which the master stops taking work,
  // finishes what it took and exits (ebb.celery's SIGUSR2), so its successor
  // can start at once; 0: none.
  int drain_signal = 0;
  // Why --master-hard-limit is refused for this master; empty: offered.
  std::string restart_refused;
};

// Recognises the master from its command line: `gunicorn ...`,
// `python3 -m gunicorn ...`, `python3 /usr/bin/gunicorn ...`, the same for
// `celery` and `python3 -m ebb.celery` (an `env VAR=value ...` prefix is
// skipped).
Master recognize_master(const std::vector<std::string>& command);

}  // namespace ebb::supervisor
