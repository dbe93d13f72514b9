// Starting commands, shared by everything that does (ebb compare, ebb run
// and its fork server): argv/envp for execve from strings, PATH lookup, and
// the child's side of a supervised start.
#pragma once

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <string>
#include <vector>

namespace ebb::proc {

// Pointers into `strings` (which must outlive them), null-terminated.
inline std::vector<char*> c_strings(std::vector<std::string>& strings) {
  std::vector<char*> out;
  out.reserve(strings.size() + 1);
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// `name` as execvp would find it: itself when it has a slash, else the first
// executable on PATH; empty when there is none.
inline std::string which(const std::string& name) {
  if (name.find('/') != std::string::npos) return access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = getenv("PATH");
  std::string dirs = path != nullptr ? path : "/usr/bin:/bin";
  size_t at = 0;
  while (at <= dirs.size()) {
    size_t colon = dirs.find(':', at);
    std::string dir = dirs.substr(at, colon == std::string::npos ? std::string::npos : colon - at);
    std::string full = (dir.empty() ? "." : dir) + "/" + name;
    if (access(full.c_str(), X_OK) == 0) return full;
    if (colon == std::string::npos) break;
    at = colon + 1;
  }
  return "";
}

// In a child of ebb run, just forked: its own process group (a terminal's ^C
// reaches ebb, which stops the fleet gracefully, not the children in the
// middle of a task), `death_signal` when ebb dies (and at once if it already
// has: `parent` is ebb's pid), no blocked signal, then exec. Never returns.
[[noreturn]] inline void exec_supervised(std::vector<char*>& argv, std::vector<char*>& envp, int death_signal,
                                         pid_t parent) {
  setpgid(0, 0);
  prctl(PR_SET_PDEATHSIG, death_signal);
  if (getppid() != parent) raise(death_signal);
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  execvpe(argv[0], argv.data(), envp.data());
  dprintf(STDERR_FILENO, "ebb run: cannot run %s: %s\n", argv[0], strerror(errno));
  _exit(127);
}

}  // namespace ebb::proc
