// ebb ps: one row per process with RSS, PSS, USS, shared and swap, from
// /proc/PID/smaps_rollup. Like smem, in one static binary's worth of C++.
#include <fmt/core.h>

#include <algorithm>
#include <memory>
#include <nlohmann/json.hpp>

#include "commands.h"
#include "format.h"
#include "rows.h"

namespace ebb::cli {

namespace {

struct PsOptions {
  Selection sel;
  bool json = false;
  std::string sort = "pss";
};

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
  std::vector<Row> rows = collect(o.sel);
  int rc = 0;
  for (const Row& r : rows)
    if (r.p.state == proc::State::kGone) {
      error("ps", fmt::format("no process {}", r.p.pid));
      rc = 1;
    }
  sort_rows(rows, o.sort);

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
    std::string cmd = r.command();
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
  sub->add_option("pid", o->sel.pids, "Processes to show (default: every process with memory)")
      ->check(CLI::PositiveNumber);
  sub->add_option("--tree", o->sel.tree, "Show PID and all its descendants")->check(CLI::PositiveNumber);
  sub->add_flag("--user", o->sel.user, "Only processes of the current user");
  sub->add_flag("--json", o->json, "JSON output, sizes in exact bytes");
  sub->add_option("--sort", o->sort, "Sort by this column, largest first (default: pss)")
      ->check(CLI::IsMember({"pid", "rss", "pss", "uss", "shared", "swap", "heap", "command"}));
  sub->callback([o, &rc] { rc = run_ps(*o); });
}

}  // namespace ebb::cli
