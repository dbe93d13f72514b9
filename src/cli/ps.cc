// ebb ps: one row per process with RSS, PSS, USS, shared and swap, from
// /proc/PID/smaps_rollup. Like smem, in one static binary's worth of C++.
#include <sys/ioctl.h>
#include <unistd.h>

#include <fmt/core.h>

#include <algorithm>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "format.h"
#include "proc.h"
#include "reader.h"

namespace ebb::cli {

namespace {

struct PsOptions {
  std::vector<int> pids;
  int tree = 0;
  bool user = false;
  bool json = false;
  std::string sort = "pss";
};

// What ps shows of one process: /proc figures, and the heap from the
// telemetry page when the process runs libebb with telemetry on.
struct Row {
  proc::Process p;
  std::string allocator;
  bool has_heap = false;
  telemetry::Snapshot heap;
  uint64_t free_resident() const {
    return heap.stats.resident_bytes > heap.stats.live_bytes ? heap.stats.resident_bytes - heap.stats.live_bytes : 0;
  }
};

uint64_t sort_key(const Row& r, const std::string& col) {
  const proc::Process& p = r.p;
  if (col == "heap") return r.has_heap ? r.heap.stats.live_bytes : 0;
  if (col == "rss") return p.mem.rss;
  if (col == "uss") return p.mem.uss;
  if (col == "shared") return p.mem.shared;
  if (col == "swap") return p.mem.swap;
  return p.mem.pss;
}

size_t terminal_width() {
  winsize ws{};
  if (isatty(STDOUT_FILENO) && ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 0;  // not a terminal: never cut lines
}

nlohmann::json to_json(const Row& r) {
  const proc::Process& p = r.p;
  nlohmann::json j = {{"pid", p.pid},     {"ppid", p.ppid},       {"uid", p.uid},
                      {"comm", p.comm},   {"command", p.cmdline}, {"state", proc::state_name(p.state)},
                      {"rss", p.mem.rss}, {"swap", p.mem.swap},   {"anonymous", p.mem.anonymous}};
  // PSS, USS and shared need smaps_rollup: unknown (null) for processes we may not read.
  bool full = p.state == proc::State::kOk;
  j["pss"] = full ? nlohmann::json(p.mem.pss) : nlohmann::json();
  j["uss"] = full ? nlohmann::json(p.mem.uss) : nlohmann::json();
  j["shared"] = full ? nlohmann::json(p.mem.shared) : nlohmann::json();
  j["allocator"] = r.allocator.empty() ? nlohmann::json() : nlohmann::json(r.allocator);
  if (r.has_heap) {
    const ebb_stats_t& s = r.heap.stats;
    j["heap"] = {{"live", s.live_bytes},
                 {"free_resident", r.free_resident()},
                 {"resident", s.resident_bytes},
                 {"thread_cached", s.thread_cached_bytes},
                 {"mapped", s.mapped_bytes},
                 {"purged_total", s.purged_total},
                 {"unmapped_total", s.unmapped_total},
                 {"allocs_total", s.allocs_total},
                 {"soft_limit", r.heap.soft_limit},
                 {"version", r.heap.allocator}};
  } else {
    j["heap"] = nullptr;
  }
  return j;
}

int run_ps(const PsOptions& o) {
  std::vector<pid_t> pids;
  bool explicit_pids = !o.pids.empty() || o.tree != 0;
  if (o.tree != 0) pids = proc::tree(o.tree);
  for (int pid : o.pids) pids.push_back(pid);
  if (!explicit_pids) pids = proc::list_pids();

  std::vector<Row> rows;
  int rc = 0;
  const uid_t me = getuid();
  for (pid_t pid : pids) {
    proc::Process p = proc::read_process(pid);
    if (!explicit_pids) {
      if (p.state == proc::State::kGone) continue;        // exited while we listed
      if (p.cmdline.empty() && p.mem.rss == 0) continue;  // kernel thread
    }
    if (o.user && p.uid != me) continue;
    if (explicit_pids && p.state == proc::State::kGone && o.tree == 0) {
      error("ps", fmt::format("no process {}", pid));
      rc = 1;
    }
    Row r;
    if (p.state != proc::State::kGone) {
      r.allocator = proc::allocator_of(pid);
      if (r.allocator == "ebb") {
        telemetry::ReadResult t = telemetry::read_page(telemetry::page_path(pid, p.uid), pid, p.start_ticks, p.uid);
        r.has_heap = t.status == telemetry::Status::kOk;
        if (r.has_heap) r.heap = t.snap;
      }
    }
    r.p = std::move(p);
    rows.push_back(std::move(r));
  }
  std::stable_sort(rows.begin(), rows.end(), [&](const Row& a, const Row& b) {
    if (o.sort == "pid") return a.p.pid < b.p.pid;
    if (o.sort == "command") return a.p.cmdline < b.p.cmdline;
    return sort_key(a, o.sort) > sort_key(b, o.sort);
  });

  proc::Memory total;
  uint64_t heap_live = 0, heap_free = 0, heap_purged = 0;
  for (const auto& r : rows) {
    total.rss += r.p.mem.rss;
    total.pss += r.p.mem.pss;
    total.uss += r.p.mem.uss;
    total.shared += r.p.mem.shared;
    total.swap += r.p.mem.swap;
    if (r.has_heap) {
      heap_live += r.heap.stats.live_bytes;
      heap_free += r.free_resident();
      heap_purged += r.heap.stats.purged_total;
    }
  }

  if (o.json) {
    nlohmann::json out;
    out["processes"] = nlohmann::json::array();
    for (const auto& r : rows) out["processes"].push_back(to_json(r));
    out["total"] = {{"processes", rows.size()}, {"rss", total.rss},       {"pss", total.pss},
                    {"uss", total.uss},         {"shared", total.shared}, {"swap", total.swap},
                    {"heap_live", heap_live},   {"heap_free", heap_free}, {"heap_purged", heap_purged}};
    fmt::print("{}\n", out.dump(2));
    return rc;
  }

  Table t({"PID", "RSS", "PSS", "USS", "SHARED", "SWAP", "HEAP", "FREE", "PURGED", "ALLOC", "COMMAND"},
          {true, true, true, true, true, true, true, true, true, false, false});
  for (const auto& r : rows) {
    const proc::Process& p = r.p;
    std::string cmd = p.cmdline.empty() ? "[" + p.comm + "]" : p.cmdline;
    for (char& c : cmd)
      if (static_cast<unsigned char>(c) < 0x20) c = ' ';  // one row per process, whatever argv holds
    if (p.state == proc::State::kGone) {
      t.add({std::to_string(p.pid), "-", "-", "-", "-", "-", "-", "-", "-", "-", "(no such process)"});
      continue;
    }
    bool full = p.state == proc::State::kOk;
    auto cell = [&](uint64_t v) { return full ? human_bytes(v) : std::string("-"); };
    auto heap = [&](uint64_t v) { return r.has_heap ? human_bytes(v) : std::string("-"); };
    t.add({std::to_string(p.pid), human_bytes(p.mem.rss), cell(p.mem.pss), cell(p.mem.uss), cell(p.mem.shared),
           human_bytes(p.mem.swap), heap(r.heap.stats.live_bytes), heap(r.free_resident()),
           heap(r.heap.stats.purged_total), r.allocator.empty() ? "-" : r.allocator,
           full ? cmd : "(access denied) " + cmd});
  }
  t.add_rule();
  t.add({"", human_bytes(total.rss), human_bytes(total.pss), human_bytes(total.uss), human_bytes(total.shared),
         human_bytes(total.swap), human_bytes(heap_live), human_bytes(heap_free), human_bytes(heap_purged), "",
         fmt::format("total of {} processes", rows.size())});
  fmt::print("{}", t.render(terminal_width()));
  return rc;
}

}  // namespace

void register_ps(CLI::App& app, int& rc) {
  auto o = std::make_shared<PsOptions>();
  auto* sub = app.add_subcommand(
      "ps", "Show RSS, PSS, USS, shared and swap per process, and the heap inside processes running libebb");
  sub->add_option("pid", o->pids, "Processes to show (default: every process with memory)")->check(CLI::PositiveNumber);
  sub->add_option("--tree", o->tree, "Show PID and all its descendants")->check(CLI::PositiveNumber);
  sub->add_flag("--user", o->user, "Only processes of the current user");
  sub->add_flag("--json", o->json, "JSON output, sizes in exact bytes");
  sub->add_option("--sort", o->sort, "Sort by this column, largest first (default: pss)")
      ->check(CLI::IsMember({"pid", "rss", "pss", "uss", "shared", "swap", "heap", "command"}));
  sub->callback([o, &rc] { rc = run_ps(*o); });
}

}  // namespace ebb::cli
