// Profiling: allocations sampled by bytes, with their Python stacks, written
// to a capture file as the program runs (format: src/profile/capture_format.h).
//
// Off unless EBB_PROFILE names a file prefix (ebb profile sets it), or until
// `ebb profile --pid` turns it on through the telemetry page (and off again).
// Off, the cost is what alloc.h already pays for its stats: the byte counter
// is compared with the thread's next sample point, which stays at "never".
//
// On, a random byte every EBB_PROFILE_RATE bytes allocated on average (the
// gaps are exponential, so sampling does not lock onto a loop's pattern) marks
// the allocation holding it; the reader weights it by the inverse of its
// chance of being picked, which keeps the estimate unbiased for every size.
// The free of a sampled object is recorded too: a small object's span carries
// a bit (Span::sampled) that sends its frees here, where a table of the live
// sampled addresses tells them apart. Everything here runs inside malloc or
// free: no allocation, no Python call but two that only read memory
// (PyGILState_GetThisThreadState, _Py_IsFinalizing), and one lock taken last.
//
// Native stacks (--native) come from glibc's backtrace(), that is libgcc's
// unwinder reading .eh_frame: it allocates only the first time (it loads
// libgcc_s), which happens here outside malloc before profiling starts, and
// it runs before g_lock is taken (it takes the loader's lock, and the
// module scan takes g_lock under it: one order).
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <execinfo.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstring>

#include "capture_format.h"
#include "heap.h"
#include "os.h"
#include "page.h"

