// Starting commands under a chosen allocator: shared by `ebb compare` and
// `ebb run`.
#pragma once

#include <sys/types.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace ebb::cli {

struct Allocator {
  std::string name;
  std::string preload;  // library for LD_PRELOAD, empty for none
  bool python_malloc;   // PYTHONMALLOC=malloc
};

// ebb, system (glibc), jemalloc, mimalloc, tcmalloc, pymalloc, or a library
// path; nullopt with the reason in *why when it is not available here. ebb is
// $EBB_LIB, else lib/libebb.so next to this program's bin/.
std::optional<Allocator> resolve(const std::string& name, std::string* why);

// The directory holding the ebb Python package (ebb/zygote.py): $EBB_PYTHONPATH,
// else lib/python3/dist-packages next to this program's bin/ (installed),
// else the source tree's python/ (a build tree). Empty, with *why, if none.
std::string python_package_dir(std::string* why);

// True if `cmd` can be executed: a path, or a name found on PATH.
bool runnable(const std::string& cmd);

// This process's environment for a child under `a`: LD_PRELOAD and
// PYTHONMALLOC replaced, then `extra` ("NAME=value") added.
std::vector<std::string> child_environment(const Allocator& a, const std::vector<std::string>& extra);

// Runs argv with env as system() does: ^C and ^\ reach the command, which
// decides, and ebb waits for it; SIGTERM and SIGHUP sent to ebb are passed on. While it runs, `tick` (if set) is called
// every 100 ms with its pid. Returns its exit status (128 + the signal that
// ended it), or -1 after saying on stderr why it could not be started;
// *wait_status, if given, gets waitpid's status.
int run_command(const char* who, const std::vector<std::string>& argv, const std::vector<std::string>& env,
                const std::function<void(pid_t)>& tick = {}, int* wait_status = nullptr);

}  // namespace ebb::cli
