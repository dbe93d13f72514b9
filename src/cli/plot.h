// A memory-over-time chart: one line per series, axes with units, a legend.
// SVG (or an HTML page that embeds it, with the results table), drawn by hand:
// no plotting library needed to read or build it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ebb::cli {

struct Sample {
  double t;        // seconds since the start
  uint64_t bytes;  // memory at that time
};

struct Series {
  std::string name;
  std::vector<Sample> samples;
};

std::string render_svg(const std::string& title, const std::string& y_label, const std::vector<Series>& series);

// Writes an .svg, or an .html page with the chart and `table` below it.
// False with *err set for another extension or a write error.
bool write_plot(const std::string& path, const std::string& title, const std::string& y_label,
                const std::vector<Series>& series, const std::string& table, std::string* err);

}  // namespace ebb::cli
