// ebb top: ebb ps, refreshing, with an RSS sparkline per process and keys to
// sort, select and trim. In a terminal it takes the screen (and gives it back
// on exit, q, ^C or TERM); when stdout is not a terminal it prints plain
// frames, --iterations of them, and exits.
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <termios.h>
#include <unistd.h>

#include <fmt/core.h>

#include <deque>
#include <map>
#include <memory>

#include "commands.h"
#include "format.h"
#include "rows.h"

namespace ebb::cli {

namespace {

struct TopOptions {
  Selection sel;
  std::string sort = "rss";
  double interval_s = 1.0;
  int iterations = 0;  // 0: until q in a terminal, 1 otherwise
};

constexpr size_t kHistory = 12;
volatile sig_atomic_t g_stop = 0;
void on_signal(int) { g_stop = 1; }

// ▁▂▃▄▅▆▇█ scaled to the process's own range over the history.
std::string sparkline(const std::deque<uint64_t>& h) {
  static const char* const blocks[] = {"▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"};
  if (h.empty()) return "";
  uint64_t lo = *std::min_element(h.begin(), h.end()), hi = *std::max_element(h.begin(), h.end());
  std::string out;
  for (uint64_t v : h) out += blocks[hi == lo ? 0 : (v - lo) * 7 / (hi - lo)];
  return out;
}

// Keeps the terminal in raw mode, on the alternate screen, while it lives.
class Screen {
 public:
  Screen() {
    tcgetattr(STDIN_FILENO, &saved_);
    termios raw = saved_;
    raw.c_lflag &= ~static_cast<tcflag_t>(ICANON | ECHO);
    raw.c_cc[VMIN] = 0;
    raw.c_cc[VTIME] = 0;
    tcsetattr(STDIN_FILENO, TCSANOW, &raw);
    fmt::print("\x1b[?1049h\x1b[?25l");
    fflush(stdout);
  }
  ~Screen() {
    fmt::print("\x1b[?25h\x1b[?1049l");
    fflush(stdout);
    tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
  }
  Screen(const Screen&) = delete;
  Screen& operator=(const Screen&) = delete;

  static std::pair<size_t, size_t> size() {
    winsize ws{};
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0 && ws.ws_row > 0) return {ws.ws_col, ws.ws_row};
    return {80, 24};
  }

