// What `ebb run` tells the outside: a JSON status on a unix socket (read by
// `ebb ps --fleet`) and Prometheus metrics over HTTP. Both are served from
// the supervisor's own loop: a listening socket each, polled with the
// signalfd; a client gets one answer and the connection is closed.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace ebb::supervisor {

struct WorkerStatus {
  int id = 0;
  pid_t pid = 0;
  std::string state;  // "running", "stopping", "master"
  uint64_t mem = 0;
  double age_s = 0;
  uint64_t soft_limit = 0, hard_limit = 0;
  double max_age_s = 0;
  bool can_trim = false;
  uint64_t trims = 0;
};

struct FleetStatus {
  pid_t pid = 0;  // ebb's
  std::string metric;
  double uptime_s = 0;
  bool shutting_down = false;
  uint64_t total = 0;
  uint64_t total_limit = 0;
  std::vector<WorkerStatus> workers;
  uint64_t trims = 0;
  uint64_t released_bytes = 0;
  std::map<std::string, uint64_t> recycles;  // by reason
  uint64_t master_restarts = 0;              // --children: warm restarts of the master (--master-hard-limit)
  uint64_t recycles_refused = 0;             // --children without a graceful stop signal (master.h)
  uint64_t restarts = 0;                     // unexpected exits followed by a restart
  uint64_t kills = 0;                        // SIGKILLs after a grace
  uint64_t oom_kills = 0;                    // in the cgroup, since ebb started
  pid_t zygote = 0;                          // the fork server of --preload, 0 when none
  uint64_t zygote_mem = 0;
  uint64_t zygote_restarts = 0;
  std::string zygote_imports;  // --preload with a status socket: where the import trees are (docs/imports.md)
};

nlohmann::json status_json(const FleetStatus& s);
std::string prometheus_text(const FleetStatus& s);

// A listening unix socket at path, mode 0600 (a stale socket file is
// replaced; anything else at path is an error). -1 with *err set on failure.
int listen_unix(const std::string& path, std::string* err);
// A listening TCP socket on "HOST:PORT" (HOST defaults to 127.0.0.1 when
// the text is just a port). *bound gets the "host:port" actually bound
// (port 0 picks one). -1 with *err set on failure.
int listen_tcp(const std::string& host_port, std::string* bound, std::string* err);

// Accepts one client of a listening socket and answers it: the status JSON
// for the unix socket, an HTTP response for the metrics socket.
void answer_status(int listen_fd, const FleetStatus& s);
void answer_metrics(int listen_fd, const FleetStatus& s);

}  // namespace ebb::supervisor
