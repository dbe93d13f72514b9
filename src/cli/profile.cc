// ebb profile: run a command with libebb's allocation profiler on, and read
// what it captured (docs/profile.md).
//
//   ebb profile [-o PREFIX] [--rate SIZE | --all] [--native] -- COMMAND...
//   ebb profile --pid PID [--duration TIME] [-o PREFIX] [--rate SIZE | --all] [--native]
//   ebb profile report CAPTURE... [--format table|json|html] [--at peak|end|total|TIME] [--leaks]
//                      [--inverted] [--top N] [--sort own|inclusive] [-o PAGE.html]
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>

#include "capture_format.h"
#include "commands.h"
#include "exec.h"
#include "format.h"
#include "html.h"
#include "launch.h"
#include "proc.h"
#include "reader.h"
#include "report.h"

namespace ebb::cli {

namespace {

struct ProfileOptions {
  std::string prefix = "ebb-profile";
  std::string rate = "512K";
  bool all = false;
  bool native = false;
  int pid = 0;
  std::string duration;
  std::vector<std::string> command;
};

struct ReportOptions {
  std::vector<std::string> files;
  std::string format = "table";
  std::string at = "peak";
  std::string sort = "own";
  std::string output;  // the HTML page (default: CAPTURE with .html for .ebbprof)
  size_t top = 20;
  bool leaks = false;
  bool inverted = false;
};

// The capture files <prefix>.<pid>.ebbprof written since `since` (mtime).
std::vector<std::string> captures_of(const std::string& prefix, time_t since) {
  const size_t slash = prefix.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : prefix.substr(0, slash);
  const std::string base = slash == std::string::npos ? prefix : prefix.substr(slash + 1);
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    const std::string tail = ".ebbprof";
    if (name.size() <= base.size() + 1 + tail.size() || name.compare(0, base.size() + 1, base + ".") != 0 ||
        name.compare(name.size() - tail.size(), tail.size(), tail) != 0)
      continue;
    const std::string pid = name.substr(base.size() + 1, name.size() - base.size() - 1 - tail.size());
    if (pid.empty() || !std::all_of(pid.begin(), pid.end(), ::isdigit)) continue;
    std::string path = slash == std::string::npos ? "" : dir + "/";
    path += name;
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && st.st_mtime >= since) out.push_back(path);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

// The capture prefix as an absolute path (the profiled process may run
// elsewhere), or "" after saying why not.
std::string absolute_prefix(const std::string& given) {
  const size_t slash = given.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : given.substr(0, slash);
  if (given.empty() || slash + 1 == given.size()) {
    error("profile", "-o wants a file prefix such as /tmp/worker, not a directory");
    return "";
  }
  if (access(dir.c_str(), W_OK) != 0) {
    error("profile", fmt::format("cannot write captures in {}: {}", dir, strerror(errno)));
    return "";
  }
  std::string prefix = given;
  if (prefix[0] != '/') {
    char cwd[4096];
    if (getcwd(cwd, sizeof cwd) != nullptr) prefix = std::string(cwd) + "/" + prefix;
  }
  if (prefix.size() >= 200) {
    error("profile", "the capture prefix is too long (at most 199 bytes as an absolute path)");
    return "";
  }
  return prefix;
}

volatile sig_atomic_t g_stop = 0;
void on_stop_signal(int /*sig*/) { g_stop = 1; }

// Why process pid cannot be profiled in place (it has no telemetry page).
std::string no_page_reason(pid_t pid, const telemetry::ReadResult& r) {
  const std::string alloc = proc::allocator_of(pid);
  if (alloc == "ebb")
    return fmt::format("runs libebb without telemetry ({}): start it under ebb run, or with EBB_TELEMETRY=1",
                       r.message);
  if (alloc.empty()) return fmt::format("cannot be read ({})", r.message);
  return fmt::format("uses {} malloc, not libebb: profile it from its start with ebb profile -- COMMAND",
                     alloc == "glibc" ? "glibc's" : alloc);
}

// ebb profile --pid: profiling turned on in a running libebb process through
// its telemetry page, and off again after the duration, ^C, or its exit.
int attach(const ProfileOptions& o, uint64_t rate) {
  const pid_t pid = o.pid;
  double duration = 0;  // 0: until ^C or the process exits
  if (!o.duration.empty() && (!parse_duration(o.duration, &duration) || duration <= 0)) {
    error("profile", fmt::format("--duration wants a time such as 30s or 5m, not {}", o.duration));
    return 2;
  }
  const proc::Process p = proc::read_process(pid);
  if (p.state == proc::State::kGone) {
    error("profile", fmt::format("no process {}", pid));
    return 2;
  }
  if (p.uid != geteuid() && geteuid() != 0) {
    error("profile",
          fmt::format("process {} belongs to another user (uid {}): run ebb as that user, or as root", pid, p.uid));
    return 2;
  }
  const telemetry::ReadResult page = telemetry::read_pid(pid);
  if (page.status != telemetry::Status::kOk) {
    error("profile", fmt::format("process {} {}", pid, no_page_reason(pid, page)));
    return 2;
  }
  const std::string prefix = absolute_prefix(o.prefix);
  if (prefix.empty()) return 2;
  const uint64_t arg = (o.all ? 1 : rate) | (o.native ? capture::kRateNative : 0);
  telemetry::Ack ack = telemetry::send(pid, telemetry::kCmdProfileStart, arg, 5000, prefix);
  if (ack.status != telemetry::Status::kOk) {
    error("profile", fmt::format("process {}: {}", pid, ack.message));
    return 1;
  }
  if (ack.error == telemetry::kAckAlreadyProfiling) {
    error("profile", fmt::format("process {} is already profiled, into {}", pid, ack.text));
    return 1;
  }
  if (ack.error == telemetry::kAckFinalizing) {
    error("profile", fmt::format("process {} is exiting", pid));
    return 1;
  }
  if (ack.error != 0) {
    error("profile", fmt::format("process {} cannot write {}: {}", pid, ack.text.empty() ? prefix : ack.text,
                                 ack.error > 0 ? strerror(ack.error) : "refused"));
    return 1;
  }
  const std::string file = ack.text;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;  // no SA_RESTART: the sleep below returns at once
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) sigaction(sig, &sa, nullptr);
  fmt::print(stderr, "ebb profile: profiling process {} into {} ({}); ^C stops\n", pid, file,
             duration > 0 ? fmt::format("for {}", o.duration) : "until ^C or its exit");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(duration);
  bool gone = false;
  while (g_stop == 0 && (duration == 0 || std::chrono::steady_clock::now() < deadline)) {
    usleep(100000);
    const proc::Process now = proc::read_process(pid);
    if (now.state == proc::State::kGone || now.start_ticks != p.start_ticks) {
      gone = true;
      break;
    }
  }
  if (gone) {
    fmt::print(stderr, "ebb profile: process {} exited; its capture holds everything up to then\n", pid);
  } else {
    ack = telemetry::send(pid, telemetry::kCmdProfileStop, 0, 5000);
    if (ack.status != telemetry::Status::kOk || (ack.error != 0 && ack.error != telemetry::kAckNotProfiling)) {
      error("profile", fmt::format("process {}: could not stop profiling: {}", pid,
                                   ack.message.empty() ? "refused" : ack.message));
      return 1;
    }
    if (ack.error == telemetry::kAckNotProfiling)
      fmt::print(stderr, "ebb profile: process {} had stopped profiling already (its interpreter is exiting)\n", pid);
  }
  fmt::print(stderr, "read it with: ebb profile report {}\n", file);
  return 0;
}

int run_profile(const ProfileOptions& o) {
  uint64_t rate = 1;
  if (!o.all && (!parse_size(o.rate, &rate) || rate < 2 || rate > UINT32_MAX)) {
    error("profile", "--rate wants a size from 2 bytes to 4G (for example 512K), or --all for every allocation");
    return 2;
  }
  if (o.all && o.native)
    fmt::print(stderr,
               "ebb profile: warning: --native with --all unwinds the native stack at every allocation, which is "
               "slow; a program that registers JIT-compiled frames with libgcc could also deadlock "
               "(docs/profile.md)\n");
  if (o.pid != 0) {
    if (!o.command.empty()) {
      error("profile", "--pid profiles a running process: give it no command");
      return 2;
    }
    return attach(o, rate);
  }
  if (!o.duration.empty()) {
    error("profile", "--duration goes with --pid");
    return 2;
  }
  if (o.command.empty()) {
    error("profile",
          "no command: ebb profile [-o PREFIX] [--rate SIZE|--all] -- COMMAND..., or --pid PID for a running process");
    return 2;
  }
  if (!runnable(o.command[0])) {
    error("profile", fmt::format("cannot run {}: not found", o.command[0]));
    return 127;
  }
  std::string why;
  auto alloc = resolve("ebb", &why);
  if (!alloc) {
    error("profile", why);
    return 1;
  }
  const std::string prefix = absolute_prefix(o.prefix);
  if (prefix.empty()) return 2;
  std::vector<std::string> env =
      child_environment(*alloc, {"EBB_PROFILE=" + prefix, "EBB_PROFILE_RATE=" + std::to_string(o.all ? 1 : rate),
                                 std::string("EBB_PROFILE_NATIVE=") + (o.native ? "1" : "0")});
  const time_t since = time(nullptr) - 1;
  int status = 0;
  const int rc = run_command("profile", o.command, env, {}, &status);
  if (rc < 0) return 1;
  const auto files = captures_of(prefix, since);
  if (files.empty()) {
    error("profile", "the command wrote no capture (is it a dynamically linked program? see docs/profile.md)");
    return rc != 0 ? rc : 1;
  }
  fmt::print(stderr, "ebb profile: {} capture{} (command exited {}):\n", files.size(), files.size() == 1 ? "" : "s",
             WIFEXITED(status) ? fmt::format("with status {}", rc) : fmt::format("on signal {}", WTERMSIG(status)));
  for (const auto& f : files) fmt::print(stderr, "  {}\n", f);
  fmt::print(stderr, "read one with: ebb profile report {}\n", files.front());
  return rc;
}

double seconds(uint64_t ns) { return static_cast<double>(ns) / 1e9; }
std::string size(double bytes) { return human_bytes(static_cast<uint64_t>(std::llround(bytes))); }
std::string size(uint64_t bytes) { return human_bytes(bytes); }

std::string where(const profile::Site& s) {
  if (s.file.empty()) return s.function;
  if (s.native) return fmt::format("{}  {}", s.function, s.file);
  return fmt::format("{}  {}:{}", s.function, s.file, s.line);
}

nlohmann::json site_json(const profile::Site& s) {
  return {{"function", s.function},
          {"file", s.file},
          {"line", s.line},
          {"own_bytes", std::llround(s.own)},
          {"inclusive_bytes", std::llround(s.inclusive)},
          {"count", s.count},
          {"native", s.native}};
}

// The snapshot --at names: peak, end, total, or a time ("12.5s", "500ms").
bool pick(const profile::Capture& c, const profile::Analysis& a, const std::string& at, profile::Snapshot* out) {
  if (at == "peak")
    *out = a.peak;
  else if (at == "end")
    *out = a.end;
  else if (at == "total")
    *out = a.total;
  else {
    double s = 0;
    if (!parse_duration(at, &s)) return false;
    *out = profile::snapshot_at(c, static_cast<uint64_t>(s * 1e9));
    out->name = at;
  }
  return true;
}

std::string mode_of(const profile::Capture& c) {
  return c.all ? "every allocation" : fmt::format("sampled, one byte in {} on average", human_bytes(c.rate));
}

nlohmann::json memory_json(const profile::MemoryView& m) {
  if (!m.known) return nullptr;
  return {{"time_s", seconds(m.time_ns)},
          {"rss_bytes", m.rss},
          {"file_backed_bytes", m.file},
          {"anonymous_bytes", m.anon},
          {"heap_resident_bytes", m.heap_resident},
          {"live_bytes", m.live},
          {"thread_cached_bytes", m.thread_cached},
          {"large_cached_bytes", m.large_cached},
          {"free_in_spans_bytes", m.free_in_spans},
          {"other_anonymous_bytes", m.other_anon},
          {"heap_not_resident_bytes", m.untouched},
          {"profiler_tables_bytes", m.profiler}};
}

// Why RSS is what it is, in a few lines under the table.
void print_memory(const profile::MemoryView& m, double estimate) {
  if (!m.known) {
    fmt::print("  no memory statistics in this capture (libebb's background thread was off: EBB_BACKGROUND=0)\n");
    return;
  }
  fmt::print("  memory at {:.2f} s (libebb's counters and /proc/self/statm, taken last before the view):\n",
             seconds(m.time_ns));
  fmt::print("    RSS {}: {} backed by files (code, libraries, mapped files), {} anonymous\n", size(m.rss),
             size(m.file), size(m.anon));
  fmt::print(
      "    heap {}: live {} (this profile estimates {}), free in thread caches {}, free large blocks kept {}, "
      "free in partly used spans {} (fragmentation, or not purged yet)\n",
      size(m.heap_resident), size(m.live), size(estimate), size(m.thread_cached), size(m.large_cached),
      size(m.free_in_spans));
  if (m.untouched > 0)
    fmt::print(
        "    {} of the heap is not resident: handed out but never written (calloc'd pages the kernel has "
        "not backed)\n",
        size(m.untouched));
  else
    fmt::print(
        "    {} anonymous outside the heap: thread stacks, mmap outside malloc, the profiler's tables (up to "
        "{})\n",
        size(m.other_anon), size(m.profiler));
}

// The HTML page's file: --output, else the capture's name with .html.
std::string html_path(const ReportOptions& o, const std::string& file) {
  if (!o.output.empty()) return o.output;
  const std::string tail = ".ebbprof";
  std::string base = file;
  if (base.size() > tail.size() && base.compare(base.size() - tail.size(), tail.size(), tail) == 0)
    base.resize(base.size() - tail.size());
  return base + ".html";
}

// One capture's report; throws with a one-line reason.
void report_one(const ReportOptions& o, const std::string& file, nlohmann::json* all) {
  const profile::Capture c = profile::read_capture(file);
  const profile::Analysis a = profile::analyze(c);
  profile::Snapshot snap;
  if (!pick(c, a, o.at, &snap)) throw std::invalid_argument("--at");
  if (o.format == "html") {
    profile::HtmlOptions h;
    h.initial = snap.name == "end" || snap.name == "total" ? snap.name : "peak";
    h.inverted = o.inverted;
    const std::string out = html_path(o, file);
    const std::string page = profile::html_report(c, a, h);
    FILE* f = fopen(out.c_str(), "w");
    if (f == nullptr) throw std::runtime_error(fmt::format("cannot write {}: {}", out, strerror(errno)));
    const bool ok = fwrite(page.data(), 1, page.size(), f) == page.size();
    if (fclose(f) != 0 || !ok) throw std::runtime_error(fmt::format("cannot write {}: {}", out, strerror(errno)));
    fmt::print(stderr, "ebb profile report: wrote {} ({}); open it in a browser\n", out, human_bytes(page.size()));
    return;
  }
  auto list = profile::sites(c, snap);
  if (o.sort == "inclusive")
    std::stable_sort(list.begin(), list.end(),
                     [](const profile::Site& x, const profile::Site& y) { return x.inclusive > y.inclusive; });
  if (list.size() > o.top) list.resize(o.top);
  const profile::MemoryView mem = profile::memory_at(c, snap.name == "total" ? a.total.time_ns : snap.time_ns);
  if (o.format == "json") {
    nlohmann::json j = {
        {"capture", file},
        {"pid", c.pid},
        {"ppid", c.ppid},
        {"mode", c.all ? "all" : "sampled"},
        {"rate", c.rate},
        {"python", fmt::format("{}.{}", c.python >> 24, (c.python >> 16) & 255)},
        {"complete", c.complete},
        {"truncated", c.truncated},
        {"dropped_samples", c.dropped},
        {"peak", {{"bytes", std::llround(a.peak.bytes)}, {"time_s", seconds(a.peak.time_ns)}}},
        {"end", {{"bytes", std::llround(a.end.bytes)}, {"time_s", seconds(a.end.time_ns)}}},
        {"total_bytes", std::llround(a.total.bytes)},
        {"view", {{"at", snap.name}, {"bytes", std::llround(snap.bytes)}, {"time_s", seconds(snap.time_ns)}}},
        {"memory", memory_json(mem)},
        {"sites", nlohmann::json::array()}};
    for (const auto& s : list) j["sites"].push_back(site_json(s));
    all->push_back(std::move(j));
    return;
  }
  fmt::print("{}: pid {}, {}{}\n", file, c.pid, mode_of(c),
             c.complete ? "" : " (cut short: the process died while writing; read up to its last record)");
  if (c.truncated) fmt::print("  the capture reached its size limit: later allocations are missing\n");
  if (c.dropped > 0)
    fmt::print("  {} samples dropped (too many live samples at once: use a larger --rate)\n", c.dropped);
  fmt::print("  heap at peak {} ({:.2f} s), at end {} ({:.2f} s), allocated in all {}\n", size(a.peak.bytes),
             seconds(a.peak.time_ns), size(a.end.bytes), seconds(a.end.time_ns), size(a.total.bytes));
  const char* what = snap.name == "total" ? "allocated in all" : o.leaks ? "leaked (live at the end)" : "live at";
  fmt::print("  {}{}:\n", what, snap.name == "total" || o.leaks ? "" : " " + snap.name);
  Table t({"OWN", "INCLUSIVE", "SAMPLES", "WHERE"}, {true, true, true, false});
  for (const auto& s : list) t.add({size(s.own), size(s.inclusive), std::to_string(s.count), where(s)});
  fmt::print("{}\n", t.render());
  if (snap.name != "total") print_memory(mem, snap.bytes);
}

int run_report(ReportOptions o) {
  if (o.sort != "own" && o.sort != "inclusive") {
    error("profile report", "--sort is own or inclusive");
    return 2;
  }
  if (o.format != "table" && o.format != "json" && o.format != "html") {
    error("profile report", "--format is table, json or html");
    return 2;
  }
  if (o.leaks) {
    if (o.at != "peak" && o.at != "end") {
      error("profile report", "--leaks is --at end: give one of them");
      return 2;
    }
    o.at = "end";
  }
  if (o.inverted && o.format != "html") {
    error("profile report",
          "--inverted is for --format html (the table's OWN column already groups by the allocating line)");
    return 2;
  }
  if (!o.output.empty() && (o.format != "html" || o.files.size() != 1)) {
    error("profile report", "--output names the HTML page of one capture (--format html)");
    return 2;
  }
  {
    double ignored = 0;
    if (o.at != "peak" && o.at != "end" && o.at != "total" && !parse_duration(o.at, &ignored)) {
      error("profile report", fmt::format("--at wants peak, end, total or a time such as 2.5s, not {}", o.at));
      return 2;
    }
  }
  int rc = 0;
  nlohmann::json all = nlohmann::json::array();
  for (const auto& file : o.files) {
    try {
      report_one(o, file, &all);
    } catch (const std::exception& e) {
      // One line per capture that cannot be read, naming it.
      const std::string why = e.what();
      error("profile report", why.rfind(file, 0) == 0 ? why : fmt::format("{}: {}", file, why));
      rc = 2;
    }
  }
  if (o.format == "json" && !all.empty()) {
    const auto& out = all.size() == 1 ? all[0] : all;
    fmt::print("{}\n", out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace));
  }
  return rc;
}

}  // namespace

