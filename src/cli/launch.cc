#include "launch.h"

#include <fmt/core.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "exec.h"

extern char** environ;

namespace ebb::cli {

namespace {

std::string self_dir() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  buf[n] = 0;
  std::string p(buf);
  return p.substr(0, p.rfind('/'));
}

bool is_file(const std::string& p) { return access(p.c_str(), R_OK) == 0; }

// The peers from the distribution's packages, where Debian puts them.
std::string find_lib(const std::vector<std::string>& names) {
  for (const char* dir :
       {"/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"})
    for (const auto& n : names)
      if (is_file(std::string(dir) + "/" + n)) return std::string(dir) + "/" + n;
  return "";
}

}  // namespace

std::optional<Allocator> resolve(const std::string& name, std::string* why) {
  if (name == "pymalloc") return Allocator{name, "", false};
  if (name == "system" || name == "glibc") return Allocator{"system", "", true};
  std::string lib;
  if (name == "ebb") {
    const char* env = getenv("EBB_LIB");
    lib = env != nullptr ? env : self_dir() + "/../lib/libebb.so";
    if (!is_file(lib)) {
      *why = "libebb not found at " + lib + " (set EBB_LIB)";
      return std::nullopt;
    }
  } else if (name == "jemalloc") {
    lib = find_lib({"libjemalloc.so.2", "libjemalloc.so"});
  } else if (name == "mimalloc") {
    lib = find_lib({"libmimalloc.so.2", "libmimalloc.so"});
  } else if (name == "tcmalloc") {
    lib = find_lib({"libtcmalloc_minimal.so.4", "libtcmalloc.so.4"});
  } else if (name.find('/') != std::string::npos) {
    lib = name;
    if (!is_file(lib)) {
      *why = "no such library";
      return std::nullopt;
    }
  } else {
    *why = "unknown allocator (ebb, system, jemalloc, mimalloc, tcmalloc, pymalloc, or a library path)";
    return std::nullopt;
  }
  if (lib.empty()) {
    *why = "library not installed (Debian: lib" + name + "…)";
    return std::nullopt;
  }
  return Allocator{name, lib, true};
}

std::string python_package_dir(std::string* why) {
  std::vector<std::string> candidates;
  if (const char* env = getenv("EBB_PYTHONPATH")) candidates.push_back(env);
  candidates.push_back(self_dir() + "/../lib/python3/dist-packages");
#ifdef EBB_SOURCE_PYTHON_DIR
  candidates.push_back(EBB_SOURCE_PYTHON_DIR);
#endif
  for (const auto& dir : candidates)
    if (is_file(dir + "/ebb/zygote.py")) return dir;
  *why = "the ebb Python package (ebb/zygote.py) is not in " + candidates.front() + " (set EBB_PYTHONPATH)";
  return "";
}

bool runnable(const std::string& cmd) { return !proc::which(cmd).empty(); }

std::vector<std::string> child_environment(const Allocator& a, const std::vector<std::string>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; e++) {
    std::string kv(*e);
    if (kv.rfind("LD_PRELOAD=", 0) == 0 || kv.rfind("PYTHONMALLOC=", 0) == 0) continue;
    bool replaced = false;
    for (const auto& x : extra) replaced |= kv.compare(0, x.find('=') + 1, x, 0, x.find('=') + 1) == 0;
    if (!replaced) env.push_back(kv);
  }
  if (!a.preload.empty()) env.push_back("LD_PRELOAD=" + a.preload);
  if (a.python_malloc) env.push_back("PYTHONMALLOC=malloc");
  for (const auto& x : extra) env.push_back(x);
  return env;
}

namespace {

volatile sig_atomic_t g_command_pid = 0;  // the command run_command() waits for

// SIGTERM or SIGHUP to ebb goes to the command, as `timeout` and `env` pass
// them on; ebb goes on waiting, so that what it does after (the report) is done.
void forward_signal(int sig) {
  if (g_command_pid > 0) kill(g_command_pid, sig);
}

}  // namespace

int run_command(const char* who, const std::vector<std::string>& argv, const std::vector<std::string>& env,
                const std::function<void(pid_t)>& tick, int* wait_status) {
  std::vector<std::string> args = argv, vars = env;
  std::vector<char*> cargv = proc::c_strings(args), cenv = proc::c_strings(vars);
  struct sigaction ignore {
  }, old_int{}, old_quit{};
  ignore.sa_handler = SIG_IGN;
  struct sigaction forward {
  }, old_term{}, old_hup{};
  forward.sa_handler = forward_signal;
  sigaction(SIGINT, &ignore, &old_int);
  sigaction(SIGQUIT, &ignore, &old_quit);
  auto restore = [&] {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGQUIT, &old_quit, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
    sigaction(SIGHUP, &old_hup, nullptr);
    g_command_pid = 0;
  };
  const pid_t pid = fork();
  if (pid < 0) {
    fmt::print(stderr, "ebb {}: fork: {}\n", who, strerror(errno));
    restore();
    return -1;
  }
  if (pid == 0) {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGQUIT, &old_quit, nullptr);
    execvpe(cargv[0], cargv.data(), cenv.data());
    fmt::print(stderr, "ebb {}: cannot run {}: {}\n", who, cargv[0], strerror(errno));
    _exit(127);
  }
  g_command_pid = pid;
  sigaction(SIGTERM, &forward, &old_term);
  sigaction(SIGHUP, &forward, &old_hup);
  int status = 0;
  for (;;) {
    const pid_t got = waitpid(pid, &status, tick ? WNOHANG : 0);
    if (got == pid) break;
    if (got < 0 && errno != EINTR) {
      fmt::print(stderr, "ebb {}: waitpid: {}\n", who, strerror(errno));
      restore();
      return -1;
    }
    if (got == 0) {
      tick(pid);
      struct timespec ts = {0, 100000000L};  // 100 ms
      nanosleep(&ts, nullptr);
    }
  }
  restore();
  if (wait_status != nullptr) *wait_status = status;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace ebb::cli
