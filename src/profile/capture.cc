// The capture reader. A capture may end anywhere (its writer may have been
// killed): reading stops at the first record that is not complete.
#include "capture.h"

#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <stdexcept>

#include "capture_format.h"

namespace ebb::profile {

namespace {

// CPython 3.11's location table (Objects/locations.md): entries of one byte
// 1cccclll (code c, length l+1 code units) and a code-dependent tail of
// 6-bit varints, bit 6 meaning "more".
struct LineReader {
  const std::vector<uint8_t>& t;
  size_t at = 0;
  bool more() const { return at < t.size(); }
  uint32_t varint() {
    uint32_t v = 0;
    unsigned shift = 0;
    while (at < t.size()) {
      uint8_t b = t[at++];
      v |= static_cast<uint32_t>(b & 63) << shift;
      shift += 6;
      if ((b & 64) == 0 || shift > 30) break;
    }
    return v;
  }
  int svarint() {
    uint32_t u = varint();
    return (u & 1) != 0 ? -static_cast<int>(u >> 1) : static_cast<int>(u >> 1);
  }
};

template <typename T>
T get(const std::string& d, size_t off) {
  T v;
  std::memcpy(&v, d.data() + off, sizeof v);
  return v;
}

}  // namespace

int Code::line_of(uint32_t instr) const {
  LineReader r{linetable};
  int line = first_line;
  uint32_t unit = 0;
  while (r.more()) {
    const uint8_t first = linetable[r.at++];
    const unsigned code = (first >> 3) & 15;
    const uint32_t length = (first & 7) + 1u;
    int entry_line = line;
    if (code == 15) {  // no location
      entry_line = -1;
    } else if (code == 14) {  // long form
      line += r.svarint();
      entry_line = line;
      r.varint(), r.varint(), r.varint();  // end line, columns
    } else if (code == 13) {               // no columns
      line += r.svarint();
      entry_line = line;
    } else if (code >= 10) {  // one line, two column bytes
      line += static_cast<int>(code) - 10;
      entry_line = line;
      r.at += 2;
    } else {  // short form: same line, one column byte
      r.at += 1;
    }
    if (instr < unit + length) return entry_line;
    unit += length;
  }
  return -1;
}

Capture read_capture(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  std::string d((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (d.size() < sizeof(capture::Header) || get<uint64_t>(d, 0) != capture::kMagic)
    throw std::runtime_error(path + ": not an ebb profile capture");
  const auto h = get<capture::Header>(d, 0);
  if (h.version != capture::kVersion)
    throw std::runtime_error(path + ": capture format " + std::to_string(h.version) + ", this ebb reads " +
                             std::to_string(capture::kVersion));
  Capture c;
  c.path = path;
  c.pid = h.pid;
  c.ppid = h.ppid;
  c.rate = h.rate;
  c.all = (h.flags & capture::kFlagAll) != 0;
  c.truncated = (h.flags & capture::kFlagTruncated) != 0;
  c.python = h.python;
  c.dropped = h.dropped;
  c.start_unix_ns = h.start_unix_ns;
  c.codes.resize(1);
  std::map<std::vector<uint32_t>, uint32_t> stack_ids;  // (code, line) pairs flattened
  size_t off = h.header_bytes;
  while (off + sizeof(capture::RecordHead) <= d.size()) {
    const auto head = get<capture::RecordHead>(d, off);
    if (head.bytes == 0) break;
    if (head.bytes % 8 != 0 || head.bytes > d.size() - off) {
      c.complete = false;
      break;
    }
    if (head.type == capture::kCode && head.bytes >= sizeof(capture::CodeRecord)) {
      const auto r = get<capture::CodeRecord>(d, off);
      const size_t text = off + sizeof r;
      // Ids count up from 1, one per record: one beyond what the file can
      // hold is damage, not a code object.
      if (r.id == 0 || r.id > d.size() / sizeof r ||
          sizeof r + uint64_t{r.filename_bytes} + r.qualname_bytes + r.linetable_bytes > head.bytes) {
        c.complete = false;
        break;
      }
      Code code;
      code.filename = d.substr(text, r.filename_bytes);
      code.qualname = d.substr(text + r.filename_bytes, r.qualname_bytes);
      code.first_line = r.first_line;
      const char* lt = d.data() + text + r.filename_bytes + r.qualname_bytes;
      code.linetable.assign(lt, lt + r.linetable_bytes);
      if (c.codes.size() <= r.id) c.codes.resize(size_t{r.id} + 1);
      c.codes[r.id] = std::move(code);
    } else if (head.type == capture::kAlloc && head.bytes >= sizeof(capture::AllocRecord)) {
      const auto r = get<capture::AllocRecord>(d, off);
      if (sizeof r + size_t{head.count} * sizeof(capture::Frame) > head.bytes) {
        c.complete = false;
        break;
      }
      std::vector<uint32_t> key;
      std::vector<Location> stack;
      for (size_t i = 0; i < head.count; i++) {
        const auto f = get<capture::Frame>(d, off + sizeof r + i * sizeof(capture::Frame));
        const int line = f.code < c.codes.size() ? c.codes[f.code].line_of(f.instr) : -1;
        stack.push_back({f.code, line});
        key.push_back(f.code);
        key.push_back(static_cast<uint32_t>(line));
      }
      auto [it, fresh] = stack_ids.try_emplace(std::move(key), static_cast<uint32_t>(c.stacks.size()));
      if (fresh) c.stacks.push_back(std::move(stack));
      c.events.push_back({EventKind::kAlloc, r.tid, r.addr, r.size, r.time_ns, it->second});
    } else if (head.type == capture::kFree && head.bytes >= sizeof(capture::FreeRecord)) {
      const auto r = get<capture::FreeRecord>(d, off);
      c.events.push_back({EventKind::kFree, 0, r.addr, 0, r.time_ns, 0});
    } else if (head.type == capture::kStats && head.bytes >= sizeof(capture::StatsRecord)) {
      const auto r = get<capture::StatsRecord>(d, off);
      c.stats.push_back({r.time_ns, r.rss_bytes, r.file_bytes, r.live_bytes, r.heap_resident_bytes,
                         r.thread_cached_bytes, r.large_cached_bytes, r.mapped_bytes, r.profiler_bytes});
    } else if (head.type == capture::kEnd && head.bytes >= sizeof(capture::EndRecord)) {
      const auto r = get<capture::EndRecord>(d, off);
      c.events.push_back({EventKind::kEnd, 0, 0, 0, r.time_ns, 0});
    }
    off += head.bytes;
  }
  return c;
}

}  // namespace ebb::profile
