#include "zygote.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "exec.h"

namespace ebb::supervisor {

namespace {

// The zygote's -c program: find the ebb package (appended, so it shadows
// nothing of the app's), then serve.
constexpr const char* kBoot = "import sys; sys.path.append(sys.argv[1]); from ebb.zygote import main; main()";

std::string basename_of(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// python, python3, python3.11, python3.11d ...
bool is_python_name(const std::string& path) {
  std::string b = basename_of(path);
  if (b.rfind("python", 0) != 0) return false;
  return b.find_first_not_of("0123456789.dmu", 6) == std::string::npos;
}

// Interpreter options that take a value: -W arg, -X opt (or -Warg, -Xopt).
bool takes_value(char c) { return c == 'W' || c == 'X' || c == 'Q'; }

}  // namespace

std::optional<PythonCommand> split_python_argv(const std::vector<std::string>& argv, std::string* why) {
  PythonCommand c;
  c.interpreter.push_back(argv.at(0));
  for (size_t i = 1; i < argv.size(); i++) {
    const std::string& a = argv[i];
    if (a == "-" || a.empty()) {
      *why = "reading the program from stdin is not supported with --preload";
      return std::nullopt;
    }
    if (a[0] != '-') {  // SCRIPT ARGS
      c.run.assign(argv.begin() + static_cast<long>(i), argv.end());
      return c;
    }
    if (a == "--") {
      if (i + 1 < argv.size()) {
        c.run.assign(argv.begin() + static_cast<long>(i) + 1, argv.end());
        return c;
      }
      break;
    }
    if (a.rfind("--", 0) == 0) {  // --help, --version, --check-hash-based-pycs ...
      *why = "interpreter option " + a + " is not supported with --preload";
      return std::nullopt;
    }
    // A group of one-letter flags: -uB, -OO, -Werror, -m celery, -mcelery.
    for (size_t j = 1; j < a.size(); j++) {
      char f = a[j];
      if (f == 'm' || f == 'c') {
        std::string value = a.substr(j + 1);
        size_t next = i + 1;
        if (value.empty()) {
          if (next >= argv.size()) {
            *why = std::string("-") + f + " needs an argument";
            return std::nullopt;
          }
          value = argv[next++];
        }
        c.run = {std::string("-") + f, value};
        c.run.insert(c.run.end(), argv.begin() + static_cast<long>(next), argv.end());
        if (j > 1) c.interpreter.push_back(a.substr(0, j));  // the flags before it
        return c;
      }
      if (takes_value(f)) {
        if (j + 1 == a.size()) {
          if (i + 1 >= argv.size()) {
            *why = std::string("-") + f + " needs an argument";
            return std::nullopt;
          }
          c.interpreter.push_back(a);
          c.interpreter.push_back(argv[++i]);
        } else {
          c.interpreter.push_back(a);
        }
        break;
      }
      if (f == 'h' || f == 'V' || f == 'i') {
        *why = std::string("interpreter option -") + f + " does not run a worker";
        return std::nullopt;
      }
      if (j + 1 == a.size()) c.interpreter.push_back(a);
    }
  }
  *why = "the Python command runs no program: give -m MODULE, -c CODE or SCRIPT";
  return std::nullopt;
}

std::optional<PythonCommand> python_command(const std::vector<std::string>& argv, std::string* why) {
  if (argv.empty()) {
    *why = "missing command";
    return std::nullopt;
  }
  if (is_python_name(argv[0])) return split_python_argv(argv, why);
  // A script run directly: its first line says which interpreter.
  std::string path = proc::which(argv[0]);
  std::string line;
  if (!path.empty()) {
    std::ifstream f(path, std::ios::binary);
    std::getline(f, line);
  }
  if (line.rfind("#!", 0) == 0) {
    std::vector<std::string> words;
    size_t at = 2;
    while (at < line.size()) {
      size_t start = line.find_first_not_of(" \t\r", at);
      if (start == std::string::npos) break;
      size_t end = line.find_first_of(" \t\r", start);
      words.push_back(line.substr(start, end == std::string::npos ? std::string::npos : end - start));
      at = end == std::string::npos ? line.size() : end;
    }
    if (!words.empty() && basename_of(words[0]) == "env" && words.size() > 1)
      words.erase(words.begin());  // #!/usr/bin/env python3
    if (!words.empty() && is_python_name(words[0])) {
      std::vector<std::string> full = words;  // the interpreter and the flags of the #! line
      full.push_back(path);
      full.insert(full.end(), argv.begin() + 1, argv.end());
      return split_python_argv(full, why);
    }
  }
  *why = argv[0] +
         " is not a Python program: --preload forks workers from a Python fork server, so the command must be "
         "`python3 -m MODULE ...`, `python3 SCRIPT ...` or a script whose #! line names Python";
  return std::nullopt;
}

Zygote::~Zygote() { close_socket(); }

bool Zygote::start(const PythonCommand& cmd, const std::vector<std::string>& modules, const std::string& python_dir,
                   std::vector<std::string> env, int stop_signal, const std::string& imports, std::string* err) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) {
    *err = std::string("socketpair: ") + strerror(errno);
    return false;
  }
  std::string preload;
  for (const auto& m : modules) preload += (preload.empty() ? "" : ",") + m;
  std::vector<std::string> args = cmd.interpreter;
  for (const std::string& a :
       {std::string("-c"), std::string(kBoot), python_dir, std::string("--fd"), std::to_string(sv[1]),
        std::string("--ebb-pid"), std::to_string(getpid()), std::string("--stop-signal"), std::to_string(stop_signal),
        std::string("--preload"), preload})
    args.push_back(a);
  if (!imports.empty()) {
    args.emplace_back("--imports");
    args.push_back(imports);
  }
  args.emplace_back("--");
  args.insert(args.end(), cmd.run.begin(), cmd.run.end());
  std::vector<char*> argv = proc::c_strings(args), envp = proc::c_strings(env);
  pid_t ppid = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    *err = std::string("fork: ") + strerror(errno);
    ::close(sv[0]);
    ::close(sv[1]);
    return false;
  }
  if (pid == 0) {
    fcntl(sv[1], F_SETFD, 0);                          // the zygote's end survives exec
    proc::exec_supervised(argv, envp, SIGKILL, ppid);  // it holds no work: nothing to finish
  }
  ::close(sv[1]);
  setpgid(pid, pid);
  pid_ = pid;
  fd_ = sv[0];
  ready_ = false;
  return true;
}

