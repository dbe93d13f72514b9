// Purge delays for one test: set on construction, restored on destruction.
// Both wake the purger, which may be sleeping out a tick computed from the
// delays it saw last (60 s ones would keep it asleep for the next test).
#pragma once

#include <stdint.h>

#include "heap.h"

class Delays {
 public:
  Delays(uint32_t purge_ms, uint32_t empty_ms)
      : purge_(ebb::g_options.purge_delay_ms), empty_(ebb::g_options.empty_delay_ms) {
    ebb::g_options.purge_delay_ms = purge_ms;
    ebb::g_options.empty_delay_ms = empty_ms;
    ebb::purger_options_changed();
  }
  explicit Delays(uint32_t ms) : Delays(ms, ms) {}
  ~Delays() {
    ebb::g_options.purge_delay_ms = purge_;
    ebb::g_options.empty_delay_ms = empty_;
    ebb::purger_options_changed();
  }
  Delays(const Delays&) = delete;
  Delays& operator=(const Delays&) = delete;

 private:
  uint32_t purge_, empty_;
};