void register_profile(CLI::App& app, int& rc) {
  auto o = std::make_shared<ProfileOptions>();
  auto* sub = app.add_subcommand("profile", "Run a command with allocation profiling: who holds the memory");
  sub->add_option("-o,--output", o->prefix,
                  "Capture files PREFIX.<pid>.ebbprof, one per process (default: ebb-profile)");
  sub->add_option("--rate", o->rate, "Sample one byte in SIZE allocated, on average (default: 512K)");
  sub->add_flag("--all", o->all, "Record every allocation (exact, slower, bigger captures)");
  sub->add_flag("--native", o->native,
                "Record native (C/C++) stacks too, with the Python frames in their place (slower per sample)");
  sub->add_option("--pid", o->pid,
                  "Profile a running process (libebb with telemetry: under ebb run, or EBB_TELEMETRY=1) in place")
      ->check(CLI::PositiveNumber);
  sub->add_option("--duration", o->duration, "With --pid: stop after this long, e.g. 30s (default: at ^C or its exit)");
  sub->add_option("command", o->command, "The command to run, after --");
  sub->positionals_at_end(true);
  sub->require_subcommand(0, 1);

  auto r = std::make_shared<ReportOptions>();
  auto* rep =
      sub->add_subcommand("report", "Show what a capture holds: top call sites at the peak, the end, or in all");
  rep->add_option("capture", r->files, "Capture files (.ebbprof)")->required();
  rep->add_option("--format", r->format,
                  "table, json, or html (a self-contained page: flamegraph, timeline, search; default: table)");
  rep->add_option("-o,--output", r->output, "With --format html: the page's file (default: CAPTURE.html)");
  rep->add_flag("--leaks", r->leaks, "What was still live at the end (--at end)");
  rep->add_flag("--inverted", r->inverted,
                "With --format html: the flamegraph opens with allocating lines at the root");
  rep->add_option("--at", r->at,
                  "peak, end (what was still live), total (everything allocated), or a time such as 2.5s");
  rep->add_option("--top", r->top, "Call sites to show (default: 20)");
  rep->add_option("--sort", r->sort,
                  "own (bytes allocated by the line itself, default) or inclusive (and its callees)");
  rep->callback([r, &rc] { rc = run_report(*r); });

  sub->callback([o, sub, &rc] {
    if (sub->got_subcommand("report")) return;
    rc = run_profile(*o);
  });
}

}  // namespace ebb::cli
