#include "status.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace ebb::supervisor {

namespace {

// Prometheus label values: backslash, quote and newline escaped.
std::string label(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

void metric(std::string& out, const char* name, const char* type, const char* help) {
  out += "# HELP ";
  out += name;
  out += ' ';
  out += help;
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

void sample(std::string& out, const std::string& name, const std::string& labels, double value) {
  char buf[64];
  snprintf(buf, sizeof buf, "%.17g", value);
  out += name;
  if (!labels.empty()) out += "{" + labels + "}";
  out += ' ';
  out += buf;
  out += '\n';
}

// A metric with one unlabelled sample.
void single(std::string& out, const char* name, const char* type, const char* help, uint64_t value) {
  metric(out, name, type, help);
  sample(out, name, "", static_cast<double>(value));
}

// Writes all of text, giving up after a short timeout: a stuck client must
// not stall the supervisor.
void send_all(int fd, const std::string& text) {
  timeval tv{0, 200000};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = send(fd, text.data() + done, text.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

int accept_client(int listen_fd) { return accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC); }

}  // namespace

nlohmann::json status_json(const FleetStatus& s) {
  nlohmann::json j = {{"pid", s.pid},
                      {"metric", s.metric},
                      {"uptime_s", s.uptime_s},
                      {"shutting_down", s.shutting_down},
                      {"total", s.total},
                      {"total_limit", s.total_limit},
                      {"trims", s.trims},
                      {"released_bytes", s.released_bytes},
                      {"recycles", s.recycles},
                      {"recycles_refused", s.recycles_refused},
                      {"master_restarts", s.master_restarts},
                      {"restarts", s.restarts},
                      {"kills", s.kills},
                      {"oom_kills", s.oom_kills},
                      {"workers", nlohmann::json::array()}};
  if (s.zygote != 0) {
    j["zygote"] = {{"pid", s.zygote}, {"mem", s.zygote_mem}, {"restarts", s.zygote_restarts}};
    if (!s.zygote_imports.empty()) j["zygote"]["imports"] = s.zygote_imports;
  }
  for (const WorkerStatus& w : s.workers)
    j["workers"].push_back({{"id", w.id},
                            {"pid", w.pid},
                            {"state", w.state},
                            {"mem", w.mem},
                            {"age_s", w.age_s},
                            {"soft_limit", w.soft_limit},
                            {"hard_limit", w.hard_limit},
                            {"max_age_s", w.max_age_s},
                            {"can_trim", w.can_trim},
                            {"trims", w.trims}});
  return j;
}

std::string prometheus_text(const FleetStatus& s) {
  std::string out;
  const std::string m = "metric=\"" + label(s.metric) + "\"";
  metric(out, "ebb_workers", "gauge", "Worker processes by state.");
  std::map<std::string, int> states;
  for (const auto& w : s.workers) states[w.state]++;
  for (const char* st : {"running", "stopping"})
    sample(out, "ebb_workers", std::string("state=\"") + st + "\"", states[st]);
  metric(out, "ebb_worker_memory_bytes", "gauge", "Memory of each worker's process tree, by the limits' metric.");
  for (const auto& w : s.workers)
    sample(
        out, "ebb_worker_memory_bytes",
        "worker=\"" + std::to_string(w.id) + "\",pid=\"" + std::to_string(w.pid) + "\",state=\"" + w.state + "\"," + m,
        static_cast<double>(w.mem));
  metric(out, "ebb_fleet_memory_bytes", "gauge", "Memory of the whole fleet, by the limits' metric.");
  sample(out, "ebb_fleet_memory_bytes", m, static_cast<double>(s.total));
  single(out, "ebb_fleet_budget_bytes", "gauge", "The fleet's memory budget (0: none).", s.total_limit);
  single(out, "ebb_trims_total", "counter", "Trims ebb asked workers for.", s.trims);
  single(out, "ebb_trim_released_bytes_total", "counter", "Bytes workers gave back when trimmed.", s.released_bytes);
  metric(out, "ebb_recycles_total", "counter", "Workers recycled, by reason.");
  for (const char* r : {"soft limit", "hard limit", "fleet budget", "max age", "reload"}) {
    auto it = s.recycles.find(r);
    sample(out, "ebb_recycles_total", "reason=\"" + std::string(r) + "\"",
           it == s.recycles.end() ? 0 : static_cast<double>(it->second));
  }
  single(out, "ebb_master_restarts_total", "counter",
         "Warm restarts of the --children master above --master-hard-limit.", s.master_restarts);
  single(out, "ebb_recycles_refused_total", "counter",
         "Recycles not done: --children of a master whose children have no known graceful stop signal.",
         s.recycles_refused);
  single(out, "ebb_restarts_total", "counter", "Workers restarted after exiting on their own.", s.restarts);
  single(out, "ebb_kills_total", "counter", "Workers killed with SIGKILL after their grace.", s.kills);
  single(out, "ebb_cgroup_oom_kills_total", "counter", "OOM kills in ebb's cgroup since ebb started.", s.oom_kills);
  if (s.zygote != 0) {
    single(out, "ebb_zygote_memory_bytes", "gauge",
           "Memory of the --preload fork server (part of the fleet's), by the limits' metric.", s.zygote_mem);
    single(out, "ebb_zygote_restarts_total", "counter", "Times the --preload fork server was started again.",
           s.zygote_restarts);
  }
  return out;
}

int listen_unix(const std::string& path, std::string* err) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    *err = path + ": path too long for a unix socket";
    return -1;
  }
  struct stat st;
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      *err = path + ": exists and is not a socket";
      return -1;
    }
    unlink(path.c_str());  // a stale socket of an earlier run
  }
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    *err = std::string("socket: ") + strerror(errno);
    return -1;
  }
  mode_t old = umask(0177);  // created 0600: only our user may ask
  int rc = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  umask(old);
  if (rc != 0 || listen(fd, 16) != 0) {
    *err = path + ": " + strerror(errno);
    close(fd);
    return -1;
  }
  return fd;
}