namespace ebb {

bool g_profile_on = false;

namespace {

using capture::Frame;

// ---- CPython 3.11, read in place --------------------------------------------
// Offsets from Debian's python3.11 headers (Include/cpython/pystate.h,
// cpython/code.h, internal/pycore_frame.h); tests/integration/test_profile.py
// compiles a program against those headers and checks them.
namespace py311 {
constexpr size_t kTstateCframe = 56;         // PyThreadState::cframe
constexpr size_t kCframeCurrent = 8;         // _PyCFrame::current_frame
constexpr size_t kFrameCode = 32;            // _PyInterpreterFrame::f_code
constexpr size_t kFramePrevious = 48;        // ::previous
constexpr size_t kFramePrevInstr = 56;       // ::prev_instr
constexpr size_t kFrameIsEntry = 68;         // ::is_entry
constexpr size_t kFrameOwner = 69;           // ::owner
constexpr char kOwnedByGenerator = 1;        // FRAME_OWNED_BY_GENERATOR
constexpr size_t kObType = 8;                // PyObject::ob_type
constexpr size_t kCodeFirstLine = 72;        // PyCodeObject::co_firstlineno
constexpr size_t kCodeFilename = 112;        // ::co_filename
constexpr size_t kCodeName = 120;            // ::co_name
constexpr size_t kCodeQualname = 128;        // ::co_qualname
constexpr size_t kCodeLinetable = 136;       // ::co_linetable
constexpr size_t kCodeFirstTraceable = 168;  // ::_co_firsttraceable
constexpr size_t kCodeUnits = 184;           // ::co_code_adaptive
constexpr size_t kVarSize = 16;              // PyVarObject::ob_size
constexpr size_t kBytesData = 32;            // PyBytesObject::ob_sval
constexpr size_t kStrLength = 16;            // PyASCIIObject::length
constexpr size_t kStrState = 32;             // ::state (bit field)
constexpr size_t kStrAsciiData = 48;         // sizeof(PyASCIIObject)
constexpr size_t kStrCompactData = 72;       // sizeof(PyCompactUnicodeObject)
}  // namespace py311

struct Python {
  void* (*this_thread_state)() = nullptr;  // PyGILState_GetThisThreadState
  int (*is_finalizing)() = nullptr;        // _Py_IsFinalizing
  const void* code_type = nullptr;         // &PyCode_Type: frames whose code is not one are not followed
  uint32_t version = 0;                    // Py_Version
};
Python g_py;

template <typename T>
T load(const uint8_t* p, size_t off) {
  T v;
  memcpy(&v, p + off, sizeof v);
  return v;
}
const uint8_t* load_ptr(const uint8_t* p, size_t off) { return load<const uint8_t*>(p, off); }

// A str object's text as UTF-8 into dst (nullptr: only count), at most cap bytes.
size_t str_utf8(const uint8_t* s, char* dst, size_t cap) {
  if (s == nullptr) return 0;
  const uint64_t len = load<uint64_t>(s, py311::kStrLength);
  const uint32_t state = load<uint32_t>(s, py311::kStrState);
  const unsigned kind = (state >> 2) & 7, compact = (state >> 5) & 1, ascii = (state >> 6) & 1;
  if (!compact) return 0;  // legacy strings: code objects' names never are
  const uint8_t* data = s + (ascii ? py311::kStrAsciiData : py311::kStrCompactData);
  size_t n = 0;
  for (uint64_t i = 0; i < len; i++) {
    uint32_t c = kind == 1 ? data[i] : kind == 2 ? load<uint16_t>(data, 2 * i) : load<uint32_t>(data, 4 * i);
    // Lone surrogates (undecodable bytes of a file name, as Python keeps
    // them) and anything beyond Unicode are not UTF-8: U+FFFD instead.
    if ((c >= 0xd800 && c <= 0xdfff) || c > 0x10ffff) c = 0xfffd;
    char buf[4];
    size_t m;
    if (c < 0x80) {
      buf[0] = static_cast<char>(c), m = 1;
    } else if (c < 0x800) {
      buf[0] = static_cast<char>(0xc0 | (c >> 6)), buf[1] = static_cast<char>(0x80 | (c & 63)), m = 2;
    } else if (c < 0x10000) {
      buf[0] = static_cast<char>(0xe0 | (c >> 12)), buf[1] = static_cast<char>(0x80 | ((c >> 6) & 63));
      buf[2] = static_cast<char>(0x80 | (c & 63)), m = 3;
    } else {
      buf[0] = static_cast<char>(0xf0 | (c >> 18)), buf[1] = static_cast<char>(0x80 | ((c >> 12) & 63));
      buf[2] = static_cast<char>(0x80 | ((c >> 6) & 63)), buf[3] = static_cast<char>(0x80 | (c & 63)), m = 4;
    }
    if (n + m > cap) break;
    if (dst != nullptr) memcpy(dst + n, buf, m);
    n += m;
  }
  return n;
}

// ---- the capture file -------------------------------------------------------
Lock g_lock;  // everything below; taken with no other libebb lock held
int g_fd = -1;
dev_t g_dev = 0;           // the capture's identity: a program that closes every fd and
ino_t g_ino = 0;           // opens another file on the same number must not see it grow
uint8_t* g_map = nullptr;  // g_map_bytes of address space over the file
uint64_t g_map_bytes = 0;
uint64_t g_file_bytes = 0;
uint64_t g_used = 0;
capture::Header* g_header = nullptr;
bool g_all = false;
bool g_native = false;  // native stacks too
bool g_ended = false;
uint64_t g_rate = 0;
char g_prefix[kMaxProfilePrefix];  // captures are <prefix>.<pid>.ebbprof
char g_path[300];                  // the one being written
bool g_follow_fork = false;        // a forked child opens its own (EBB_PROFILE), or stops (attached)

uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

// The file goes from `from` to `to` bytes with its blocks allocated: a write
// through the mapping to a block the file system could not provide would
// kill the program with SIGBUS (a full disk). False: the capture stops here.
bool grow_file(uint64_t from, uint64_t to) {
  struct stat st;
  if (fstat(g_fd, &st) != 0 || st.st_dev != g_dev || st.st_ino != g_ino) return false;  // not our file any more
  if (fallocate(g_fd, 0, static_cast<off_t>(from), static_cast<off_t>(to - from)) == 0) return true;
  // A file system without fallocate: a sparse extension, as good as it gets.
  return errno == EOPNOTSUPP && ftruncate(g_fd, static_cast<off_t>(to)) == 0;
}

// Room for a record of `bytes` (a multiple of 8), or nullptr when the file
// cannot grow (then the capture says it was truncated).
uint8_t* reserve(size_t bytes) {
  if (g_map == nullptr) return nullptr;
  if (g_used + bytes + sizeof(capture::RecordHead) > g_file_bytes) {
    const uint64_t want = g_file_bytes + capture::kGrowBytes;
    if (want > g_map_bytes || !grow_file(g_file_bytes, want)) {
      g_header->flags |= capture::kFlagTruncated;
      return nullptr;
    }
    g_file_bytes = want;
    // The records written so far leave the process's page tables (they stay
    // in the page cache and reach the file): a long capture must not count
    // in the RSS that ebb run recycles workers for. The header page comes
    // back at its next write.
    madvise(g_map, g_used & ~(kPageSize - 1), MADV_DONTNEED);
  }
  uint8_t* at = g_map + g_used;
  g_used += bytes;
  return at;
}

// The record is complete: its length goes in last, for a reader of a capture
// whose writer died at any point.
void publish(uint8_t* at, size_t bytes, capture::RecordType type, uint16_t count) {
  auto* head = reinterpret_cast<capture::RecordHead*>(at);
  head->type = type;
  head->count = count;
  __atomic_store_n(&head->bytes, static_cast<uint32_t>(bytes), __ATOMIC_RELEASE);
}

constexpr size_t round8(size_t n) { return (n + 7) & ~size_t{7}; }

// ---- code objects seen so far -----------------------------------------------
struct CodeSlot {
  const uint8_t* code;
  const uint8_t* name;  // with first_line: a code object freed and another made at its address is told apart
  int32_t first_line;
  uint32_t id;
};
constexpr size_t kCodeSlots = size_t{1} << 16;
CodeSlot* g_codes = nullptr;  // kCodeSlots, mapped at start
uint32_t g_next_code = 1;
constexpr size_t kMaxName = 4096;

uint32_t write_code(const uint8_t* code, int32_t first_line) {
  const uint8_t* file = load_ptr(code, py311::kCodeFilename);
  const uint8_t* qual = load_ptr(code, py311::kCodeQualname);
  const uint8_t* table = load_ptr(code, py311::kCodeLinetable);
  const size_t nf = str_utf8(file, nullptr, kMaxName), nq = str_utf8(qual, nullptr, kMaxName);
  const uint64_t nt = table != nullptr ? load<uint64_t>(table, py311::kVarSize) : 0;
  if (nt > (1u << 20)) return 0;
  const size_t bytes = round8(sizeof(capture::CodeRecord) + nf + nq + nt);
  uint8_t* at = reserve(bytes);
  if (at == nullptr) return 0;
  auto* r = reinterpret_cast<capture::CodeRecord*>(at);
  r->id = g_next_code++;
  r->first_line = first_line;
  r->filename_bytes = static_cast<uint32_t>(nf);
  r->qualname_bytes = static_cast<uint32_t>(nq);
  r->linetable_bytes = static_cast<uint32_t>(nt);
  auto* text = reinterpret_cast<char*>(r + 1);
  str_utf8(file, text, nf);
  str_utf8(qual, text + nf, nq);
  if (nt > 0) memcpy(text + nf + nq, table + py311::kBytesData, nt);
  publish(at, bytes, capture::kCode, 0);
  return r->id;
}

uint32_t code_id(const uint8_t* code) {
  const uint8_t* name = load_ptr(code, py311::kCodeName);
  const int32_t first_line = load<int32_t>(code, py311::kCodeFirstLine);
  size_t i = (reinterpret_cast<uintptr_t>(code) >> 4) * 0x9e3779b97f4a7c15ull >> (64 - 16);
  for (size_t probe = 0; probe < 64; probe++, i = (i + 1) & (kCodeSlots - 1)) {
    CodeSlot& s = g_codes[i];
    if (s.code == code && s.name == name && s.first_line == first_line) return s.id;
    if (s.code == nullptr || s.code == code) {
      const uint32_t id = write_code(code, first_line);
      if (id != 0) s = {code, name, first_line, id};
      return id;
    }
  }
  return write_code(code, first_line);  // a crowded neighbourhood: written again, still correct
}

// The calling thread's Python frames, innermost first.
uint32_t python_frames(Frame* out) {
  if (g_py.this_thread_state == nullptr) return 0;
  const auto* ts = static_cast<const uint8_t*>(g_py.this_thread_state());
  if (ts == nullptr) return 0;
  const uint8_t* cframe = load_ptr(ts, py311::kTstateCframe);
  if (cframe == nullptr) return 0;
  const uint8_t* f = load_ptr(cframe, py311::kCframeCurrent);
  uint32_t n = 0;
  while (f != nullptr && n < capture::kMaxFrames) {
    const uint8_t* code = load_ptr(f, py311::kFrameCode);
    // Not a code object, or one being deallocated (a weakref callback runs
    // with its frame still current, its strings already gone): stop here.
    if (code == nullptr || load_ptr(code, py311::kObType) != g_py.code_type || load<int64_t>(code, 0) <= 0) break;
    const uint8_t* units = code + py311::kCodeUnits;
    const uint8_t* instr = load_ptr(f, py311::kFramePrevInstr);
    const int32_t first_traceable = load<int32_t>(code, py311::kCodeFirstTraceable);
    // A frame still being set up has run none of its own code (CPython's
    // _PyFrame_IsIncomplete): CPython leaves it out of tracebacks too.
    const bool incomplete =
        load<char>(f, py311::kFrameOwner) != py311::kOwnedByGenerator && instr < units + ptrdiff_t{2} * first_traceable;
    const uint32_t entry = load<bool>(f, py311::kFrameIsEntry) ? capture::kFrameEntry : 0;
    const uint32_t id = incomplete ? 0 : code_id(code);
    if (id != 0) {
      out[n++] = {id, (instr > units ? static_cast<uint32_t>((instr - units) / 2) : 0) | entry};
    } else if (entry != 0) {
      out[n++] = {0, entry};  // its C call still needs its place in a native stack
    }
    f = load_ptr(f, py311::kFramePrevious);
  }
  return n;
}

// Maps `n` entries of fresh anonymous memory (zero), or nullptr.
template <typename T>
T* map_table(size_t n) {
  return static_cast<T*>(os::map_aligned((n * sizeof(T) + kPageSize - 1) & ~(kPageSize - 1), kPageSize));
}

template <typename T>
void unmap_table(T*& t, size_t n) {
  if (t != nullptr) os::unmap(t, (n * sizeof(T) + kPageSize - 1) & ~(kPageSize - 1));
  t = nullptr;
}

// ---- loaded objects, for native stacks ---------------------------------------
// The purger looks at the loader's list four times a second (dlpi_adds and
// dlpi_subs say when it changed) and writes a Module record for each object
// the capture has not named yet: a return address is named by the reader
// from the object holding it. Staged first, with the loader's lock held and
// g_lock not, then written under g_lock.
constexpr size_t kMaxModules = 2048;
constexpr size_t kMaxModulePath = 480;
struct Module {
  uint64_t base, start, end;
  uint32_t flags;
  uint32_t build_id_bytes;
  uint8_t build_id[24];
  uint32_t path_bytes;
  char path[kMaxModulePath];
};
struct ModuleScan {
  Module staged[kMaxModules];
  size_t count;
  unsigned long long adds, subs;  // the loader's counters at the last full scan
};
ModuleScan* g_scan = nullptr;  // mapped at the first scan, kept: the purger's alone
Lock g_scan_lock;              // one scan at a time (purger, detach, exit)
// What this capture has named (kMaxModules, under g_lock). Whole records:
// a forked child names them in its own capture at once.
Module* g_seen = nullptr;
size_t g_seen_count = 0;

// The same object at the same place: an object unloaded and another loaded
// at its address is named again.
bool same_module(const Module& a, const Module& b) {
  return a.base == b.base && a.start == b.start && a.end == b.end && a.path_bytes == b.path_bytes &&
         a.build_id_bytes == b.build_id_bytes && memcmp(a.build_id, b.build_id, a.build_id_bytes) == 0 &&
         memcmp(a.path, b.path, a.path_bytes) == 0;
}

// The object's NT_GNU_BUILD_ID, read from its loaded notes.
uint32_t build_id(const dl_phdr_info* info, uint8_t* out, size_t cap) {
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_NOTE) continue;
    const auto* p = reinterpret_cast<const uint8_t*>(info->dlpi_addr + ph.p_vaddr);
    const uint8_t* end = p + ph.p_memsz;
    while (p + sizeof(ElfW(Nhdr)) <= end) {
      ElfW(Nhdr) nh;
      memcpy(&nh, p, sizeof nh);
      const uint8_t* desc = p + sizeof nh + ((nh.n_namesz + 3) & ~3u);
      if (desc + nh.n_descsz > end) break;
      if (nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 && memcmp(p + sizeof nh, "GNU", 4) == 0) {
        const size_t n = nh.n_descsz < cap ? nh.n_descsz : cap;
        memcpy(out, desc, n);
        return static_cast<uint32_t>(n);
      }
      p = desc + ((nh.n_descsz + 3) & ~3u);
    }
  }
  return 0;
}

