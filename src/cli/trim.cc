// ebb trim: ask processes running libebb to give their free memory back now,
// through their telemetry pages, and show what it did.
#include <unistd.h>

#include <fmt/core.h>

#include <memory>

#include "commands.h"
#include "format.h"
#include "proc.h"
#include "reader.h"

namespace ebb::cli {

namespace {

struct TrimOptions {
  std::vector<int> pids;
  bool all = false;
  int timeout_ms = 5000;
};

// Why a process cannot be trimmed, and what to do instead.
std::string advice(pid_t pid, const telemetry::ReadResult& r) {
  std::string alloc = proc::allocator_of(pid);
  if (alloc == "glibc")
    return "uses glibc malloc, not libebb: malloc_trim(0) called inside the process releases its free memory "
           "(from Python: ctypes.CDLL(None).malloc_trim(0); from outside: gdb -p " +
           std::to_string(pid) + " -batch -ex 'call (int) malloc_trim(0)')";
  if (alloc == "ebb")
    return "runs libebb without telemetry (" + r.message + "): start it with EBB_TELEMETRY=1 or under ebb run";
  if (alloc.empty()) return "cannot read its memory maps (" + r.message + ")";
  return "uses " + alloc + ", not libebb: it has its own way to release memory";
}

int run_trim(const TrimOptions& o) {
  std::vector<pid_t> pids(o.pids.begin(), o.pids.end());
  if (o.all) {
    for (pid_t pid : telemetry::scan_dir(telemetry::default_dir(geteuid()))) pids.push_back(pid);
    if (pids.empty()) {
      fmt::print("no process of this user runs libebb with telemetry\n");
      return 0;
    }
  }
  Table t({"PID", "RSS BEFORE", "RSS AFTER", "RELEASED", "COMMAND"}, {true, true, true, true, false});
  int rc = 0;
  size_t trimmed = 0;
  for (pid_t pid : pids) {
    proc::Process p = proc::read_process(pid);
    if (p.state == proc::State::kGone) {
      error("trim", fmt::format("no process {}", pid));
      rc = 1;
      continue;
    }
    telemetry::ReadResult r = telemetry::read_page(telemetry::page_path(pid, p.uid), pid, p.start_ticks, p.uid);
    if (r.status != telemetry::Status::kOk) {
      error("trim", fmt::format("process {} {}", pid, advice(pid, r)));
      rc = 1;
      continue;
    }
    telemetry::Ack ack = telemetry::send(pid, telemetry::kCmdTrim, 0, o.timeout_ms);
    if (ack.status != telemetry::Status::kOk) {
      error("trim", fmt::format("process {}: {}", pid, ack.message));
      rc = 1;
      continue;
    }
    std::string cmd = p.cmdline.empty() ? p.comm : p.cmdline;
    for (char& c : cmd)
      if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    t.add(
        {std::to_string(pid), human_bytes(ack.rss_before), human_bytes(ack.rss_after), human_bytes(ack.released), cmd});
    trimmed++;
  }
  if (trimmed > 0) fmt::print("{}", t.render());
  return rc;
}

}  // namespace

void register_trim(CLI::App& app, int& rc) {
  auto o = std::make_shared<TrimOptions>();
  auto* sub = app.add_subcommand("trim", "Make processes running libebb give their free memory back now");
  sub->add_option("pid", o->pids, "Processes to trim")->check(CLI::PositiveNumber);
  sub->add_flag("--all", o->all, "Every process of this user that runs libebb with telemetry");
  sub->add_option("--timeout", o->timeout_ms, "Milliseconds to wait for each acknowledgement (default: 5000)")
      ->check(CLI::Range(1, 600000));
  sub->callback([o, &rc] {
    if (o->pids.empty() && !o->all) throw CLI::RequiredError("PID or --all");
    rc = run_trim(*o);
  });
}

}  // namespace ebb::cli
