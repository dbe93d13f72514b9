// The fork server of `ebb run --preload` (a "zygote"): one Python process
// that imports the app once, freezes its heap and forks every worker, so the
// workers share the app's memory copy-on-write and a recycle costs a fork,
// not a re-import. Its Python half is python/ebb/zygote.py, which also
// describes the messages; this is ebb's half.
//
// The worker is forked twice (zygote -> short-lived middle -> worker), so it
// is orphaned at once and adopted by ebb, a child subreaper: ebb waits for it
// like for any worker it started itself.
#pragma once

#include <sys/types.h>

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace ebb::supervisor {

// A worker command split for the zygote: the interpreter with its own flags
// (which the zygote keeps) and what it runs in each worker.
struct PythonCommand {
  std::vector<std::string> interpreter;  // "python3", "-X", "dev", ...
  std::vector<std::string> run;          // "-m" MODULE ARGS, "-c" CODE ARGS, or SCRIPT ARGS
};

// Splits `python3 [FLAGS] (-m MODULE | -c CODE | SCRIPT) [ARGS]`. Commands
// that are not Python, an interactive interpreter (no module, code or
// script) and reading the program from stdin are errors, explained in *why.
std::optional<PythonCommand> split_python_argv(const std::vector<std::string>& argv, std::string* why);

// The same for any command: a Python script run directly (`celery -A app
// worker`: its #! line names a Python interpreter) becomes
// `INTERPRETER SCRIPT ARGS`. Anything else is not Python (*why says so).
std::optional<PythonCommand> python_command(const std::vector<std::string>& argv, std::string* why);

class Zygote {
 public:
  ~Zygote();

  // Starts the zygote: `python_dir` holds the ebb package, `env` is its
  // whole environment (and the workers'). With `imports`, it writes the tree
  // of its imports to <imports>.json and .txt, and each worker what it
  // imports after the fork to <imports>.<pid>.jsonl (docs/imports.md).
  // Returns false with *err when it cannot even be started; import errors
  // come later, as a message.
  bool start(const PythonCommand& cmd, const std::vector<std::string>& modules, const std::string& python_dir,
             std::vector<std::string> env, int stop_signal, const std::string& imports, std::string* err);

  // One message from the zygote, when fd() is readable; nullopt when the
  // socket is closed (the zygote is gone).
  std::optional<nlohmann::json> receive();

  // Asks for a worker for slot `id`, with `env` ("NAME=value") added to its
  // environment. The answer comes later as a message: {"event": "forked",
  // "id", "pid"}, or {"event": "error", "id", "error"}. False with *err if
  // the request cannot be sent.
  bool request_fork(int id, const std::vector<std::string>& env, std::string* err);

  // Closes the socket: the zygote exits by itself.
  void close_socket();

  pid_t pid() const { return pid_; }
  int fd() const { return fd_; }
  bool ready() const { return ready_; }
  void set_ready() { ready_ = true; }
  // Its failure was reported (an import error, a timeout): its exit needs no other word.
  bool failed() const { return failed_; }
  void set_failed() { failed_ = true; }
  // The zygote was reaped: forget it.
  void exited();
  // Reaped, its last messages not read yet: they can no longer make it ready.
  bool reaped() const { return reaped_; }
  void set_reaped() { reaped_ = true; }
  // SIGKILL, unless it was reaped (its pid may belong to another process now).
  void kill_now();

 private:
  pid_t pid_ = 0;
  int fd_ = -1;
  bool ready_ = false;
  bool failed_ = false;
  bool reaped_ = false;
};

}  // namespace ebb::supervisor