std::optional<nlohmann::json> Zygote::receive() {
  if (fd_ < 0) return std::nullopt;
  char buf[65536];
  for (;;) {
    ssize_t n = recv(fd_, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return nlohmann::json();  // nothing yet
      return std::nullopt;
    }
    auto j = nlohmann::json::parse(std::string(buf, static_cast<size_t>(n)), nullptr, false);
    if (j.is_discarded() || !j.is_object()) return nlohmann::json::object({{"event", "garbled"}});
    return j;
  }
}

bool Zygote::request_fork(int id, const std::vector<std::string>& env, std::string* err) {
  if (fd_ < 0) {
    *err = "the fork server is not running";
    errno = EPIPE;
    return false;
  }
  nlohmann::json req = {{"op", "fork"}, {"id", id}, {"env", nlohmann::json::object()}};
  for (const auto& kv : env) {
    size_t eq = kv.find('=');
    if (eq != std::string::npos) req["env"][kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  std::string text = req.dump();
  if (send(fd_, text.data(), text.size(), MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
    int e = errno;
    *err = std::string("cannot reach the fork server: ") + strerror(e);
    errno = e;  // the caller tells a full queue (EAGAIN) from a gone server
    return false;
  }
  return true;
}

void Zygote::close_socket() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void Zygote::exited() {
  close_socket();
  pid_ = 0;
  ready_ = false;
  reaped_ = true;
}

void Zygote::kill_now() {
  if (pid_ > 0 && !reaped_) kill(pid_, SIGKILL);
}

}  // namespace ebb::supervisor