 private:
  termios saved_{};
};

struct State {
  std::map<pid_t, std::deque<uint64_t>> history;
  size_t selected = 0;
  std::vector<pid_t> shown;  // the rows of the last frame, in order: what the selection points at
  std::string status;
};

// One frame as lines of text; `selected_line` gets the index of the selected row's line.
std::vector<std::string> frame(const TopOptions& o, State& st, size_t width, size_t height, size_t* selected_line) {
  std::vector<Row> rows = collect(o.sel);
  std::erase_if(rows, [](const Row& r) { return r.p.state == proc::State::kGone; });
  sort_rows(rows, o.sort);
  std::map<pid_t, std::deque<uint64_t>> history;
  uint64_t rss = 0, pss = 0;
  for (const Row& r : rows) {
    auto& h = history[r.p.pid] = std::move(st.history[r.p.pid]);
    h.push_back(r.p.mem.rss);
    if (h.size() > kHistory) h.pop_front();
    rss += r.p.mem.rss;
    pss += r.p.mem.pss;
  }
  st.history = std::move(history);  // forget processes that are gone
  if (!rows.empty() && st.selected >= rows.size()) st.selected = rows.size() - 1;
  st.shown.clear();
  for (const Row& r : rows) st.shown.push_back(r.p.pid);

  std::vector<std::string> lines;
  lines.push_back(fmt::format("ebb top  {} processes  RSS {}  PSS {}  sort: {}", rows.size(), human_bytes(rss),
                              human_bytes(pss), o.sort)
                      .substr(0, width > 0 ? width : std::string::npos));
  Table t({"PID", "RSS", "PSS", "USS", "HEAP", "FREE", "ALLOC", "RSS TREND", "COMMAND"},
          {true, true, true, true, true, true, false, false, false});
  size_t room = height > 4 ? height - 4 : 1;  // title, header, key line, status
  size_t first = st.selected >= room ? st.selected - room + 1 : 0;
  for (size_t i = first; i < rows.size() && i < first + room; i++) {
    const Row& r = rows[i];
    bool full = r.p.state == proc::State::kOk;
    auto cell = [&](uint64_t v) { return full ? human_bytes(v) : std::string("-"); };
    auto heap = [&](uint64_t v) { return r.has_heap ? human_bytes(v) : std::string("-"); };
    t.add({std::to_string(r.p.pid), human_bytes(r.p.mem.rss), cell(r.p.mem.pss), cell(r.p.mem.uss),
           heap(r.heap.stats.live_bytes), heap(r.free_resident()), r.allocator.empty() ? "-" : r.allocator,
           sparkline(st.history[r.p.pid]), r.command()});
  }
  std::string table = t.render(width);
  size_t at = 0;
  while (at < table.size()) {
    size_t nl = table.find('\n', at);
    lines.push_back(table.substr(at, nl - at));
    at = nl + 1;
  }
  *selected_line = rows.empty() ? SIZE_MAX : 2 + st.selected - first;
  return lines;
}

// Trims the process the user sees selected (not a fresh listing, whose order
// may have changed since the frame was drawn).
void trim_selected(State& st) {
  if (st.selected >= st.shown.size()) return;
  pid_t pid = st.shown[st.selected];
  telemetry::ReadResult r = telemetry::read_pid(pid);
  if (r.status != telemetry::Status::kOk) {
    st.status = fmt::format("{}: cannot trim ({}; allocator {})", pid, r.message, proc::allocator_of(pid));
    return;
  }
  telemetry::Ack ack = telemetry::send(pid, telemetry::kCmdTrim, 0, 5000);
  st.status = ack.status == telemetry::Status::kOk
                  ? fmt::format("{}: released {}, RSS {} -> {}", pid, human_bytes(ack.released),
                                human_bytes(ack.rss_before), human_bytes(ack.rss_after))
                  : fmt::format("{}: trim failed: {}", pid, ack.message);
}

int run_plain(const TopOptions& o) {
  State st;
  int n = o.iterations > 0 ? o.iterations : 1;
  for (int i = 0; i < n && !g_stop; i++) {
    if (i > 0) {
      usleep(static_cast<useconds_t>(o.interval_s * 1e6));
      fmt::print("\n");
    }
    size_t selected;
    for (const auto& line : frame(o, st, 0, SIZE_MAX / 2, &selected)) fmt::print("{}\n", line);
    fflush(stdout);
  }
  return 0;
}

int run_screen(TopOptions o) {  // a copy: the sort keys change it
  Screen screen;
  State st;
  const char* sorts[] = {"rss", "pss", "uss", "heap"};
  for (int i = 0; (o.iterations == 0 || i < o.iterations) && !g_stop; i++) {
    auto [width, height] = Screen::size();
    size_t selected;
    auto lines = frame(o, st, width, height, &selected);
    std::string out = "\x1b[H\x1b[2J";
    for (size_t l = 0; l < lines.size() && l + 2 < height; l++) {
      const std::string& text = lines[l];  // already fitted to the width
      out += l == selected ? "\x1b[7m" + text + "\x1b[0m\r\n" : text + "\r\n";
    }
    out += fmt::format("\x1b[{};1H", height - 1);
    out += st.status.substr(0, width) + "\r\n";
    out += std::string("q quit  r/p/u/h sort by RSS/PSS/USS/heap  up/down select  t trim").substr(0, width);
    fmt::print("{}", out);
    fflush(stdout);
    // Wait for a key or the next refresh.
    pollfd pfd = {STDIN_FILENO, POLLIN, 0};
    int timeout = static_cast<int>(o.interval_s * 1000);
    if (poll(&pfd, 1, timeout) <= 0) continue;
    char keys[16];
    ssize_t n = read(STDIN_FILENO, keys, sizeof keys);
    for (ssize_t k = 0; k < n; k++) {
      char c = keys[k];
      if (c == 'q' || c == 3) return 0;
      if (c == 't') trim_selected(st);
      for (const char* s : sorts)
        if (c == s[0]) o.sort = s;
      if (c == '\x1b' && k + 2 < n && keys[k + 1] == '[') {
        if (keys[k + 2] == 'A' && st.selected > 0) st.selected--;
        if (keys[k + 2] == 'B') st.selected++;
        k += 2;
      }
    }
  }
  return 0;
}

}  // namespace

void register_top(CLI::App& app, int& rc) {
  auto o = std::make_shared<TopOptions>();
  auto* sub = app.add_subcommand("top", "A refreshing view of ebb ps, with RSS trends; keys to sort and trim");
  sub->add_option("pid", o->sel.pids, "Processes to show (default: every process with memory)")
      ->check(CLI::PositiveNumber);
  sub->add_option("--tree", o->sel.tree, "Show PID and all its descendants")->check(CLI::PositiveNumber);
  sub->add_flag("--user", o->sel.user, "Only processes of the current user");
  sub->add_option("--sort", o->sort, "Initial sort column (default: rss)")
      ->check(CLI::IsMember({"rss", "pss", "uss", "heap", "pid"}));
  sub->add_option("-d,--interval", o->interval_s, "Seconds between refreshes (default: 1)")
      ->check(CLI::Range(0.05, 3600.0));
  sub->add_option("-n,--iterations", o->iterations,
                  "Refreshes before exiting (default: until q; 1 when stdout is not a terminal)")
      ->check(CLI::Range(0, 1000000));
  sub->callback([o, &rc] {
    struct sigaction sa = {};
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
    rc = isatty(STDOUT_FILENO) && isatty(STDIN_FILENO) ? run_screen(*o) : run_plain(*o);
  });
}

}  // namespace ebb::cli