int stage_module(dl_phdr_info* info, size_t size, void* force) {
  ModuleScan& sc = *g_scan;
  if (sc.count == 0 && force == nullptr && size >= offsetof(dl_phdr_info, dlpi_subs) + sizeof info->dlpi_subs &&
      info->dlpi_adds == sc.adds && info->dlpi_subs == sc.subs)
    return 1;  // nothing loaded or unloaded since the last scan
  if (sc.count == 0) sc.adds = info->dlpi_adds, sc.subs = info->dlpi_subs;
  if (sc.count == kMaxModules) return 1;
  Module& m = sc.staged[sc.count];
  uint64_t lo = UINT64_MAX, hi = 0;
  for (int i = 0; i < info->dlpi_phnum; i++) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_LOAD) continue;
    if (ph.p_vaddr < lo) lo = ph.p_vaddr;
    if (ph.p_vaddr + ph.p_memsz > hi) hi = ph.p_vaddr + ph.p_memsz;
  }
  if (hi == 0) return 0;
  m.base = info->dlpi_addr;
  m.start = info->dlpi_addr + lo;
  m.end = info->dlpi_addr + hi;
  const auto self = reinterpret_cast<uint64_t>(&stage_module);
  m.flags = self >= m.start && self < m.end ? uint32_t{capture::kModuleSelf} : 0u;
  m.build_id_bytes = build_id(info, m.build_id, sizeof m.build_id);
  const char* name = info->dlpi_name != nullptr ? info->dlpi_name : "";
  if (*name == 0 && sc.count == 0) {  // the program itself
    const ssize_t n = readlink("/proc/self/exe", m.path, sizeof m.path);
    m.path_bytes = n > 0 ? static_cast<uint32_t>(n) : 0;
  } else {
    const size_t n = strlen(name);
    m.path_bytes = static_cast<uint32_t>(n < sizeof m.path ? n : sizeof m.path);
    memcpy(m.path, name, m.path_bytes);
  }
  sc.count++;
  return 0;
}

