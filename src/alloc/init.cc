// Start-up: options from the environment, the free-object key, and the
// library constructor.
#include <stdlib.h>
#include <sys/auxv.h>

#include <cstring>

#include "heap.h"
#include "os.h"

namespace ebb {

Options g_options;
Counters g_counters;
uint64_t g_free_key = 0;
bool g_constructed = false;

namespace {

std::atomic<int> g_init_state{0};  // 0 no, 1 in progress, 2 done
Lock g_init_lock;

// Reads a decimal environment variable without allocating (getenv does not).
bool env_u32(const char* name, uint32_t* out) {
  const char* v = getenv(name);
  if (v == nullptr || *v == 0) return false;
  uint64_t n = 0;
  for (const char* c = v; *c; c++) {
    if (*c < '0' || *c > '9' || n > 0xffffffffull) {
      os::write_err("ebb: ignoring ");
      os::write_err(name);
      os::write_err(": not a number\n");
      return false;
    }
    n = n * 10 + static_cast<uint64_t>(*c - '0');
  }
  if (n > 0xffffffffull) return false;
  *out = static_cast<uint32_t>(n);
  return true;
}

void print_options() {
  char num[24];
  os::write_err("ebb: purge_delay_ms=");
  os::write_err(os::fmt_dec(num, g_options.purge_delay_ms));
  os::write_err(" empty_delay_ms=");
  os::write_err(os::fmt_dec(num, g_options.empty_delay_ms));
  os::write_err(" background=");
  os::write_err(g_options.background ? "1" : "0");
  os::write_err(" tcache_bytes=");
  os::write_err(os::fmt_dec(num, g_options.tcache_bytes));
  os::write_err(" large_cache_mb=");
  os::write_err(os::fmt_dec(num, g_options.large_cache_mb));
  os::write_err(" busy_window_ms=");
  os::write_err(os::fmt_dec(num, g_options.busy_window_ms));
  os::write_err("\n");
}

}  // namespace

void options_load() {
  uint32_t v;
  if (env_u32("EBB_PURGE_DELAY_MS", &v)) g_options.purge_delay_ms = v;
  if (env_u32("EBB_EMPTY_DELAY_MS", &v)) g_options.empty_delay_ms = v;
  if (env_u32("EBB_BACKGROUND", &v)) g_options.background = v != 0;
  if (env_u32("EBB_TCACHE_BYTES", &v)) g_options.tcache_bytes = v > kMaxTcacheBytes ? kMaxTcacheBytes : v;
  if (env_u32("EBB_LARGE_CACHE_MB", &v)) g_options.large_cache_mb = v;
  if (env_u32("EBB_BUSY_WINDOW_MS", &v)) g_options.busy_window_ms = v;
  if (env_u32("EBB_VERBOSE", &v)) g_options.verbose = v != 0;
  if (env_u32("EBB_PROFILE_RATE", &v)) g_options.profile_rate = v;
  if (env_u32("EBB_PROFILE_NATIVE", &v)) g_options.profile_native = v != 0;
  const char* prof = getenv("EBB_PROFILE");
  g_options.profile_prefix[0] = 0;
  if (prof != nullptr && strlen(prof) < sizeof g_options.profile_prefix)
    memcpy(g_options.profile_prefix, prof, strlen(prof) + 1);
  else if (prof != nullptr)
    os::write_err("ebb: profile off: EBB_PROFILE is too long\n");
  const char* t = getenv("EBB_TELEMETRY");
  g_options.telemetry = t != nullptr && t[0] == '1';
  const char* dir = getenv("EBB_TELEMETRY_DIR");
  g_options.telemetry_dir[0] = 0;
  if (dir != nullptr) {
    const size_t n = strlen(dir);
    if (n < sizeof g_options.telemetry_dir) {
      memcpy(g_options.telemetry_dir, dir, n + 1);
    } else if (g_options.telemetry) {
      os::write_err("ebb: telemetry off: EBB_TELEMETRY_DIR is too long\n");
      g_options.telemetry = false;
    }
  }
}

void ensure_init() {
  if (EBB_LIKELY(g_init_state.load(std::memory_order_acquire) == 2)) return;
  LockGuard guard(g_init_lock);
  if (g_init_state.load(std::memory_order_relaxed) == 2) return;
  unsigned long page = getauxval(AT_PAGESZ);
  if (page != 0 && page != kPageSize) os::write_err("ebb: page size is not 4 KiB; free pages will not be given back\n");
  g_free_key = os::random64() | 1;
  // The environment may not be set up yet if the dynamic loader allocates
  // before libc starts; the constructor reads it again.
  options_load();
  g_init_state.store(2, std::memory_order_release);
}

// Runs when libebb is loaded, after libc is initialised.
__attribute__((constructor)) static void ebb_constructor() {
  ensure_init();
  options_load();
  fork_register();
  g_constructed = true;
  if (g_options.verbose) print_options();
  // With telemetry on, the page must exist (and be served) from the start.
  if (telemetry_wanted()) purger_start();
  if (g_options.profile_prefix[0] != 0) profile_start();
}

}  // namespace ebb
