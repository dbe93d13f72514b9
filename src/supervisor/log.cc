#include "log.h"

#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cstdio>

namespace ebb::supervisor {

double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
}

std::string mib(uint64_t bytes) {
  char buf[32];
  snprintf(buf, sizeof buf, "%.1fM", static_cast<double>(bytes) / (1 << 20));
  return buf;
}

std::string fmt_worker(int id, pid_t pid) {
  return "worker " + std::to_string(id) + " [pid " + std::to_string(pid) + "]";
}

std::string signame(int sig) {
  const char* a = sigabbrev_np(sig);
  return a != nullptr ? std::string("SIG") + a : "signal " + std::to_string(sig);
}

std::string seconds(double s) {
  char buf[32];
  snprintf(buf, sizeof buf, s < 10 ? "%.1fs" : "%.0fs", s);
  return buf;
}

namespace {

std::string timestamp() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  tm t;
  gmtime_r(&ts.tv_sec, &t);
  char buf[40];
  size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &t);
  snprintf(buf + n, sizeof buf - n, ".%03ldZ", ts.tv_nsec / 1000000);
  return buf;
}

}  // namespace

void Log::event(const std::string& name, const std::string& text, nlohmann::json fields) {
  std::string line;
  if (format_ == LogFormat::kJson) {
    fields["time"] = timestamp();
    fields["event"] = name;
    fields["message"] = text;
    line = fields.dump() + "\n";
  } else {
    line = timestamp() + " ebb run: " + text + "\n";
  }
  ssize_t ignored = write(STDERR_FILENO, line.data(), line.size());
  (void)ignored;
}

}  // namespace ebb::supervisor