int listen_tcp(const std::string& host_port, std::string* bound, std::string* err) {
  std::string host = "127.0.0.1", port = host_port;
  size_t colon = host_port.rfind(':');
  if (colon != std::string::npos) {
    host = host_port.substr(0, colon);
    port = host_port.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    if (host.empty()) host = "127.0.0.1";
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  int gai = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (gai != 0) {
    *err = host_port + ": " + gai_strerror(gai);
    return -1;
  }
  int fd = -1;
  std::string last = "no address";
  for (addrinfo* a = res; a != nullptr && fd < 0; a = a->ai_next) {
    fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, 16) != 0) {
      last = strerror(errno);
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  if (fd < 0) {
    *err = host_port + ": " + last;
    return -1;
  }
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  char name[NI_MAXHOST], serv[NI_MAXSERV];
  getnameinfo(reinterpret_cast<sockaddr*>(&ss), len, name, sizeof name, serv, sizeof serv,
              NI_NUMERICHOST | NI_NUMERICSERV);
  *bound = std::string(name) + ":" + serv;
  return fd;
}

void answer_status(int listen_fd, const FleetStatus& s) {
  for (int fd; (fd = accept_client(listen_fd)) >= 0;) {
    send_all(fd, status_json(s).dump() + "\n");
    close(fd);
  }
}

void answer_metrics(int listen_fd, const FleetStatus& s) {
  for (int fd; (fd = accept_client(listen_fd)) >= 0;) {
    // Read the request head (up to a short timeout); any path gets the metrics.
    timeval tv{0, 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    std::string req;
    char buf[1024];
    while (req.find("\r\n\r\n") == std::string::npos && req.size() < 8192) {
      ssize_t n = recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      req.append(buf, static_cast<size_t>(n));
    }
    std::string body = prometheus_text(s);
    std::string head =
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: " + std::to_string(body.size()) +
        "\r\nConnection: close\r\n\r\n";
    send_all(fd, head + (req.rfind("HEAD ", 0) == 0 ? "" : body));
    close(fd);
  }
}

}  // namespace ebb::supervisor
