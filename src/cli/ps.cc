// ebb ps: one row per process with RSS, PSS, USS, shared and swap, from
// /proc/PID/smaps_rollup. Like smem, in one static binary's worth of C++.
#include <fmt/core.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "commands.h"
#include "fleet_imports.h"
#include "format.h"
#include "pagemap.h"
#include "rows.h"

namespace ebb::cli {

namespace {

struct PsOptions {
  Selection sel;
  bool json = false;
  std::string sort = "pss";
  std::string fleet;  // status socket of an `ebb run`
  bool imports = false;
};

// The status JSON of an `ebb run` (its --status-socket); nullopt with *err.
std::optional<nlohmann::json> read_fleet(const std::string& path, std::string* err) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) {
    *err = "path too long";
    return std::nullopt;
  }
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    *err = strerror(errno);
    if (fd >= 0) close(fd);
    return std::nullopt;
  }
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = read(fd, buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  close(fd);
  auto j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.contains("workers")) {
    *err = "not an ebb run status socket";
    return std::nullopt;
  }
  return j;
}

std::string age(double s) {
  if (s < 120) return fmt::format("{:.0f}s", s);
  if (s < 7200) return fmt::format("{:.0f}m", s / 60);
  return fmt::format("{:.1f}h", s / 3600);
}

// Adds what ebb ps reads itself to each process of the fleet's status: its
// PSS, USS and shared bytes and, under --preload, the bytes it shares with
// the fork server (page frames in common, when pagemap can be read).
void add_memory(nlohmann::json& j) {
  std::optional<std::vector<uint64_t>> zygote_frames;
  if (j.contains("zygote")) zygote_frames = proc::resident_frames(j["zygote"]["pid"].get<int>());
  auto fill = [&](nlohmann::json& w, bool is_zygote) {
    proc::Process p = proc::read_process(w["pid"].get<int>());
    bool ok = p.state == proc::State::kOk;
    w["rss"] = ok ? nlohmann::json(p.mem.rss) : nlohmann::json();
    w["pss"] = ok ? nlohmann::json(p.mem.pss) : nlohmann::json();
    w["uss"] = ok ? nlohmann::json(p.mem.uss) : nlohmann::json();
    w["shared"] = ok ? nlohmann::json(p.mem.shared) : nlohmann::json();
    if (zygote_frames && !is_zygote) {
      auto b = proc::bytes_in_frames(w["pid"].get<int>(), *zygote_frames);
      w["shared_with_zygote"] = b ? nlohmann::json(*b) : nlohmann::json();
    }
  };
  for (auto& w : j["workers"]) fill(w, false);
  if (j.contains("zygote")) fill(j["zygote"], true);
}

