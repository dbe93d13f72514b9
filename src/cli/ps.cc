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

namespace ebb::cli {

namespace {

struct PsOptions {
  std::vector<int> pids;
  int tree = 0;
  bool user = false;
  bool json = false;
  std::string sort = "pss";
};

uint64_t sort_key(const proc::Process& p, const std::string& col) {
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

nlohmann::json to_json(const proc::Process& p) {
  nlohmann::json j = {{"pid", p.pid},       {"ppid", p.ppid},         {"uid", p.uid},
                      {"comm", p.comm},     {"command", p.cmdline},   {"state", proc::state_name(p.state)},
                      {"rss", p.mem.rss},   {"swap", p.mem.swap},     {"anonymous", p.mem.anonymous}};
  // PSS, USS and shared need smaps_rollup: unknown (null) for processes we may not read.
  bool full = p.state == proc::State::kOk;
  j["pss"] = full ? nlohmann::json(p.mem.pss) : nlohmann::json();
  j["uss"] = full ? nlohmann::json(p.mem.uss) : nlohmann::json();
  j["shared"] = full ? nlohmann::json(p.mem.shared) : nlohmann::json();
  return j;
}

int run_ps(const PsOptions& o) {
  std::vector<pid_t> pids;
  bool explicit_pids = !o.pids.empty() || o.tree != 0;
  if (o.tree != 0) pids = proc::tree(o.tree);
  for (int pid : o.pids) pids.push_back(pid);
  if (!explicit_pids) pids = proc::list_pids();

  std::vector<proc::Process> rows;
  int rc = 0;
  const uid_t me = getuid();
  for (pid_t pid : pids) {
    proc::Process p = proc::read_process(pid);
    if (!explicit_pids) {
      if (p.state == proc::State::kGone) continue;           // exited while we listed
      if (p.cmdline.empty() && p.mem.rss == 0) continue;     // kernel thread
    }
    if (o.user && p.uid != me) continue;
    if (explicit_pids && p.state == proc::State::kGone && o.tree == 0) {
      error("ps", fmt::format("no process {}", pid));
      rc = 1;
    }
    rows.push_back(std::move(p));
  }
  std::stable_sort(rows.begin(), rows.end(), [&](const proc::Process& a, const proc::Process& b) {
    if (o.sort == "pid") return a.pid < b.pid;
    if (o.sort == "command") return a.cmdline < b.cmdline;
    return sort_key(a, o.sort) > sort_key(b, o.sort);
  });

  proc::Memory total;
  for (const auto& p : rows) {
    total.rss += p.mem.rss;
    total.pss += p.mem.pss;
    total.uss += p.mem.uss;
    total.shared += p.mem.shared;
    total.swap += p.mem.swap;
  }

  if (o.json) {
    nlohmann::json out;
    out["processes"] = nlohmann::json::array();
    for (const auto& p : rows) out["processes"].push_back(to_json(p));
    out["total"] = {{"processes", rows.size()}, {"rss", total.rss},       {"pss", total.pss},
                    {"uss", total.uss},         {"shared", total.shared}, {"swap", total.swap}};
    fmt::print("{}\n", out.dump(2));
    return rc;
  }

  Table t({"PID", "RSS", "PSS", "USS", "SHARED", "SWAP", "COMMAND"}, {true, true, true, true, true, true, false});
  for (const auto& p : rows) {
    std::string cmd = p.cmdline.empty() ? "[" + p.comm + "]" : p.cmdline;
    for (char& c : cmd)
      if (static_cast<unsigned char>(c) < 0x20) c = ' ';  // one row per process, whatever argv holds
    if (p.state == proc::State::kGone) {
      t.add({std::to_string(p.pid), "-", "-", "-", "-", "-", "(no such process)"});
      continue;
    }
    bool full = p.state == proc::State::kOk;
    auto cell = [&](uint64_t v) { return full ? human_bytes(v) : std::string("-"); };
    t.add({std::to_string(p.pid), human_bytes(p.mem.rss), cell(p.mem.pss), cell(p.mem.uss), cell(p.mem.shared),
           human_bytes(p.mem.swap), full ? cmd : "(access denied) " + cmd});
  }
  t.add_rule();
  t.add({"", human_bytes(total.rss), human_bytes(total.pss), human_bytes(total.uss), human_bytes(total.shared),
         human_bytes(total.swap), fmt::format("total of {} processes", rows.size())});
  fmt::print("{}", t.render(terminal_width()));
  return rc;
}

}  // namespace

void register_ps(CLI::App& app, int& rc) {
  auto o = std::make_shared<PsOptions>();
  auto* sub = app.add_subcommand("ps", "Show RSS, PSS, USS, shared and swap memory per process");
  sub->add_option("pid", o->pids, "Processes to show (default: every process with memory)")->check(CLI::PositiveNumber);
  sub->add_option("--tree", o->tree, "Show PID and all its descendants")->check(CLI::PositiveNumber);
  sub->add_flag("--user", o->user, "Only processes of the current user");
  sub->add_flag("--json", o->json, "JSON output, sizes in exact bytes");
  sub->add_option("--sort", o->sort, "Sort by this column, largest first (default: pss)")
      ->check(CLI::IsMember({"pid", "rss", "pss", "uss", "shared", "swap", "command"}));
  sub->callback([o, &rc] { rc = run_ps(*o); });
}

}  // namespace ebb::cli