void write_module(const Module& m) {
  const size_t bytes = round8(sizeof(capture::ModuleRecord) + m.path_bytes);
  uint8_t* at = reserve(bytes);
  if (at == nullptr) return;
  auto* r = reinterpret_cast<capture::ModuleRecord*>(at);
  r->flags = m.flags;
  r->path_bytes = m.path_bytes;
  r->base = m.base;
  r->start = m.start;
  r->end = m.end;
  r->build_id_bytes = m.build_id_bytes;
  memcpy(r->build_id, m.build_id, m.build_id_bytes);
  memcpy(r + 1, m.path, m.path_bytes);
  publish(at, bytes, capture::kModule, 0);
}

// Names, in the capture, the objects loaded now that it has not named yet.
// Never inside malloc (dl_iterate_phdr takes the loader's lock).
void scan_modules() {
  if (!g_native) return;
  LockGuard scan(g_scan_lock);
  if (g_scan == nullptr) g_scan = map_table<ModuleScan>(1);
  if (g_scan == nullptr) return;
  bool force;
  {
    LockGuard guard(g_lock);
    force = g_seen != nullptr && g_seen_count == 0;
  }
  g_scan->count = 0;
  dl_iterate_phdr(stage_module, force ? g_scan : nullptr);
  LockGuard guard(g_lock);
  if (g_map == nullptr || g_seen == nullptr) return;
  for (size_t i = 0; i < g_scan->count; i++) {
    const Module& m = g_scan->staged[i];
    bool seen = false;
    for (size_t j = 0; j < g_seen_count && !seen; j++) seen = same_module(g_seen[j], m);
    if (seen || g_seen_count == kMaxModules) continue;
    write_module(m);
    g_seen[g_seen_count++] = m;
  }
}

// ---- sampled addresses still live -------------------------------------------
// Open addressing with backward-shift deletion (no tombstones), under
// g_lock. The table starts small and doubles at 3/4 full: addresses hash
// all over it, so an 8 MiB table made at once had most of its pages touched
// by a few thousand samples (+7 MB of RSS and 1,900 page faults on a 1 s
// script, measured). Full at 3/4 of kMaxLiveSlots, or when a bigger one
// cannot be mapped: new samples are dropped and counted.
constexpr unsigned kMinLiveBits = 12;
constexpr size_t kMinLiveSlots = size_t{1} << kMinLiveBits;  // 32 KiB
constexpr size_t kMaxLiveSlots = size_t{1} << 20;            // 8 MiB: 786,432 live samples
uintptr_t* g_live = nullptr;
size_t g_live_slots = 0;
unsigned g_live_bits = 0;
size_t g_live_count = 0;

size_t live_hash(uintptr_t a) { return (a >> 4) * 0x9e3779b97f4a7c15ull >> (64 - g_live_bits); }

void live_put(uintptr_t a) {
  size_t i = live_hash(a);
  while (g_live[i] != 0 && g_live[i] != a) i = (i + 1) & (g_live_slots - 1);
  if (g_live[i] == 0) g_live_count++;
  g_live[i] = a;
}

// A table twice as big, with every address moved over (mmap is a system
// call: no allocation, no lock of libebb's).
bool live_grow() {
  if (g_live_slots >= kMaxLiveSlots) return false;
  uintptr_t* old = g_live;
  const size_t old_slots = g_live_slots;
  uintptr_t* bigger = map_table<uintptr_t>(old_slots * 2);
  if (bigger == nullptr) return false;
  g_live = bigger;
  g_live_slots = old_slots * 2;
  g_live_bits++;
  g_live_count = 0;
  for (size_t i = 0; i < old_slots; i++)
    if (old[i] != 0) live_put(old[i]);
  unmap_table(old, old_slots);
  return true;
}

