// The capture reader. A capture may end anywhere (its writer may have been
// killed): reading stops at the first record that is not complete.
#include "capture.h"

#include <cstdio>
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

// Native frames while the file is read: their functions get code ids after
// the Python code objects' once all of those are known.
constexpr uint32_t kNativeBase = uint32_t{1} << 31;

struct NativeFrames {
  const std::vector<NativeModule>& modules;
  Symbols symbols;
  std::map<std::pair<size_t, std::string>, uint32_t> ids;  // (module, function) -> index in `functions`
  std::map<uint64_t, uint32_t> by_pc;                      // return address -> kNativeBase + index
  std::vector<Code> functions;

  const NativeModule* module_of(uint64_t pc) const {
    for (const auto& m : modules)
      if (pc > m.start && pc <= m.end) return &m;  // pc - 1 is in the call
    return nullptr;
  }
  uint32_t id(uint64_t pc) {
    if (auto it = by_pc.find(pc); it != by_pc.end()) return it->second;
    const NativeModule* m = module_of(pc);
    std::string name = m != nullptr ? symbols.function(*m, pc) : "";
    const std::string file = m != nullptr ? m->path : "";
    if (name.empty()) {
      char off[40];
      std::snprintf(off, sizeof off, "+0x%llx", static_cast<unsigned long long>(m != nullptr ? pc - m->base : pc));
      name = (m != nullptr ? file.substr(file.rfind('/') + 1) : std::string("?")) + off;
    }
    const size_t mi = m != nullptr ? static_cast<size_t>(m - modules.data()) : modules.size();
    auto [it, fresh] = ids.try_emplace({mi, name}, static_cast<uint32_t>(functions.size()));
    if (fresh) {
      Code c;
      c.qualname = name;
      c.filename = file;
      c.native = true;
      functions.push_back(std::move(c));
    }
    return by_pc[pc] = kNativeBase + it->second;
  }
  bool is_self(uint64_t pc) const {
    const NativeModule* m = module_of(pc);
    return m != nullptr && m->self;
  }
};

// The interpreter's evaluation loop, or a part GCC split off it
// (`_PyEval_EvalFrameDefault.cold`, named with debug symbols only).
bool is_eval(const std::string& name) {
  static const std::string kEval = "_PyEval_EvalFrameDefault";
  return name.compare(0, kEval.size(), kEval) == 0 && (name.size() == kEval.size() || name[kEval.size()] == '.');
}

// One stack from a record's Python frames and return addresses: the native
// frames, innermost first, with each of the interpreter's frames
// (_PyEval_EvalFrameDefault) replaced by the Python frames it ran, which
// end at one marked kFrameEntry. libebb's own frames (malloc, the profiler)
// are left out.
std::vector<Location> hybrid(const std::vector<Location>& python, const std::vector<bool>& entry,
                             const std::vector<uint64_t>& pcs, NativeFrames& nf) {
  std::vector<Location> out;
  size_t i = 0, py = 0;
  while (i < pcs.size() && nf.is_self(pcs[i])) i++;
  auto python_group = [&] {
    while (py < python.size()) {
      const bool last = entry[py];
      if (python[py].code != 0) out.push_back(python[py]);
      py++;
      if (last) break;
    }
  };
  for (; i < pcs.size(); i++) {
    const uint32_t id = nf.id(pcs[i]);
    if (py < python.size() && is_eval(nf.functions[id - kNativeBase].qualname)) {
      python_group();
    } else {
      out.push_back({id, 0});
    }
  }
  while (py < python.size()) python_group();  // an unwinder that stopped early: the rest is Python's
  return out;
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
  c.native = (h.flags & capture::kFlagNative) != 0;
  c.truncated = (h.flags & capture::kFlagTruncated) != 0;
  c.python = h.python;
  c.dropped = h.dropped;
  c.start_unix_ns = h.start_unix_ns;
  c.codes.resize(1);
  // First the objects that native frames are in: a Module record may come
  // after the samples that need it.
  for (size_t off = h.header_bytes; c.native && off + sizeof(capture::RecordHead) <= d.size();) {
    const auto head = get<capture::RecordHead>(d, off);
    if (head.bytes == 0 || head.bytes % 8 != 0 || head.bytes > d.size() - off) break;
    if (head.type == capture::kModule && head.bytes >= sizeof(capture::ModuleRecord)) {
      const auto r = get<capture::ModuleRecord>(d, off);
      if (sizeof r + uint64_t{r.path_bytes} <= head.bytes && r.build_id_bytes <= sizeof r.build_id) {
        NativeModule m;
        m.path = d.substr(off + sizeof r, r.path_bytes);
        m.base = r.base;
        m.start = r.start;
        m.end = r.end;
        m.self = (r.flags & capture::kModuleSelf) != 0;
        m.build_id.assign(r.build_id, r.build_id + r.build_id_bytes);
        c.modules.push_back(std::move(m));
      }
    }
    off += head.bytes;
  }
  NativeFrames nf{c.modules, {}, {}, {}, {}};
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
      const size_t frames_end = sizeof r + size_t{head.count} * sizeof(capture::Frame);
      if (frames_end + uint64_t{r.native} * sizeof(uint64_t) > head.bytes) {
        c.complete = false;
        break;
      }
      std::vector<Location> stack;
      std::vector<bool> entry;
      for (size_t i = 0; i < head.count; i++) {
        auto f = get<capture::Frame>(d, off + sizeof r + i * sizeof(capture::Frame));
        if (f.code >= kNativeBase) f.code = 0;  // no code object has such an id: a damaged record
        const uint32_t instr = f.instr & ~capture::kFrameEntry;
        const int line = f.code != 0 && f.code < c.codes.size() ? c.codes[f.code].line_of(instr) : -1;
        stack.push_back({f.code, line});
        entry.push_back((f.instr & capture::kFrameEntry) != 0);
      }
      if (r.native > 0) {
        std::vector<uint64_t> pcs(r.native);
        std::memcpy(pcs.data(), d.data() + off + frames_end, pcs.size() * sizeof(uint64_t));
        stack = hybrid(stack, entry, pcs, nf);
      } else {
        std::erase_if(stack, [](const Location& l) { return l.code == 0; });  // entry markers
      }
      std::vector<uint32_t> key;
      for (const Location& l : stack) {
        key.push_back(l.code);
        key.push_back(static_cast<uint32_t>(l.line));
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
  // Native functions take the ids after the last code object's.
  const auto first_native = static_cast<uint32_t>(c.codes.size());
  for (auto& stack : c.stacks)
    for (Location& l : stack)
      if (l.code >= kNativeBase) l.code = l.code - kNativeBase + first_native;
  for (auto& f : nf.functions) c.codes.push_back(std::move(f));
  return c;
}

}  // namespace ebb::profile