int run_fleet(const PsOptions& o) {
  std::string err;
  auto j = read_fleet(o.fleet, &err);
  if (!j) {
    error("ps", fmt::format("--fleet {}: {}", o.fleet, err));
    return 1;
  }
  add_memory(*j);
  if (o.imports && !add_imports(*j, &err)) {
    error("ps", err);
    return 1;
  }
  if (o.json) {
    fmt::print("{}\n", j->dump(2));
    return 0;
  }
  const bool zygote = j->contains("zygote");
  const bool with_rss = (*j)["metric"] == "rss";  // the limits' metric, when not shown anyway
  std::vector<std::string> head = {"WORKER", "PID", "STATE"};
  if (with_rss) head.push_back("RSS");
  for (const char* h : {"PSS", "USS", "SHARED"}) head.push_back(h);
  if (zygote) head.push_back("ZYGOTE");
  for (const char* h : {"SOFT", "HARD", "AGE", "TRIMS"}) head.push_back(h);
  std::vector<bool> right(head.size(), true);
  right[2] = false;
  Table t(head, right);
  auto limit = [](uint64_t v) { return v == 0 ? std::string("-") : human_bytes(v); };
  auto bytes = [](const nlohmann::json& v) { return v.is_number() ? human_bytes(v.get<uint64_t>()) : "-"; };
  uint64_t pss = 0, uss = 0, from_zygote = 0, worker_rss = 0;
  auto memory_cells = [&](const nlohmann::json& w, std::vector<std::string>& row, bool is_zygote) {
    if (with_rss) row.push_back(bytes(w["rss"]));
    row.push_back(bytes(w["pss"]));
    row.push_back(bytes(w["uss"]));
    row.push_back(bytes(w["shared"]));
    if (zygote) row.push_back(is_zygote ? "-" : bytes(w.value("shared_with_zygote", nlohmann::json())));
    pss += w["pss"].is_number() ? w["pss"].get<uint64_t>() : 0;
    uss += w["uss"].is_number() ? w["uss"].get<uint64_t>() : 0;
    if (!is_zygote) {
      worker_rss += w["rss"].is_number() ? w["rss"].get<uint64_t>() : 0;
      auto z = w.value("shared_with_zygote", nlohmann::json());
      from_zygote += z.is_number() ? z.get<uint64_t>() : 0;
    }
  };
  if (zygote) {
    std::vector<std::string> row = {"zygote", std::to_string((*j)["zygote"]["pid"].get<int>()), "fork server"};
    memory_cells((*j)["zygote"], row, true);
    for (int i = 0; i < 4; i++) row.push_back("");
    t.add(row);
  }
  for (const auto& w : (*j)["workers"]) {
    std::vector<std::string> row = {
        w["state"] == "master" || w["state"] == "old master" ? "master" : std::to_string(w["id"].get<int>()),
        std::to_string(w["pid"].get<int>()), w["state"].get<std::string>()};
    memory_cells(w, row, false);
    row.push_back(limit(w["soft_limit"].get<uint64_t>()));
    row.push_back(limit(w["hard_limit"].get<uint64_t>()));
    row.push_back(age(w["age_s"].get<double>()));
    row.push_back(w["can_trim"].get<bool>() ? std::to_string(w["trims"].get<uint64_t>()) : "-");
    t.add(row);
  }
  t.add_rule();
  uint64_t budget = (*j)["total_limit"].get<uint64_t>();
  std::vector<std::string> total = {"fleet", std::to_string((*j)["pid"].get<int>()),
                                    (*j)["shutting_down"].get<bool>() ? "stopping" : "running"};
  if (with_rss) total.push_back(human_bytes((*j)["total"].get<uint64_t>()));
  total.push_back(human_bytes(pss));
  total.push_back(human_bytes(uss));
  total.push_back("");
  if (zygote) total.push_back(human_bytes(from_zygote));
  total.push_back("");
  total.push_back(budget ? "/ " + human_bytes(budget) : "");
  total.push_back(age((*j)["uptime_s"].get<double>()));
  total.push_back(std::to_string((*j)["trims"].get<uint64_t>()));
  t.add(total);
  fmt::print("{}", t.render());
  uint64_t recycled = 0;
  for (const auto& [reason, n] : (*j)["recycles"].items()) recycled += n.get<uint64_t>();
  fmt::print("limits measure {}; fleet {} {}", (*j)["metric"].get<std::string>(), (*j)["metric"].get<std::string>(),
             human_bytes((*j)["total"].get<uint64_t>()));
  if (budget) fmt::print(" of {}", human_bytes(budget));
  fmt::print("\nrecycled {}, restarted {}, killed {}, trims released {}\n", recycled, (*j)["restarts"].get<uint64_t>(),
             (*j)["kills"].get<uint64_t>(), human_bytes((*j)["released_bytes"].get<uint64_t>()));
  if (zygote && worker_rss > 0)
    fmt::print("the workers share {} with the fork server: {:.0f}% of their RSS\n", human_bytes(from_zygote),
               100.0 * static_cast<double>(from_zygote) / static_cast<double>(worker_rss));
  if (o.imports) print_imports(*j);
  return 0;
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
  if (!o.fleet.empty()) return run_fleet(o);
  if (o.imports) {
    error("ps", "--imports goes with --fleet SOCKET (an `ebb run --preload` fleet)");
    return 2;
  }
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
  sub->add_option("--fleet", o->fleet, "Show the workers of an `ebb run` through its --status-socket");
  sub->add_flag("--imports", o->imports,
                "With --fleet and --preload: what the fork server imported (a tree) and each worker after the fork");
  sub->callback([o, &rc] { rc = run_ps(*o); });
}

}  // namespace ebb::cli