bool live_insert(uintptr_t a) {
  if (g_live_count >= g_live_slots / 4 * 3 && !live_grow()) return false;
  live_put(a);
  return true;
}

bool live_remove(uintptr_t a) {
  size_t i = live_hash(a);
  while (g_live[i] != a) {
    if (g_live[i] == 0) return false;
    i = (i + 1) & (g_live_slots - 1);
  }
  // Pull later members of the run back over the hole while their home allows.
  for (size_t j = (i + 1) & (g_live_slots - 1); g_live[j] != 0; j = (j + 1) & (g_live_slots - 1)) {
    const size_t home = live_hash(g_live[j]);
    const bool movable = i <= j ? (home <= i || home > j) : (home <= i && home > j);
    if (movable) {
      g_live[i] = g_live[j];
      i = j;
    }
  }
  g_live[i] = 0;
  g_live_count--;
  return true;
}

// ---- sampling ----------------------------------------------------------------
// ln(x) for x in (0, 1], without libm: x = m * 2^e, ln m by the atanh series.
double ln(double x) {
  uint64_t bits;
  memcpy(&bits, &x, sizeof bits);
  int e = static_cast<int>((bits >> 52) & 0x7ff) - 1023;
  bits = (bits & ((uint64_t{1} << 52) - 1)) | (uint64_t{1023} << 52);
  double m;
  memcpy(&m, &bits, sizeof m);
  if (m > 1.4142135623730951) {
    m /= 2;
    e++;
  }
  const double t = (m - 1) / (m + 1), t2 = t * t;
  const double series = 1 + t2 * (1.0 / 3 + t2 * (1.0 / 5 + t2 * (1.0 / 7 + t2 * (1.0 / 9 + t2 / 11))));
  return e * 0.6931471805599453 + 2 * t * series;
}

// Bytes to the next sampled byte: exponential with mean g_rate.
uint64_t next_gap(ThreadCache& tc) {
  if (tc.rng == 0) tc.rng = os::random64() | 1;
  tc.rng ^= tc.rng << 13;
  tc.rng ^= tc.rng >> 7;
  tc.rng ^= tc.rng << 17;
  const double u = static_cast<double>((tc.rng >> 11) + 1) * (1.0 / 9007199254740992.0);  // (0, 1]
  return static_cast<uint64_t>(-ln(u) * static_cast<double>(g_rate)) + 1;
}

// Under g_lock: the interpreter began to finalize. What is live now is what
// the program kept to its end; what finalization frees is not its doing.
bool check_end() {
  if (g_ended) return true;
  if (g_py.is_finalizing == nullptr || g_py.is_finalizing() == 0) return false;
  g_ended = true;
  uint8_t* at = reserve(sizeof(capture::EndRecord));
  if (at != nullptr) {
    reinterpret_cast<capture::EndRecord*>(at)->time_ns = now_ns() - g_header->start_ns;
    publish(at, sizeof(capture::EndRecord), capture::kEnd, 0);
  }
  return true;
}

void write_free(uintptr_t a) {
  uint8_t* at = reserve(sizeof(capture::FreeRecord));
  if (at == nullptr) return;
  auto* r = reinterpret_cast<capture::FreeRecord*>(at);
  r->addr = a;
  r->time_ns = now_ns() - g_header->start_ns;
  publish(at, sizeof(capture::FreeRecord), capture::kFree, 0);
}

// Creates and maps the capture g_prefix.<pid>.ebbprof: 0 or an errno.
int open_capture() {
  char num[24];
  const size_t np = strlen(g_prefix);
  const char* pid = os::fmt_dec(num, static_cast<uint64_t>(getpid()));
  if (np + 1 + strlen(pid) + 8 + 1 > sizeof g_path) return ENAMETOOLONG;
  memcpy(g_path, g_prefix, np + 1);
  strcat(g_path, ".");
  strcat(g_path, pid);
  strcat(g_path, ".ebbprof");
  g_fd = open(g_path, O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (g_fd < 0) return errno;
  // Out of the way of programs that reuse low descriptors (daemons close
  // 3..N and open their logs): a high number, and its identity checked.
  if (const int high = fcntl(g_fd, F_DUPFD_CLOEXEC, 900); high >= 0) {
    close(g_fd);
    g_fd = high;
  }
  struct stat st;
  if (fstat(g_fd, &st) == 0) {
    g_dev = st.st_dev;
    g_ino = st.st_ino;
  }
  void* m = MAP_FAILED;
  int err = 0;
  // As much address space as the system grants (valgrind, or a ulimit -v,
  // refuse 64 GiB): the capture stops growing there, and says so.
  if (grow_file(0, capture::kGrowBytes)) {
    for (uint64_t want = capture::kMaxBytes; m == MAP_FAILED && want >= capture::kGrowBytes; want /= 8) {
      m = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, g_fd, 0);
      if (m != MAP_FAILED) g_map_bytes = want;
    }
  }
  if (m == MAP_FAILED) {
    err = errno;
    close(g_fd);
    unlink(g_path);
    g_fd = -1;
    return err != 0 ? err : ENOMEM;
  }
  g_map = static_cast<uint8_t*>(m);
  g_file_bytes = capture::kGrowBytes;
  g_used = sizeof(capture::Header);
  g_header = reinterpret_cast<capture::Header*>(g_map);
  g_header->version = capture::kVersion;
  g_header->header_bytes = sizeof(capture::Header);
  g_header->pid = getpid();
  g_header->ppid = getppid();
  g_header->rate = g_all ? 1 : g_rate;
  g_header->flags = (g_all ? uint32_t{capture::kFlagAll} : 0u) | (g_native ? uint32_t{capture::kFlagNative} : 0u);
  g_header->python = g_py.version;
  struct timespec rt;
  clock_gettime(CLOCK_REALTIME, &rt);
  g_header->start_ns = now_ns();
  g_header->start_unix_ns = static_cast<uint64_t>(rt.tv_sec) * 1000000000u + static_cast<uint64_t>(rt.tv_nsec);
  __atomic_store_n(&g_header->magic, capture::kMagic, __ATOMIC_RELEASE);
  return 0;
}

