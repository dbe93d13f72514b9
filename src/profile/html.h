// The HTML report of ebb profile: one self-contained page (no network) with
// a flamegraph of the live heap at the peak, at the end, in total or at any
// moment of the timeline, search, zoom, and the heap-versus-RSS breakdown.
#pragma once

#include <string>

#include "capture.h"
#include "report.h"

namespace ebb::profile {

struct HtmlOptions {
  std::string initial = "peak";  // the view the page opens on: peak, end, total
  bool inverted = false;         // allocating lines at the root
};

std::string html_report(const Capture& c, const Analysis& a, const HtmlOptions& o);

}  // namespace ebb::profile
