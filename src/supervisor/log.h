// ebb run's log: one line per decision on stderr, human or JSON, and the
// small formatting helpers every part of the supervisor names things with.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "supervisor.h"

namespace ebb::supervisor {

double now_s();  // CLOCK_MONOTONIC, in seconds

std::string mib(uint64_t bytes);            // "12.5M"
std::string seconds(double s);              // "2.5s", "30s"
std::string signame(int sig);               // "SIGTERM"
std::string fmt_worker(int id, pid_t pid);  // "worker 3 [pid 1234]"

class Log {
 public:
  explicit Log(LogFormat f) : format_(f) {}

  // `text` is the human line; `fields` the same facts for JSON.
  void event(const std::string& name, const std::string& text, nlohmann::json fields = nlohmann::json::object());

 private:
  LogFormat format_;
};

}  // namespace ebb::supervisor
