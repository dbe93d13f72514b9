#include "rows.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>

namespace ebb::cli {

std::string Row::command() const {
  std::string cmd = p.cmdline.empty() ? "[" + p.comm + "]" : p.cmdline;
  for (char& c : cmd)
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';  // one row per process, whatever argv holds
  return cmd;
}

std::vector<Row> collect(const Selection& sel) {
  std::vector<pid_t> pids;
  const bool explicit_pids = !sel.pids.empty() || sel.tree != 0;
  if (sel.tree != 0) pids = proc::tree(sel.tree);
  for (int pid : sel.pids) pids.push_back(pid);
  if (!explicit_pids) pids = proc::list_pids();
  const uid_t me = getuid();
  std::vector<Row> rows;
  for (pid_t pid : pids) {
    proc::Process p = proc::read_process(pid);
    if (!explicit_pids || sel.tree != 0) {
      if (p.state == proc::State::kGone) continue;        // exited while we listed
      if (p.cmdline.empty() && p.mem.rss == 0) continue;  // kernel thread
    }
    if (sel.user && p.state != proc::State::kGone && p.uid != me) continue;
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
  return rows;
}

void sort_rows(std::vector<Row>& rows, const std::string& col) {
  auto key = [&](const Row& r) -> uint64_t {
    const proc::Memory& m = r.p.mem;
    if (col == "heap") return r.has_heap ? r.heap.stats.live_bytes : 0;
    if (col == "rss") return m.rss;
    if (col == "uss") return m.uss;
    if (col == "shared") return m.shared;
    if (col == "swap") return m.swap;
    return m.pss;
  };
  std::stable_sort(rows.begin(), rows.end(), [&](const Row& a, const Row& b) {
    if (col == "pid") return a.p.pid < b.p.pid;
    if (col == "command") return a.p.cmdline < b.p.cmdline;
    return key(a) > key(b);
  });
}

size_t terminal_width() {
  winsize ws{};
  if (isatty(STDOUT_FILENO) && ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
  return 0;  // not a terminal: never cut lines
}

}  // namespace ebb::cli