bool make_tables() {
  g_codes = map_table<CodeSlot>(kCodeSlots);
  g_live = g_all ? nullptr : map_table<uintptr_t>(kMinLiveSlots);
  g_live_slots = g_live != nullptr ? kMinLiveSlots : 0;
  g_live_bits = kMinLiveBits;
  g_seen = g_native ? map_table<Module>(kMaxModules) : nullptr;
  g_live_count = 0;
  g_seen_count = 0;
  g_next_code = 1;
  return g_codes != nullptr && (g_all || g_live != nullptr) && (!g_native || g_seen != nullptr);
}

void drop_tables() {
  unmap_table(g_codes, kCodeSlots);
  unmap_table(g_live, g_live_slots);
  g_live_slots = 0;
  unmap_table(g_seen, kMaxModules);
}

// The span of small object p, or nullptr for a large one.
Span* small_span(const void* p) {
  const uintptr_t seg = reinterpret_cast<uintptr_t>(p) & ~kSegmentMask;
  if (!registry_has(seg)) return nullptr;
  return span_of(reinterpret_cast<SegmentHeader*>(seg), p);
}

// Sampled object p is live: its span sends its frees to profile_free until
// its last live sample goes. The bit shares its byte with flags the bins
// write under their lock, and so does the count.
void mark_span(const void* p) {
  Span* s = small_span(p);
  if (s == nullptr || (g_all && s->sampled)) return;  // large: dealloc_other asks on its own
  LockGuard guard(g_bins[s->cls].lock);
  Segment* seg = segment_of_span(s);
  uint8_t& live = seg->sampled_live[s->slice];
  if (live < 255) live++;
  __atomic_fetch_or(&seg->sampled_slots[s->slice], uint64_t{1} << (span_slot(s, p) % 64), __ATOMIC_RELAXED);
  s->sampled = true;
}

// Sampled object p was freed.
void unmark_span(const void* p) {
  Span* s = small_span(p);
  if (s == nullptr) return;
  LockGuard guard(g_bins[s->cls].lock);
  Segment* seg = segment_of_span(s);
  uint8_t& live = seg->sampled_live[s->slice];
  if (live == 0 || live == 255) return;  // 255: too many to count, marked for good
  if (--live == 0) {
    s->sampled = false;
    __atomic_store_n(&seg->sampled_slots[s->slice], 0, __ATOMIC_RELAXED);
  }
}

// After a detach: spans still marked for their live samples would send
// every free the slow way for good. Bins, then segments, as fork does;
// never under g_lock. Only marked spans are written: the filter's page of
// a segment never sampled stays untouched.
void unmark_all_spans() {
  for (unsigned cls = 1; cls <= kNumClasses; cls++) g_bins[cls].lock.lock();
  g_segment_lock.lock();
  for (Segment* seg = g_segments; seg != nullptr; seg = seg->next)
    for (unsigned i = kFirstSpanSlice; i < kSlicesPerSegment; i++) {
      Span* sp = &seg->spans[i];
      if (seg->span_at[i] != span_offset(i) || sp->cls == 0 || !sp->sampled) continue;
      sp->sampled = false;
      seg->sampled_live[i] = 0;
      __atomic_store_n(&seg->sampled_slots[i], 0, __ATOMIC_RELAXED);
    }
  g_segment_lock.unlock();
  for (unsigned cls = kNumClasses; cls >= 1; cls--) g_bins[cls].lock.unlock();
}

// The interpreter's entry points, if this is CPython 3.11. dlsym may
// allocate: this runs in the library constructor or the purger thread, never
// inside malloc.
void find_python() {
  static bool done = false;
  if (done) return;
  done = true;
  const auto* version = static_cast<const unsigned long*>(dlsym(RTLD_DEFAULT, "Py_Version"));
  if (version == nullptr) return;
  g_py.version = static_cast<uint32_t>(*version);
  if ((*version >> 16) != 0x030b) {
    os::write_err("ebb: profile: this Python is not 3.11; allocations are recorded without Python stacks\n");
    return;
  }
  g_py.is_finalizing = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "_Py_IsFinalizing"));
  g_py.code_type = dlsym(RTLD_DEFAULT, "PyCode_Type");
  if (g_py.code_type != nullptr)
    g_py.this_thread_state = reinterpret_cast<void* (*)()>(dlsym(RTLD_DEFAULT, "PyGILState_GetThisThreadState"));
}

// The unwinder's first call loads libgcc_s, which allocates: made here,
// outside malloc and before profiling starts.
void prime_unwinder(uint64_t rate) {
  static bool done = false;
  if ((rate & capture::kRateNative) == 0 || done) return;
  done = true;
  void* pcs[4];
  backtrace(pcs, 4);
}

// Under g_lock: start a capture at `rate` (0 or 1: every allocation; with
// kRateNative: native stacks too) into g_prefix. 0 or an errno.
int32_t begin(uint64_t rate) {
  g_native = (rate & capture::kRateNative) != 0;
  rate &= ~capture::kRateNative;
  g_all = rate <= 1;
  g_rate = g_all ? 1 : rate;
  g_ended = false;
  if (!make_tables()) {
    drop_tables();
    return ENOMEM;
  }
  if (const int err = open_capture(); err != 0) {
    drop_tables();
    return err;
  }
  g_profile_on = true;
  return 0;
}

