#include "html.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <tuple>
#include <unordered_map>

namespace ebb::profile {

extern const char* const kReportPage;  // report_page.html, embedded at build time (report_page.cc.in)

namespace {

using nlohmann::json;

double seconds(uint64_t ns) { return static_cast<double>(ns) / 1e9; }

// [[stack, bytes, count], ...] of a snapshot, stacks that hold nothing left out.
json view_of(const Snapshot& s) {
  json entries = json::array();
  for (size_t i = 0; i < s.by_stack.size(); i++)
    if (s.by_stack[i] > 0) entries.push_back({i, std::llround(s.by_stack[i]), s.count_by_stack[i]});
  return {{"t", seconds(s.time_ns)}, {"bytes", std::llround(s.bytes)}, {"s", std::move(entries)}};
}

// Every sample with the time buckets of its allocation and of its free (-1:
// live when the capture ends), summed by (stack, allocated, freed): what the
// page needs to show the live heap at any of `n` moments.
json buckets_of(const Capture& c, uint64_t duration_ns, int n) {
  const double width = std::max(1.0, static_cast<double>(duration_ns) / n);
  auto bucket = [&](uint64_t t) { return std::min(n - 1, static_cast<int>(static_cast<double>(t) / width)); };
  struct Live {
    uint32_t stack;
    double bytes;
    int allocated;
  };
  std::unordered_map<uint64_t, Live> live;
  std::map<std::tuple<uint32_t, int, int>, std::pair<double, uint64_t>> sums;
  auto close = [&](const Live& l, int freed) {
    auto& s = sums[{l.stack, l.allocated, freed}];
    s.first += l.bytes;
    s.second++;
  };
  for (const Event& e : c.events) {
    if (e.kind == EventKind::kAlloc) {
      auto [it, fresh] = live.try_emplace(e.addr);
      if (!fresh) close(it->second, bucket(e.time_ns));  // its free was not seen: replaced
      it->second = {e.stack, sample_weight(e.size, c.rate, c.all), bucket(e.time_ns)};
    } else if (e.kind == EventKind::kFree) {
      auto it = live.find(e.addr);
      if (it == live.end()) continue;
      // Freed within the bucket it was made in: never live at a bucket's end.
      const int freed = bucket(e.time_ns);
      if (freed != it->second.allocated) close(it->second, freed);
      live.erase(it);
    }
  }
  for (const auto& [addr, l] : live) close(l, -1);
  json entries = json::array();
  for (const auto& [key, v] : sums) {
    const auto& [stack, allocated, freed] = key;
    entries.push_back({stack, std::llround(v.first), v.second, allocated, freed});
  }
  return {{"n", n}, {"dt", width / 1e9}, {"s", std::move(entries)}};
}

}  // namespace

std::string html_report(const Capture& c, const Analysis& a, const HtmlOptions& o) {
  // Frames: one per (code, line), as the table counts sites.
  std::map<std::pair<uint32_t, int>, size_t> frame_ids;
  json frames = json::array(), stacks = json::array();
  for (const auto& stack : c.stacks) {
    json ids = json::array();
    for (const Location& l : stack) {
      auto [it, fresh] = frame_ids.try_emplace({l.code, l.line}, frame_ids.size());
      if (fresh) {
        const Code& code = l.code < c.codes.size() ? c.codes[l.code] : c.codes[0];
        frames.push_back({code.qualname.empty() ? "?" : code.qualname, code.filename, l.line, code.native});
      }
      ids.push_back(it->second);
    }
    stacks.push_back(std::move(ids));
  }
  uint64_t duration = c.events.empty() ? 0 : c.events.back().time_ns;
  if (!c.stats.empty()) duration = std::max(duration, c.stats.back().time_ns);
  json stats = {{"t", json::array()},      {"rss", json::array()},     {"file", json::array()},
                {"live", json::array()},   {"heap", json::array()},    {"tcache", json::array()},
                {"lcache", json::array()}, {"profiler", json::array()}};
  for (const auto& s : c.stats) {
    stats["t"].push_back(seconds(s.time_ns));
    stats["rss"].push_back(s.rss);
    stats["file"].push_back(s.file);
    stats["live"].push_back(s.live);
    stats["heap"].push_back(s.heap_resident);
    stats["tcache"].push_back(s.thread_cached);
    stats["lcache"].push_back(s.large_cached);
    stats["profiler"].push_back(s.profiler);
  }
  json timeline = {{"t", json::array()}, {"heap", json::array()}};
  for (size_t i = 0; i < a.timeline.time_ns.size(); i++) {
    timeline["t"].push_back(seconds(a.timeline.time_ns[i]));
    timeline["heap"].push_back(std::llround(a.timeline.heap[i]));
  }
  json buckets = buckets_of(c, duration, 200);
  if (buckets["s"].size() > 400000) buckets = buckets_of(c, duration, 50);  // a page a browser still opens
  json data = {{"capture", c.path},
               {"pid", c.pid},
               {"all", c.all},
               {"rate", c.rate},
               {"complete", c.complete},
               {"truncated", c.truncated},
               {"duration", seconds(duration)},
               {"frames", std::move(frames)},
               {"stacks", std::move(stacks)},
               {"views", {{"peak", view_of(a.peak)}, {"end", view_of(a.end)}, {"total", view_of(a.total)}}},
               {"timeline", std::move(timeline)},
               {"stats", std::move(stats)},
               {"buckets", std::move(buckets)},
               {"initial", o.initial},
               {"inverted", o.inverted}};
  // Inside <script>, "</" could end the element: JSON lets it be "<\/".
  std::string text = data.dump(-1, ' ', false, json::error_handler_t::replace);
  for (size_t at = text.find("</"); at != std::string::npos; at = text.find("</", at + 3)) text.insert(at + 1, "\\");
  std::string page = kReportPage;
  const std::string slot = "/*EBB_DATA*/";
  page.replace(page.find(slot), slot.size(), text);
  return page;
}

}  // namespace ebb::profile
