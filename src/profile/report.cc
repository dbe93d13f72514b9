#include "report.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <tuple>
#include <unordered_map>

namespace ebb::profile {

double sample_weight(uint64_t size, uint64_t rate, bool all) {
  if (all || rate <= 1) return static_cast<double>(size);
  const double p = -std::expm1(-static_cast<double>(size) / static_cast<double>(rate));
  return p > 0 ? static_cast<double>(size) / p : static_cast<double>(rate);
}

namespace {

// Replays the events up to index `until` (exclusive), keeping what is live.
struct Replay {
  explicit Replay(const Capture& capture) : c(capture) {}
  const Capture& c;
  std::unordered_map<uint64_t, size_t> live;  // address -> alloc event index
  double bytes = 0;
  size_t next = 0;

  double weight(const Event& e) const { return sample_weight(e.size, c.rate, c.all); }
  // Applies event `next`; false at the end of the capture.
  bool step() {
    if (next >= c.events.size()) return false;
    const Event& e = c.events[next];
    if (e.kind == EventKind::kAlloc) {
      auto [it, fresh] = live.try_emplace(e.addr, next);
      if (!fresh) bytes -= weight(c.events[it->second]);  // its free was not seen: replaced
      it->second = next;
      bytes += weight(e);
    } else if (e.kind == EventKind::kFree) {
      auto it = live.find(e.addr);
      if (it != live.end()) {
        bytes -= weight(c.events[it->second]);
        live.erase(it);
      }
    }
    next++;
    return true;
  }
  Snapshot snapshot(std::string name, uint64_t time_ns) const {
    Snapshot s;
    s.name = std::move(name);
    s.time_ns = time_ns;
    s.by_stack.assign(c.stacks.size(), 0);
    s.count_by_stack.assign(c.stacks.size(), 0);
    for (const auto& [addr, i] : live) {
      const Event& e = c.events[i];
      s.by_stack[e.stack] += weight(e);
      s.count_by_stack[e.stack]++;
      s.bytes += weight(e);
    }
    return s;
  }
};

uint64_t last_time(const Capture& c) { return c.events.empty() ? 0 : c.events.back().time_ns; }

}  // namespace

Analysis analyze(const Capture& c) {
  Analysis a;
  a.total.name = "total";
  a.total.by_stack.assign(c.stacks.size(), 0);
  a.total.count_by_stack.assign(c.stacks.size(), 0);
  // Pass 1: the peak's position, the end marker, the totals, the timeline.
  Replay r(c);
  double peak = -1;
  size_t peak_at = 0, end_at = c.events.size();
  const uint64_t span = last_time(c);
  const uint64_t step = std::max<uint64_t>(1, span / 1000);
  uint64_t next_point = 0;
  while (r.next < c.events.size()) {
    const Event& e = c.events[r.next];
    if (e.kind == EventKind::kEnd && end_at == c.events.size()) end_at = r.next;
    if (e.kind == EventKind::kAlloc) {
      const double w = r.weight(e);
      a.total.by_stack[e.stack] += w;
      a.total.count_by_stack[e.stack]++;
      a.total.bytes += w;
    }
    r.step();
    if (r.bytes > peak && end_at == c.events.size()) {
      peak = r.bytes;
      peak_at = r.next;
    }
    if (e.time_ns >= next_point || r.next == c.events.size()) {
      a.timeline.time_ns.push_back(e.time_ns);
      a.timeline.heap.push_back(r.bytes);
      next_point = e.time_ns + step;
    }
  }
  a.total.time_ns = span;
  // Pass 2: the live set at the peak and at the end.
  Replay q(c);
  while (q.next < peak_at) q.step();
  a.peak = q.snapshot("peak", peak_at > 0 ? c.events[peak_at - 1].time_ns : 0);
  while (q.next < end_at) q.step();
  a.end = q.snapshot("end", end_at < c.events.size() ? c.events[end_at].time_ns : span);
  return a;
}

Snapshot snapshot_at(const Capture& c, uint64_t time_ns) {
  Replay r(c);
  while (r.next < c.events.size() && c.events[r.next].time_ns <= time_ns) r.step();
  return r.snapshot("at", time_ns);
}

MemoryView memory_at(const Capture& c, uint64_t time_ns) {
  MemoryView v;
  if (c.stats.empty()) return v;
  const MemoryStats* m = &c.stats.front();
  for (const auto& s : c.stats)
    if (s.time_ns <= time_ns) m = &s;
  v.known = true;
  v.time_ns = m->time_ns;
  v.rss = m->rss;
  v.file = std::min(m->file, m->rss);
  v.anon = v.rss - v.file;
  v.live = m->live;
  v.heap_resident = m->heap_resident;
  v.thread_cached = m->thread_cached;
  v.large_cached = m->large_cached;
  const uint64_t accounted = v.live + v.thread_cached + v.large_cached;
  v.free_in_spans = v.heap_resident > accounted ? v.heap_resident - accounted : 0;
  if (v.heap_resident <= v.anon)
    v.other_anon = v.anon - v.heap_resident;
  else
    v.untouched = v.heap_resident - v.anon;
  v.profiler = m->profiler;
  return v;
}

std::vector<Site> sites(const Capture& c, const Snapshot& s) {
  using Key = std::tuple<std::string, std::string, int>;
  std::map<Key, Site> by_key;
  auto site_of = [&](const Location& l) -> Site& {
    const Code& code = l.code < c.codes.size() ? c.codes[l.code] : c.codes[0];
    Key k{code.qualname, code.filename, l.line};
    auto [it, fresh] = by_key.try_emplace(k);
    if (fresh) it->second = Site{code.qualname, code.filename, l.line, 0, 0, 0, code.native};
    return it->second;
  };
  Site native{"[no Python frame]", "", 0, 0, 0, 0};
  for (size_t i = 0; i < c.stacks.size(); i++) {
    const double w = s.by_stack[i];
    if (w == 0) continue;
    const auto& stack = c.stacks[i];
    if (stack.empty()) {
      native.own += w;
      native.inclusive += w;
      native.count += s.count_by_stack[i];
      continue;
    }
    Site& leaf = site_of(stack[0]);
    leaf.own += w;
    leaf.count += s.count_by_stack[i];
    std::set<Key> seen;  // a recursive stack counts once per site
    for (const Location& l : stack) {
      Site& site = site_of(l);
      if (seen.insert({site.function, site.file, site.line}).second) site.inclusive += w;
    }
  }
  std::vector<Site> out;
  out.reserve(by_key.size() + 1);
  for (auto& [k, site] : by_key) out.push_back(std::move(site));
  if (native.inclusive > 0) out.push_back(native);
  std::sort(out.begin(), out.end(),
            [](const Site& a, const Site& b) { return a.own != b.own ? a.own > b.own : a.inclusive > b.inclusive; });
  return out;
}

}  // namespace ebb::profile