// Threads that allocated before (the loader, this thread before the
// constructor ran, every thread of a process attached to) have their sample
// point at "never": start them again. A thread reading its own sample_at
// meanwhile sees the old or the new value, both harmless. Called without
// g_lock: fork takes g_tcache_lock first and g_lock last, and so must we.
void rearm_threads() {
  LockGuard threads(g_tcache_lock);
  t_cache.sample_at = 0;
  t_cache.sample_armed = false;
  for (ThreadCache* tc = g_tcaches; tc != nullptr; tc = tc->next) {
    tc->sample_at = 0;
    tc->sample_armed = false;
  }
}

// Under g_lock: the capture is complete; let it go. Threads that come for
// g_lock afterwards find g_map empty and record nothing.
void finish() {
  g_profile_on = false;
  const uint64_t keep = g_used + sizeof(capture::RecordHead);
  if (ftruncate(g_fd, static_cast<off_t>(keep)) != 0) {
    // The zero tail stays: the reader stops at the first empty record.
  }
  munmap(g_map, g_map_bytes);
  close(g_fd);
  g_map = nullptr;
  g_header = nullptr;
  g_fd = -1;
  drop_tables();
}

// The process's memory now, as a record. ebb_stats takes the bins' locks:
// called with g_lock free, and the figures are written under it.
struct MemoryNow {
  ebb_stats_t s;
  uint64_t rss, file;
};
MemoryNow memory_now() {
  MemoryNow m{};
  ebb_stats(&m.s, sizeof m.s);
  os::statm(&m.rss, &m.file);
  return m;
}

// Under g_lock.
void write_stats(const MemoryNow& m) {
  uint8_t* at = reserve(sizeof(capture::StatsRecord));
  if (at == nullptr) return;
  auto* r = reinterpret_cast<capture::StatsRecord*>(at);
  r->time_ns = now_ns() - g_header->start_ns;
  r->rss_bytes = m.rss;
  r->file_bytes = m.file;
  r->live_bytes = m.s.live_bytes;
  r->heap_resident_bytes = m.s.resident_bytes;
  r->thread_cached_bytes = m.s.thread_cached_bytes;
  r->large_cached_bytes = m.s.large_cached_bytes;
  r->mapped_bytes = m.s.mapped_bytes;
  r->profiler_bytes = (g_codes != nullptr ? kCodeSlots * sizeof(CodeSlot) : 0) +
                      (g_live != nullptr ? g_live_slots * sizeof(uintptr_t) : 0);
  publish(at, sizeof(capture::StatsRecord), capture::kStats, 0);
}

// Four times a second: enough for the timeline, and the statistics taken
// last before the end are at most a quarter of a second older than it.
constexpr uint64_t kStatsEveryNs = 250000000u;
uint64_t g_last_stats_ns = 0;  // the purger's

void copy_out(const char* from, char* to, size_t cap) {
  if (cap == 0) return;
  size_t n = strlen(from);
  if (n >= cap) n = cap - 1;
  memcpy(to, from, n);
  to[n] = 0;
}

}  // namespace

void profile_start() {
  find_python();
  const uint64_t rate = g_options.profile_rate | (g_options.profile_native ? capture::kRateNative : 0);
  prime_unwinder(rate);
  int32_t err;
  {
    LockGuard guard(g_lock);
    copy_out(g_options.profile_prefix, g_prefix, sizeof g_prefix);
    g_follow_fork = true;
    err = begin(rate);
  }
  if (err == 0) {
    scan_modules();
    rearm_threads();
  } else {
    os::write_err("ebb: profile off: cannot create a capture ");
    os::write_err(g_path);
    os::write_err(": ");
    os::write_err(strerror(err));
    os::write_err("\n");
  }
}

int32_t profile_attach(const char* prefix, uint64_t rate, bool follow_fork, char* path, size_t cap) {
  find_python();
  prime_unwinder(rate);
  int32_t err;
  {
    LockGuard guard(g_lock);
    if (g_map != nullptr) {
      copy_out(g_path, path, cap);
      return telemetry::kAckAlreadyProfiling;
    }
    if (g_py.is_finalizing != nullptr && g_py.is_finalizing() != 0) return telemetry::kAckFinalizing;
    copy_out(prefix, g_prefix, sizeof g_prefix);
    g_follow_fork = follow_fork;
    err = begin(rate);
    copy_out(g_path, path, cap);
  }
  if (err == 0) {
    scan_modules();
    rearm_threads();
  }
  return err;
}

int32_t profile_detach(char* path, size_t cap) {
  scan_modules();
  const MemoryNow m = memory_now();
  {
    LockGuard guard(g_lock);
    if (g_map == nullptr) return telemetry::kAckNotProfiling;
    copy_out(g_path, path, cap);
    if (!g_ended) {
      write_stats(m);
      // Detached: what is live now is what the capture ends with.
      uint8_t* at = reserve(sizeof(capture::EndRecord));
      if (at != nullptr) {
        reinterpret_cast<capture::EndRecord*>(at)->time_ns = now_ns() - g_header->start_ns;
        publish(at, sizeof(capture::EndRecord), capture::kEnd, 0);
      }
    }
    finish();
  }
  unmark_all_spans();
  return 0;
}

void profile_tick() {
  if (!g_profile_on) return;
  const uint64_t now = now_ns();
  if (now - g_last_stats_ns < kStatsEveryNs) return;
  g_last_stats_ns = now;
  scan_modules();
  const MemoryNow m = memory_now();
  LockGuard guard(g_lock);
  if (g_map != nullptr && !g_ended) write_stats(m);
}

void profile_alloc(void* p, size_t size) {
  ThreadCache& tc = t_cache;
  if (!g_profile_on || p == nullptr) {
    if (!g_profile_on) tc.sample_at = UINT64_MAX;
    return;
  }
  if (tc.in_profile) return;
  if (!tc.sample_armed) {  // this thread's first call: start its countdown, do not sample
    tc.sample_armed = true;
    tc.sample_at = g_all ? 0 : tc.alloc_bytes + next_gap(tc);
    if (!g_all) return;
  }
  if (!g_all) tc.sample_at = tc.alloc_bytes + next_gap(tc);
  tc.in_profile = true;
  if (tc.tid == 0) tc.tid = static_cast<uint32_t>(syscall(SYS_gettid));
  void* pcs[capture::kMaxFrames];
  const uint32_t native = g_native ? static_cast<uint32_t>(backtrace(pcs, capture::kMaxFrames)) : 0;
  bool recorded = false;
  {
    LockGuard guard(g_lock);
    if (g_map == nullptr) {
      // Detached while this thread was on its way.
    } else if (check_end()) {
      g_profile_on = false;
    } else if (!g_all && !live_insert(reinterpret_cast<uintptr_t>(p))) {
      g_header->dropped++;
    } else {
      recorded = true;
      Frame frames[capture::kMaxFrames];
      const uint32_t n = python_frames(frames);
      const size_t bytes = sizeof(capture::AllocRecord) + n * sizeof(Frame) + native * sizeof(void*);
      uint8_t* at = reserve(bytes);
      if (at != nullptr) {
        auto* r = reinterpret_cast<capture::AllocRecord*>(at);
        r->tid = tc.tid;
        r->native = native;
        memcpy(reinterpret_cast<uint8_t*>(r + 1) + n * sizeof(Frame), pcs, native * sizeof(void*));
        r->addr = reinterpret_cast<uintptr_t>(p);
        r->size = size;
        r->time_ns = now_ns() - g_header->start_ns;
        memcpy(static_cast<void*>(r + 1), frames, n * sizeof(Frame));
        publish(at, bytes, capture::kAlloc, static_cast<uint16_t>(n));
      }
    }
  }
  if (recorded) mark_span(p);
  tc.in_profile = false;
}

void profile_free(const void* p) {
  if (!g_profile_on) return;
  ThreadCache& tc = t_cache;
  if (tc.in_profile) return;
  tc.in_profile = true;
  bool was_sampled = false;
  {
    LockGuard guard(g_lock);
    const auto a = reinterpret_cast<uintptr_t>(p);
    if (g_map == nullptr) {
      // Detached meanwhile.
    } else if (check_end()) {
      g_profile_on = false;
    } else if (g_all || live_remove(a)) {
      was_sampled = true;
      write_free(a);
    }
  }
  if (was_sampled && !g_all) unmark_span(p);
  tc.in_profile = false;
}

void profile_free_small(Span* s, const void* p) {
  // The filter: an object whose slot bit is clear was not sampled. A bit set
  // by another thread's mark_span after this read belongs to an object this
  // thread cannot be freeing (it is not handed out yet).
  if (!g_all) {
    const uint64_t filter = __atomic_load_n(&segment_of_span(s)->sampled_slots[s->slice], __ATOMIC_RELAXED);
    if ((filter >> (span_slot(s, p) % 64) & 1) == 0) return;
  }
  profile_free(p);
}

// The module scan first: a thread scanning holds the loader's write lock
// (dl_iterate_phdr), which fork() does not reset in the child; waiting for
// the scan to end keeps the child's loader usable. A scan takes g_lock
// after g_scan_lock and no other of libebb's locks.
void profile_before_fork() {
  g_scan_lock.lock();
  g_lock.lock();
}
void profile_after_fork_parent() {
  g_lock.unlock();
  g_scan_lock.unlock();
}

void profile_after_fork_child() {
  g_lock.reset_after_fork();
  g_scan_lock.reset_after_fork();  // the parent's purger may have been scanning
  if (g_map == nullptr) return;
  // The parent's capture is the parent's: the child starts its own, with
  // its own code table (the new file must describe every code it names).
  munmap(g_map, g_map_bytes);
  close(g_fd);
  g_map = nullptr;
  g_header = nullptr;
  g_fd = -1;
  Module* inherited = g_seen;  // the parent's objects are mapped here too
  const size_t inherited_count = g_seen_count;
  g_seen = nullptr;
  drop_tables();
  ThreadCache& tc = t_cache;
  tc.tid = 0;
  tc.in_profile = false;
  g_profile_on = false;
  if (g_scan != nullptr) g_scan->count = 0;  // the child's capture names every object again (make_tables)
  // Attached to the parent: the child is not profiled (nobody will detach it).
  if (g_ended || !g_follow_fork || !make_tables() || open_capture() != 0) {
    drop_tables();
    unmap_table(inherited, kMaxModules);
    return;
  }
  // Named at once: a child that ends before its purger's first look
  // (os._exit) or is killed still has them.
  for (size_t i = 0; inherited != nullptr && g_seen != nullptr && i < inherited_count; i++) {
    write_module(inherited[i]);
    g_seen[g_seen_count++] = inherited[i];
  }
  unmap_table(inherited, kMaxModules);
  g_profile_on = true;
}

}  // namespace ebb

namespace ebb {

// At exit the capture loses its zero tail (it grew in kGrowBytes steps). A
// thread still running may record more: reserve() grows the file again.
__attribute__((destructor)) static void profile_close() {
  scan_modules();  // objects loaded since the purger last looked (or without a purger)
  LockGuard guard(g_lock);
  if (g_map == nullptr || g_header->pid != getpid()) return;
  const uint64_t keep = g_used + sizeof(capture::RecordHead);
  if (ftruncate(g_fd, static_cast<off_t>(keep)) == 0) g_file_bytes = keep;
}

}  // namespace ebb
